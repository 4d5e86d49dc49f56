"""Image series as volumes and the masks a hospital stores on them (DICOM-SEG, RT-STRUCT contours).

Every failure becomes :class:`~client.dicom.read.Rejected` with a reason that names the problem and the
fix, never a value read from the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from client.dicom.read import (
    RTSTRUCT_STORAGE,
    Limits,
    Rejected,
    _dcmread,
    _header,
    _modality_values,
    _pixels,
    _quiet,
    _str,
)

#: :func:`read_volume`'s decode limits unless the caller passes its own.
_DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Volume:
    """An image series as one volume, slices in order of their position along the slice normal.

    ``values`` is float32 ``(slices, rows, cols)`` in modality units (the Modality LUT applied, no
    display window). The geometry places a point in patient coordinates (mm) on a voxel.
    """

    values: np.ndarray
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]  # the slice files, in slice order
    frame_of_reference: str
    origins: np.ndarray  # (slices, 3): each slice's Image Position (Patient)
    row_direction: np.ndarray  # (3,): direction of increasing column index
    column_direction: np.ndarray  # (3,): direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    positions: np.ndarray  # (slices,): position along the slice normal, increasing

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds.get(keyword) or []], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise Rejected(f"{keyword} is missing or malformed; a slice needs its geometry for a mask to be placed on it")
    return values


def read_volume(paths: Sequence[str | Path], *, limits: Limits = _DEFAULT_LIMITS) -> Volume:
    """Read the single-frame grayscale slices of one series into a :class:`Volume`.

    Raises
    ------
    Rejected
        When a slice cannot be decoded, lacks geometry, or the slices disagree on matrix, orientation,
        spacing or frame of reference, or two share a position (a mask could not be placed).

    """
    slices = []
    with _quiet():
        for path in paths:
            ds = _dcmread(path)
            header = _header(ds, limits)
            if header.frames != 1 or header.samples != 1:
                raise Rejected("segmentation reads single-frame grayscale slices; convert enhanced multi-frame or "
                               "colour series to classic single-frame images")
            orientation = _floats(ds, "ImageOrientationPatient", 6)
            geometry = (header.rows, header.columns, *orientation.round(4), *_floats(ds, "PixelSpacing", 2).round(4),
                        _str(ds, "FrameOfReferenceUID"))
            origin = _floats(ds, "ImagePositionPatient", 3)
            if not header.positions:  # _slice_positions found no slice normal (degenerate orientation)
                raise Rejected("ImageOrientationPatient does not span a plane; fix the header or re-export the series")
            values = _modality_values(ds, _pixels(ds, header))
            slices.append((header.positions[0], header.sop_uid, origin, geometry, values, Path(path)))
    if not slices:
        raise Rejected("an image series without slices; re-send the series from the PACS")
    if len({s[3] for s in slices}) != 1:
        raise Rejected("the series' slices differ in matrix size, orientation, pixel spacing or frame of reference; "
                       "a segmentation needs one regular stack (split or resample the series)")
    slices.sort(key=lambda s: s[0])
    positions = np.asarray([s[0] for s in slices])
    gaps = np.diff(positions)
    if len(gaps) and gaps.min() < 1e-3:
        raise Rejected("two slices of the series share a position (duplicate instances or several stacks); "
                       "remove the duplicates or split the series")
    if len(gaps) > 1 and gaps.max() > 1.5 * float(np.median(gaps)):
        raise Rejected("the series has a gap of more than 1.5 slice spacings (a slice is missing or unreadable); "
                       "re-send the complete series")
    geometry = slices[0][3]
    return Volume(
        values=np.stack([s[4] for s in slices]).astype(np.float32, copy=False),
        sop_uids=tuple(s[1] for s in slices),
        files=tuple(s[5] for s in slices),
        frame_of_reference=str(geometry[-1]),
        origins=np.stack([s[2] for s in slices]),
        row_direction=np.asarray(geometry[2:5], dtype=np.float64),
        column_direction=np.asarray(geometry[5:8], dtype=np.float64),
        pixel_spacing=(float(geometry[8]), float(geometry[9])),
        positions=positions,
    )


def _number(item: Dataset, keyword: str, what: str) -> int:
    """An integer attribute of a sequence item (Segment Number, ROI Number), or :class:`Rejected`."""
    try:
        return int(item.get(keyword))
    except (TypeError, ValueError):
        raise Rejected(f"{what} has a missing or non-integer {keyword}; re-export it") from None


def _normalise(name: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def match_classes(names: Mapping[int, str], classes: Sequence[str], *, what: str) -> list[int]:
    """The segment (or ROI) numbers of ``classes``, in class order, matched by name.

    A name matches a class when, ignoring case and punctuation, it equals the class or contains it as
    whole words (``"Anterior hippocampus"`` is ``anterior``). Names matching no class are ignored.

    Raises
    ------
    Rejected
        When a class has no segment or several; the reason names the class, never the file's labels.

    """
    normal = {number: _normalise(name) for number, name in names.items()}
    out = []
    for cls in classes:
        key = _normalise(cls)
        exact = [n for n, name in normal.items() if name == key]
        found = exact or [n for n, name in normal.items() if f" {key} " in f" {name} "]
        if len(found) != 1:
            problem = "no segment" if not found else f"{len(found)} segments"
            raise Rejected(
                f"{what} has {problem} named after the class '{cls}' (segments are matched to the task's classes "
                f"{', '.join(classes)} by name); label exactly one segment per class"
            )
        out.append(found[0])
    return out


def read_seg_mask(path: str | Path, volume: Volume, classes: Sequence[str]) -> np.ndarray:
    """A DICOM-SEG's segments as a label mask on ``volume``: uint8 ``(slices, rows, cols)``, class ``k`` is ``k``.

    Segments are matched to ``classes`` by name (:func:`match_classes`); frames are placed by the source
    image each references (highdicom), and a slice the SEG does not mention is background.

    Raises
    ------
    Rejected
        When the SEG cannot be read, lacks a class, its segments overlap, or its frames do not reference
        the series' images.

    """
    import highdicom

    with _quiet():
        try:
            seg = highdicom.seg.segread(path)
        except Exception as exc:
            raise Rejected(f"malformed DICOM-SEG ({type(exc).__name__}); re-export the segmentation") from None
        labels = {_number(item, "SegmentNumber", "the DICOM-SEG"): _str(item, "SegmentLabel")
                  for item in seg.get("SegmentSequence") or []}
        numbers = match_classes(labels, classes, what="the DICOM-SEG")
        try:
            referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
        except Exception as exc:
            raise Rejected(f"the DICOM-SEG's source image references are malformed ({type(exc).__name__}); "
                           "re-export it") from None
        outside = referenced - set(volume.sop_uids)
        if not referenced or outside:
            raise Rejected(
                f"the DICOM-SEG references {len(outside)} of its {len(referenced)} source image(s) that are not "
                "slices of the series read; send the complete series with its segmentation"
            )
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(volume.sop_uids), segment_numbers=numbers, combine_segments=True,
                relabel=True, assert_missing_frames_are_empty=True,
            )
        except Exception as exc:
            raise Rejected(
                f"the DICOM-SEG cannot be placed on its image series ({type(exc).__name__}): its frames must reference "
                "the series' images (Source Image Sequence) and its class segments must not overlap; re-export it"
            ) from None
    mask = np.asarray(pixels).astype(np.uint8)
    if mask.shape != volume.values.shape:
        raise Rejected("the DICOM-SEG's frames differ in size from the series' slices; re-export it on the series")
    return mask


@dataclass(frozen=True)
class Contours:
    """An RT-STRUCT's closed planar contours per class: ``(points, 3)`` arrays in patient coordinates (mm)."""

    frame_of_reference: str
    per_class: tuple[tuple[np.ndarray, ...], ...]


