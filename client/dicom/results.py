"""What a hospital's PACS stores from medsilo: results written as DICOM in the source study.

A classification result is a Secondary Capture of the Grad-CAM overlay (:func:`write_result`); a
segmentation result is a DICOM-SEG on the source series (:func:`write_segmentation_result`). Both copy the
patient and study modules of their source, so they stay inside the hospital with the images they describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.dicom.read import Rejected, _dcmread, _quiet
from client.dicom.volume import Volume
from client.dicom.write import (
    ANATOMICAL_STRUCTURE,
    SOP_CLASSES,
    build_dataset,
    dataset_bytes,
    new_uid,
    segmentation_dataset,
)

#: Patient and General Study module attributes copied from the source image, so the PACS files the result
#: with the patient's study (the result stays inside the hospital).
_PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


def result_dataset(
    source_path: str | Path, overlay_rgb: np.ndarray, *, label: str, probabilities: dict[str, float],
    model_name: str = "medsilo",
) -> Dataset:
    """A Secondary Capture of ``overlay_rgb`` (uint8 ``(rows, cols, 3)``) in the source image's study.

    The patient and study attributes come from the source file; the result gets a new series and instance,
    references the source image, and carries the predicted label and probabilities in its comments.

    Raises
    ------
    Rejected
        When the source file cannot be read as DICOM.

    """
    with _quiet():
        try:
            src = pydicom.dcmread(source_path, stop_before_pixels=True)
        except Exception as exc:
            raise Rejected(f"source image unreadable ({type(exc).__name__}); results need the DICOM source") from None
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError(f"overlay must be uint8 (rows, cols, 3), got {overlay_rgb.dtype} {overlay_rgb.shape}")
    attributes: dict[str, Any] = {"SpecificCharacterSet": src.get("SpecificCharacterSet", "ISO_IR 100")}
    attributes |= {keyword: src.get(keyword) for keyword in _PATIENT_STUDY if keyword in src}
    attributes.setdefault("StudyInstanceUID", new_uid())
    probs = ", ".join(f"{k}={v:.4f}" for k, v in probabilities.items())
    attributes |= {
        "SeriesInstanceUID": new_uid(),
        "Modality": "OT",
        "SeriesNumber": 9901,
        "InstanceNumber": 1,
        "SeriesDescription": f"{model_name} Grad-CAM",
        "ConversionType": "WSD",  # workstation
        "Manufacturer": "medsilo",
        "ImageType": ["DERIVED", "SECONDARY"],
        "DerivationDescription": "Grad-CAM heatmap of a federated model's prediction, overlaid on the source image",
        "SourceImageSequence": [{"ReferencedSOPClassUID": src.get("SOPClassUID", ""),
                                 "ReferencedSOPInstanceUID": src.get("SOPInstanceUID", "")}],
        "ImageComments": f"Predicted {label} ({probs}). Research use only: not for diagnostic use."[:10240],
        "BurnedInAnnotation": "NO",
        "Rows": int(overlay_rgb.shape[0]),
        "Columns": int(overlay_rgb.shape[1]),
        "SamplesPerPixel": 3,
        "PhotometricInterpretation": "RGB",
        "PlanarConfiguration": 0,
        "BitsAllocated": 8,
        "BitsStored": 8,
        "HighBit": 7,
        "PixelRepresentation": 0,
    }
    return build_dataset(SOP_CLASSES["OT"], attributes, pixels=np.ascontiguousarray(overlay_rgb))


def write_result(record: Any, prediction: Any, overlay_rgb: np.ndarray, out_dir: str | Path) -> Path:
    """Write the prediction for ``record`` (read from a DICOM file) as a Secondary Capture in ``out_dir``.

    ``record.path`` is the source file; ``prediction.label`` and ``prediction.probabilities`` the result.
    """
    from common.io import atomic_write_bytes  # the writer is the only side effect here

    ds = result_dataset(record.path, overlay_rgb, label=str(prediction.label),
                        probabilities=dict(prediction.probabilities))
    target = Path(out_dir) / f"{Path(record.path).stem}-medsilo-sc.dcm"
    atomic_write_bytes(target, dataset_bytes(ds))
    return target


def write_segmentation_result(
    volume: Volume, mask: np.ndarray, classes: Sequence[str], out_dir: str | Path, *, name: str, algorithm: str,
    structure: tuple[str, str, str] = ANATOMICAL_STRUCTURE,
) -> Path:
    """Write a model's label mask on ``volume`` as a DICOM-SEG ``out_dir/<name>-medsilo-seg.dcm``.

    The SEG belongs to the source series' patient and study, references every source slice, and marks its
    segments as automatic, produced by ``algorithm`` (a PACS files it with the images it outlines).

    Raises
    ------
    Rejected
        When a source slice can no longer be read.

    """
    from common.io import atomic_write_bytes  # the writer is the only side effect here

    with _quiet():
        sources = [_dcmread(path, stop_before_pixels=True) for path in volume.files]
    try:
        ds = segmentation_dataset(sources, mask, classes, structure=structure, algorithm=algorithm)
    except Exception as exc:
        raise Rejected(
            f"a DICOM-SEG cannot be built on this series ({type(exc).__name__}): it copies the patient and study "
            "modules and needs a Frame of Reference UID; de-identified series may lack them (use the .npy mask)"
        ) from None
    target = Path(out_dir) / f"{name}-medsilo-seg.dcm"
    atomic_write_bytes(target, dataset_bytes(ds))
    return target
