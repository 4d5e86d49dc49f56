"""Writing DICOM objects: the neutral pydicom primitives every writer composes.

:func:`build_dataset` turns a mapping of DICOM keywords to values (and pixels) into a Part 10 dataset,
encoding the pixels with one of :data:`WRITE_SYNTAXES`; :func:`segmentation_dataset` writes a DICOM-SEG on
an image series (highdicom); :func:`dataset_bytes` serialises a dataset; :func:`new_uid` makes UIDs. What
is written is the caller's: hospital results (:mod:`client.dicom.results`) and the simulated archives
(``simulations.synthetic_dicom``) compose these without importing pydicom themselves.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from client.dicom.read import _quiet

#: Transfer syntaxes medsilo writes, by short name (``medsilo simulate-archive --codecs``).
WRITE_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg": JPEGBaseline8Bit,
}

#: Image storage SOP classes by modality (``OT``: Secondary Capture, for anything else).
SOP_CLASSES = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "US": UID("1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image Storage
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    "OT": UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image Storage
}

#: Set by :func:`build_dataset` from its arguments, so never taken from ``attributes``.
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID")


def new_uid(*derived_from: str) -> str:
    """A DICOM UID under pydicom's root: random, or derived from ``derived_from`` (the same strings, the same UID)."""
    return str(generate_uid(entropy_srcs=list(derived_from) if derived_from else None))


def _item(attributes: Mapping[str, Any]) -> Dataset:
    """A dataset (or sequence item) holding ``attributes``; a list of mappings becomes a sequence of items."""
    ds = Dataset()
    for keyword, value in attributes.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword; name attributes by their PS3.6 keyword "
                             "(e.g. 'PatientName')")
        if isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
            value = [_item(v) for v in value]
        setattr(ds, keyword, value)
    return ds


def build_dataset(
    sop_class: str,
    attributes: Mapping[str, Any],
    *,
    sop_uid: str | None = None,
    pixels: np.ndarray | None = None,
    codec: str = "explicit",
) -> Dataset:
    """A Part 10 dataset of ``sop_class`` holding ``attributes`` and, optionally, ``pixels``.

    Parameters
    ----------
    sop_class
        The SOP Class UID (file meta and dataset), e.g. one of :data:`SOP_CLASSES`.
    attributes
        DICOM keywords to values, set in order; a list of mappings becomes a sequence of items.
        ``SpecificCharacterSet`` defaults to ``ISO_IR 100``.
    sop_uid
        The SOP Instance UID; a fresh one when ``None``.
    pixels
        The stored pixel values (uint8 or uint16, ``(rows, cols)`` or ``(rows, cols, 3)``), which
        ``attributes`` describe (Rows, Columns, SamplesPerPixel, BitsAllocated, ...).
    codec
        The transfer syntax the pixels are encoded with, a key of :data:`WRITE_SYNTAXES`.

    Raises
    ------
    ValueError
        When a keyword is not in the DICOM dictionary, ``attributes`` names the SOP class or instance,
        or ``codec`` is unknown or cannot store ``pixels``.

    """
    if given := [k for k in _IDENTIFYING if k in attributes]:
        raise ValueError(f"attributes set {', '.join(given)}; pass sop_class and sop_uid instead")
    ds = _item({"SpecificCharacterSet": "ISO_IR 100", **attributes})
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
        _compress(ds, pixels, codec)
    return ds


ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")


def segmentation_dataset(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    classes: Sequence[str],
    *,
    structure: tuple[str, str, str] = ANATOMICAL_STRUCTURE,
    algorithm: str | None = None,
    series_number: int = 9902,
) -> Dataset:
    """A DICOM-SEG (binary segments, written by highdicom) of ``mask`` on the image series ``sources``.

    Parameters
    ----------
    sources
        The series' slices, in the order of ``mask``'s first axis.
    mask
        uint8 ``(slices, rows, cols)``; voxels of class ``k`` (1-based, in ``classes`` order) hold ``k``.
    classes
        Segment labels, one per class.
    structure
        ``(code value, coding scheme, meaning)`` of the segmented anatomy.
    algorithm
        The model that produced the mask (an automatic segmentation); ``None`` for an expert's (manual).
    series_number
        The new SEG series' number in the study.

    """
    import highdicom
    from pydicom.sr.codedict import codes

    if mask.ndim != 3 or len(sources) != mask.shape[0]:
        raise ValueError(f"mask of shape {mask.shape} for {len(sources)} source slices; expected (slices, rows, cols)")
    identification = None if algorithm is None else highdicom.AlgorithmIdentificationSequence(
        name=algorithm, version="1", family=codes.cid7162.ArtificialIntelligence)
    kind = highdicom.seg.SegmentAlgorithmTypeValues
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=k, segment_label=cls,
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=highdicom.sr.CodedConcept(*structure),
            algorithm_type=kind.MANUAL if algorithm is None else kind.AUTOMATIC,
            algorithm_identification=identification,
        )
        for k, cls in enumerate(classes, start=1)
    ]
    with _quiet():
        return highdicom.seg.Segmentation(
            source_images=list(sources), pixel_array=mask.astype(np.uint8),
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=series_number, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="medsilo", manufacturer_model_name="medsilo",
            software_versions="medsilo", device_serial_number="none",
            series_description=f"{algorithm} segmentation" if algorithm else "expert segmentation",
        )


def _compress(ds: Dataset, pixels: np.ndarray, codec: str) -> None:
    if codec not in WRITE_SYNTAXES:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(WRITE_SYNTAXES)}")
    syntax = WRITE_SYNTAXES[codec]
    if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        return
    if syntax == JPEGBaseline8Bit:  # pydicom has no JPEG encoder: Pillow encodes, pydicom encapsulates
        from PIL import Image as PILImage
        from pydicom.encaps import encapsulate

        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline stores 8-bit pixels; use bits_stored=8")
        buf = io.BytesIO()
        PILImage.fromarray(pixels).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.LossyImageCompression = "01"
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        return
    with _quiet():
        ds.compress(syntax, arr=pixels, generate_instance_uid=False)


def dataset_bytes(ds: Any) -> bytes:
    """A dataset (e.g. from a DICOMweb retrieve) serialised as a Part 10 file."""
    buf = io.BytesIO()
    with _quiet():
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
