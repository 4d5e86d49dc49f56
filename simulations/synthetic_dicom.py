"""Synthetic DICOM images: made-up patients and scanners for the simulated hospital archives and the tests.

An :class:`Identity` is who and what a study is about (name, IDs, birth date, accession, institution: all
invented); an :class:`Equipment` is how a scanner stores its pixels (vendor, bit depth, rescale,
MONOCHROME1, transfer syntax). :func:`image_dataset` writes both into a realistic image object, so the
hospital path (decoding, de-identification checks, leak tests) runs on data that looks like a PACS export.

This module never imports pydicom: it composes the neutral writing primitives of :mod:`client.dicom.write`
(:func:`~client.dicom.write.build_dataset`), and it is not part of the hospital node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from client.dicom.write import SOP_CLASSES, build_dataset, new_uid

if TYPE_CHECKING:
    from client.dicom.write import Dataset  # pydicom's, named through the one package that imports pydicom


@dataclass(frozen=True)
class Identity:
    """Who and what an object is about, written into its header (every value made up)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_uid: str
    series_uid: str
    study_date: str
    institution: str
    referring_physician: str = ""
    study_description: str = ""
    series_number: int = 1


@dataclass(frozen=True)
class Equipment:
    """The acquiring device: how it stores the pixels."""

    manufacturer: str
    model: str
    station: str
    modality: str
    bits_stored: int = 8  # 8, 12 or 16
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    monochrome1: bool = False
    transfer_syntax: str = "explicit"  # a key of client.dicom.WRITE_SYNTAXES
    pixel_spacing: float = 0.5
    extra: dict[str, str] = field(default_factory=dict)  # further attributes, by DICOM keyword


def encode_stored(display: np.ndarray, equipment: Equipment) -> tuple[np.ndarray, float, float]:
    """Display values in [0, 1] -> stored integers plus the (center, width) window that displays them back.

    Stored values use ``bits_stored`` bits; the Modality LUT maps them to
    ``slope * stored + intercept`` and the returned window maps that range back to [0, 1].
    """
    top = (1 << equipment.bits_stored) - 1
    x = 1.0 - display if equipment.monochrome1 else display
    stored = np.clip(np.rint(x * top), 0, top)
    lo = equipment.rescale_intercept
    hi = equipment.rescale_slope * top + equipment.rescale_intercept
    width = (hi - lo) + 1.0
    center = lo + (width - 1.0) / 2.0 + 0.5
    dtype = np.uint8 if equipment.bits_stored <= 8 else np.uint16
    return stored.astype(dtype), center, width


def _pixel_module(display: np.ndarray, equipment: Equipment, *, rgb: bool) -> tuple[dict[str, Any], np.ndarray]:
    """The Image Pixel (and, for grayscale, Modality LUT and VOI LUT) attributes plus the stored pixels."""
    attributes: dict[str, Any] = {"Rows": int(display.shape[0]), "Columns": int(display.shape[1])}
    if rgb:
        pixels = np.clip(np.rint(display * 255), 0, 255).astype(np.uint8)
        attributes |= {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0,
                       "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}
        return attributes, pixels
    pixels, center, width = encode_stored(display, equipment)
    attributes |= {
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME1" if equipment.monochrome1 else "MONOCHROME2",
        "BitsAllocated": 8 if equipment.bits_stored <= 8 else 16,
        "BitsStored": equipment.bits_stored,
        "HighBit": equipment.bits_stored - 1,
        "PixelRepresentation": 0,
    }
    modality = equipment.modality
    if modality in ("CT", "MR", "CR", "DX") or equipment.rescale_slope != 1 or equipment.rescale_intercept != 0:
        attributes |= {"RescaleSlope": f"{equipment.rescale_slope:g}",
                       "RescaleIntercept": f"{equipment.rescale_intercept:g}",
                       "RescaleType": "HU" if modality == "CT" else "US"}
    attributes |= {"WindowCenter": f"{center:.4f}", "WindowWidth": f"{width:.4f}"}
    return attributes, pixels


def image_dataset(
    display: np.ndarray,
    *,
    identity: Identity,
    equipment: Equipment,
    instance_number: int,
    sop_uid: str | None = None,
    position: tuple[float, float, float] | None = None,
    rgb: bool = False,
) -> Dataset:
    """A complete image object for ``display`` (2D in [0, 1]; ``(rows, cols, 3)`` when ``rgb``).

    Parameters
    ----------
    display
        The image as a viewer shows it; stored through ``equipment``'s bit depth, rescale and photometry.
    identity, equipment
        The (synthetic) patient and study, and the scanner.
    instance_number
        The Instance Number in its series.
    sop_uid
        The SOP Instance UID; a fresh one when ``None``.
    position
        Image Position (Patient) of a slice in an axial stack; also writes its orientation, thickness and
        the study's frame of reference.
    rgb
        Whether ``display`` is colour.

    """
    attributes: dict[str, Any] = {
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientName": identity.patient_name,
        "PatientID": identity.patient_id,
        "PatientBirthDate": identity.birth_date,
        "PatientSex": identity.sex,
        "AccessionNumber": identity.accession,
        "StudyInstanceUID": identity.study_uid,
        "SeriesInstanceUID": identity.series_uid,
        "StudyDate": identity.study_date,
        "SeriesDate": identity.study_date,
        "ContentDate": identity.study_date,
        "StudyTime": "101500",
        "SeriesTime": "101500",
        "ContentTime": "101500",
        "StudyID": identity.accession[-6:],
        "StudyDescription": identity.study_description,
        "ReferringPhysicianName": identity.referring_physician,
        "InstitutionName": identity.institution,
        "Manufacturer": equipment.manufacturer,
        "ManufacturerModelName": equipment.model,
        "StationName": equipment.station,
        "Modality": equipment.modality,
        "SeriesNumber": identity.series_number,
        "InstanceNumber": instance_number,
        "BurnedInAnnotation": "NO",
        "PixelSpacing": [equipment.pixel_spacing, equipment.pixel_spacing],
        **equipment.extra,
    }
    if position is not None:
        attributes |= {
            "ImagePositionPatient": [float(v) for v in position],
            "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "SliceThickness": equipment.pixel_spacing,
            "FrameOfReferenceUID": new_uid(identity.study_uid, "frame-of-reference"),
        }
    pixel_module, pixels = _pixel_module(display, equipment, rgb=rgb)
    return build_dataset(SOP_CLASSES.get(equipment.modality, SOP_CLASSES["OT"]), attributes | pixel_module,
                         sop_uid=sop_uid, pixels=pixels, codec=equipment.transfer_syntax)
