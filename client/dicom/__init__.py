"""DICOM objects in and out: the one package of medsilo that imports pydicom and highdicom.

- :mod:`client.dicom.read`: one file's header facts (which never leave the node) and pixels in [0, 1]
  through a viewer's display pipeline; what a file is (:func:`read_facts`); decode limits; every failure a
  :class:`Rejected` whose reason names the problem and the fix, never a value from the file.
- :mod:`client.dicom.volume`: an image series as a :class:`Volume`, and the expert masks stored on it
  (DICOM-SEG segments, RT-STRUCT contours), matched to a task's classes by name.
- :mod:`client.dicom.write`: the neutral writing primitives (a dataset from keywords and pixels, the
  transfer syntaxes medsilo encodes, DICOM-SEG, Part 10 bytes, UIDs).
- :mod:`client.dicom.results`: what a hospital's PACS stores from medsilo (a Secondary Capture of a
  prediction, a DICOM-SEG of a model's mask), in the source image's study.

The synthetic patients and scanners of the simulated archives live in ``simulations.synthetic_dicom``,
outside the hospital node; they compose :mod:`client.dicom.write`.
"""

from client.dicom.read import (
    PHI_KEYWORDS,
    RTSTRUCT_STORAGE,
    SEG_STORAGE,
    WINDOW_PRESETS,
    Facts,
    Header,
    Image,
    Limits,
    Rejected,
    read_facts,
    read_image,
)
from client.dicom.results import result_dataset, write_result, write_segmentation_result
from client.dicom.volume import Contours, Volume, match_classes, read_rtstruct, read_seg_mask, read_volume
from client.dicom.write import (
    ANATOMICAL_STRUCTURE,
    SOP_CLASSES,
    WRITE_SYNTAXES,
    build_dataset,
    dataset_bytes,
    new_uid,
    segmentation_dataset,
)

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "PHI_KEYWORDS",
    "RTSTRUCT_STORAGE",
    "SEG_STORAGE",
    "SOP_CLASSES",
    "WINDOW_PRESETS",
    "WRITE_SYNTAXES",
    "Contours",
    "Facts",
    "Header",
    "Image",
    "Limits",
    "Rejected",
    "Volume",
    "build_dataset",
    "dataset_bytes",
    "match_classes",
    "new_uid",
    "read_facts",
    "read_image",
    "read_rtstruct",
    "read_seg_mask",
    "read_volume",
    "result_dataset",
    "segmentation_dataset",
    "write_result",
    "write_segmentation_result",
]