def read_rtstruct(path: str | Path, classes: Sequence[str]) -> Contours:
    """The closed planar contours of the ROIs named after ``classes`` (:func:`match_classes`).

    Raises
    ------
    Rejected
        When the file is not a readable RT-STRUCT, lacks a class, or a class's ROI has no closed contour.

    """
    with _quiet():
        ds = _dcmread(path)
        if UID(_str(ds, "SOPClassUID")) != RTSTRUCT_STORAGE:
            raise Rejected("not an RT Structure Set; masks come from DICOM-SEG or RT-STRUCT objects")
        rois = {_number(item, "ROINumber", "the RT-STRUCT"): item for item in ds.get("StructureSetROISequence") or []}
        numbers = match_classes({n: _str(item, "ROIName") for n, item in rois.items()}, classes, what="the RT-STRUCT")
        contours = {_number(item, "ReferencedROINumber", "the RT-STRUCT"): item.get("ContourSequence") or []
                    for item in ds.get("ROIContourSequence") or []}
        frames = {_str(rois[n], "ReferencedFrameOfReferenceUID") for n in numbers} - {""}
        if len(frames) > 1:
            raise Rejected("the RT-STRUCT's class ROIs lie in different frames of reference; export them on one series")
        per_class = []
        for cls, number in zip(classes, numbers, strict=True):
            polygons = []
            for contour in contours.get(number, []):
                if _str(contour, "ContourGeometricType").upper() != "CLOSED_PLANAR":
                    continue  # points and open polylines enclose nothing
                try:
                    points = np.asarray([float(v) for v in contour.get("ContourData") or []], dtype=np.float64)
                except (TypeError, ValueError):
                    points = np.zeros(1)
                if points.size < 9 or points.size % 3 or not np.isfinite(points).all():
                    raise Rejected(f"a contour of class '{cls}' has malformed Contour Data (x, y, z triplets, at least "
                                   "three points); re-export the structure set")
                polygons.append(points.reshape(-1, 3))
            if not polygons:
                raise Rejected(f"the RT-STRUCT's ROI for class '{cls}' has no closed planar contour; "
                               "contour the structure or export it as a DICOM-SEG")
            per_class.append(tuple(polygons))
    return Contours(frame_of_reference=frames.pop() if frames else "", per_class=tuple(per_class))


