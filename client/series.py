"""A hospital's DICOM image series with expert masks (DICOM-SEG or RT-STRUCT), as a segmentation data source.

:class:`DicomSegmentationSource` is the hospital's :class:`common.volumes.VolumeSource`: it indexes a
folder (a PACS export), pairs every mask object with the image series it references, keeps one
segmented series per patient (the patient is the DP privacy unit) and reads a case as ``(image, mask)``
in the series' slice / row / column order. A DICOM-SEG is placed by the source image each frame
references; an RT-STRUCT's closed planar contours are filled on the slice they lie on (nested
contours of one class are holes). Everything downstream (scaling, padding, training, metrics) is the
code the NIfTI source feeds. Files that are not usable are reported with a reason and skipped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from client.dicom import (
    Contours,
    Facts,
    Limits,
    Rejected,
    Volume,
    read_facts,
    read_rtstruct,
    read_seg_mask,
    read_volume,
)
from client.ingest import find_files
from client.pacs import is_dicomweb, sync
from client.site_check import validation_mask
from common.datasets import DatasetInfo, Split
from common.errors import DataError
from common.io import atomic_write_bytes, private_dir
from common.volumes import load_records, pad_or_crop, restore_shape

log = logging.getLogger("medsilo")


@dataclass(frozen=True)
class Case:
    """One patient's segmented series: its slice files and the mask object that labels them."""

    patient_key: str
    slices: tuple[Path, ...]
    mask: Path
    mask_kind: str  # "seg" or "rtstruct"


@dataclass(frozen=True)
class Index:
    """What a folder holds for segmentation. Case names are pseudonyms; nothing here leaves the node."""

    cases: dict[str, Case]
    #: files left out, with the reason (relative path -> reason)
    rejected: dict[str, str]
    #: mask objects whose image series is not in the folder
    orphan_masks: int
    #: segmented series left out because their patient already has one (one case per patient)
    extra_series: int


def case_name(patient_key: str) -> str:
    """A stable pseudonym for a patient (the identifier itself never appears in logs or reports)."""
    return "case-" + hashlib.sha256(("medsilo-case|" + patient_key).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Scan:
    """Every file under a folder, classified from its header."""

    #: image series UID -> its slice files
    series: dict[str, list[Path]]
    #: image series UID -> the mask objects referencing it, as (kind, SOP instance UID, file)
    masks: dict[str, list[tuple[str, str, Path]]]
    #: image series UID -> the header facts of one of its slices
    facts: dict[str, Facts]
    #: files left out, with the reason (relative path -> reason)
    rejected: dict[str, str]


def scan(root: str | Path) -> Scan:
    """Classify every file under ``root`` (image slice, DICOM-SEG, RT-STRUCT) without decoding pixels.

    Raises
    ------
    DataError
        When ``root`` does not exist.

    """
    root = Path(root)
    series: dict[str, list[Path]] = defaultdict(list)
    masks: dict[str, list[tuple[str, str, Path]]] = defaultdict(list)
    facts_of: dict[str, Facts] = {}
    rejected: dict[str, str] = {}
    for path in find_files(root):
        try:
            facts = read_facts(path)
        except Rejected as exc:
            rejected[path.relative_to(root).as_posix() if path != root else path.name] = exc.reason
            continue
        if facts.kind == "image":
            series[facts.series_uid].append(path)
            facts_of.setdefault(facts.series_uid, facts)
        else:
            masks[facts.referenced_series].append((facts.kind, facts.sop_uid, path))
    return Scan(series=dict(series), masks=dict(masks), facts=facts_of, rejected=rejected)


def index_folder(root: str | Path) -> Index:
    """Classify every file under ``root`` and pair each mask with its image series.

    Raises
    ------
    DataError
        When ``root`` does not exist.

    """
    root = Path(root)
    found = scan(root)
    series, masks, facts_of = found.series, found.masks, found.facts
    cases: dict[str, Case] = {}
    extra = 0
    for uid in sorted(masks, key=lambda u: (facts_of[u].study_uid, u) if u in facts_of else ("", u)):
        if uid not in series:
            continue
        kind, _, mask = min(masks[uid], key=lambda m: (m[0] != "seg", m[1]))  # a DICOM-SEG over an RT-STRUCT
        name = case_name(facts_of[uid].patient_key)
        if name in cases:
            extra += 1
            continue
        cases[name] = Case(patient_key=facts_of[uid].patient_key, slices=tuple(sorted(series[uid])), mask=mask,
                           mask_kind=kind)
    orphans = sum(len(v) for uid, v in masks.items() if uid not in series)
    return Index(cases=cases, rejected=found.rejected, orphan_masks=orphans, extra_series=extra)


def rasterize(contours: Contours, volume: Volume) -> np.ndarray:
    """Label mask ``(slices, rows, cols)`` of ``contours`` on ``volume`` (class ``k`` is ``k``; later classes win).

    Each closed planar contour is filled on the slice it lies on: vertices snap to the nearest pixel
    centre and the pixels on or inside the polygon are filled. Of one class's contours on one slice,
    taken largest first, a contour whose inside is already filled is a hole (its inside is cleared,
    its outline kept); any other (separate, touching, or an island in a hole) adds to the structure.

    Raises
    ------
    Rejected
        When the contours are in another frame of reference, or one is not planar or lies off the slices.

    """
    if contours.frame_of_reference and volume.frame_of_reference and \
            contours.frame_of_reference != volume.frame_of_reference:
        raise Rejected("the RT-STRUCT is in another frame of reference than its image series; re-export it on them")
    n_slices, rows, cols = volume.values.shape
    gaps = np.diff(volume.positions)
    tolerance = 0.25 * float(gaps.min()) if len(gaps) else 0.5  # mm along the normal
    normal = volume.normal
    mask = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    for k, polygons in enumerate(contours.per_class, start=1):
        fills = []
        for points in polygons:
            heights = points @ normal
            z = int(np.argmin(np.abs(volume.positions - heights.mean())))
            if float(np.ptp(heights)) > tolerance or abs(volume.positions[z] - heights.mean()) > tolerance:
                raise Rejected("an RT-STRUCT contour is not on one of the series' slices (not planar, or between or "
                               "outside the slices); re-contour on the image series")
            offset = points - volume.origins[z]
            c = np.rint(offset @ volume.row_direction / volume.pixel_spacing[1])  # vertices snap to pixel centres
            r = np.rint(offset @ volume.column_direction / volume.pixel_spacing[0])
            fills.append((z, *_polygon(list(zip(c.tolist(), r.tolist(), strict=True)), rows, cols)))
        layer = np.zeros(mask.shape, dtype=bool)
        for z, filled, interior in sorted(fills, key=lambda f: -int(f[1].sum())):  # outer contours first
            if interior.any() and layer[z][interior].all():
                layer[z] &= ~interior  # inside a filled contour: a hole (its outline stays in the structure)
            else:
                layer[z] |= filled  # beside, touching or inside a hole: more of the structure
        mask[layer] = k
    return mask


def _polygon(vertices: list[tuple[float, float]], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels on or inside a polygon of ``(column, row)`` vertices, and those strictly inside its outline."""
    filled, outline = PILImage.new("1", (cols, rows)), PILImage.new("1", (cols, rows))
    ImageDraw.Draw(filled).polygon(vertices, fill=1, outline=1)
    ImageDraw.Draw(outline).polygon(vertices, outline=1)
    inside = np.asarray(filled, dtype=bool)
    return inside, inside & ~np.asarray(outline, dtype=bool)


class DicomSegmentationSource:
    """A DICOM folder's segmented series as a :class:`common.volumes.VolumeSource` (one case per patient)."""

    def __init__(self, root: str | Path, classes: Sequence[str], *, limits: Limits | None = None) -> None:
        self.root = Path(root)
        self.classes = tuple(classes)
        self.limits = limits or Limits()
        self.index = index_folder(self.root)

    def cases(self) -> list[str]:
        return sorted(self.index.cases)

    def read(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image float32, mask uint8)`` of ``case`` in the series' slice, row, column order.

        Raises
        ------
        DataError
            When the series or its mask cannot be used (the reason names the fix, never a value).

        """
        entry = self.index.cases[case]
        try:
            volume = read_volume(entry.slices, limits=self.limits)
            if entry.mask_kind == "seg":
                mask = read_seg_mask(entry.mask, volume, self.classes)
            else:
                mask = rasterize(read_rtstruct(entry.mask, self.classes), volume)
        except Rejected as exc:
            raise DataError(f"{case}: {exc.reason}") from None
        return volume.values, mask


def local_folder(source: str, state: Path | None) -> tuple[Path, list[str]]:
    """The folder to read, and the instances a DICOMweb source could not deliver this time (reasons).

    A folder is read as it is. A DICOMweb URL is mirrored into the node's spool (``<state>/pacs-spool``,
    shared with classification) first: new instances are retrieved once, instances gone from the PACS
    are removed.

    Raises
    ------
    DataError
        When a DICOMweb source has no usable state folder or cannot be searched.

    """
    if not is_dicomweb(source):
        return Path(source), []
    if state is None:
        raise DataError("a DICOMweb site needs a state folder for its spool; start the node with a state-dir")
    try:
        result = sync(source, state / "pacs-spool")
    except OSError as exc:
        raise DataError(f"the spool {state / 'pacs-spool'} cannot be written ({type(exc).__name__}); the state "
                        "folder must be a writable folder") from None
    log.info("DICOMweb: %d instance(s) listed, %d retrieved now, %d failed", result.listed, result.fetched,
             len(result.failed))
    if result.failed:
        log.warning("%d instance(s) could not be retrieved this time (first: %s)", len(result.failed),
                    result.failed[0])
    return result.folder, list(result.failed)


def _fingerprint(root: Path) -> str:
    """Changes when a file under ``root`` is added, removed, replaced or modified."""
    digest = hashlib.sha256()
    for path in find_files(root):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed while the folder was walked
            continue
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def segmentation_site(root: str | Path, info: DatasetInfo, *, val_fraction: float = 0.1,
                      cache_dir: Path | None = None) -> tuple[Split, Split]:
    """A hospital's training and validation volumes from a DICOM folder with DICOM-SEG / RT-STRUCT masks.

    Volumes go through the same scaling and padding as the catalog's (:func:`common.volumes.load_records`);
    validation takes whole patients. Unusable files and cases are logged (counts and reasons) and skipped.
    The result is kept while no file under ``root`` changes: per process, and in ``cache_dir`` (the
    node's state folder) across processes, since a deployed node starts a ClientApp process per message
    and decoding a whole PACS export each time would cost minutes per round.

    Raises
    ------
    DataError
        When no usable segmented series is found.

    """
    root = Path(root)
    return _read_site(root, info, val_fraction, _fingerprint(root), cache_dir)


_CACHE_KEYS = ("train_images", "train_masks", "train_shapes", "val_images", "val_masks", "val_shapes")


def _locked(splits: tuple[Split, Split]) -> tuple[Split, Split]:
    for split in splits:  # shared by every client object of this process
        for array in (split.images, split.labels, split.shapes):
            if array is not None:
                array.setflags(write=False)
    return splits


def _from_cache(path: Path) -> tuple[Split, Split] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("segmentation cache %s unreadable (%s); reading the DICOM folder again", path.name,
                    type(exc).__name__)
        return None
    train, val = (Split(arrays[f"{s}_images"], arrays[f"{s}_masks"].astype(np.int64), arrays[f"{s}_shapes"])
                  for s in ("train", "val"))
    return _locked((train, val))


def _to_cache(path: Path, splits: tuple[Split, Split], *, prefix: str) -> None:
    """Write the records to ``path`` and remove this dataset's (``prefix``) older cache files."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {}
    for name, split in zip(("train", "val"), splits, strict=True):
        arrays |= {f"{name}_images": split.images, f"{name}_masks": split.labels.astype(np.uint8),
                   f"{name}_shapes": split.shapes}
    np.savez(buffer, allow_pickle=False, **arrays)
    try:
        private_dir(path.parent)  # patient images: the node's eyes only (folder 0700, file 0600)
        atomic_write_bytes(path, buffer.getvalue())
        for stale in path.parent.glob(f"{prefix}-*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("segmentation cache not written (%s); the folder will be read again next time",
                    type(exc).__name__)


@functools.lru_cache(maxsize=2)
def _read_site(root: Path, info: DatasetInfo, val_fraction: float, fingerprint: str,
               cache_dir: Path | None) -> tuple[Split, Split]:
    assert info.volume_shape is not None
    key = hashlib.sha256(f"{fingerprint}|{info.volume_shape}|{info.labels}|{val_fraction}|1".encode()).hexdigest()
    cached = None if cache_dir is None else cache_dir / f"{info.name}-{key[:32]}.npz"
    if cached is not None and cached.is_file():
        splits = _from_cache(cached)
        if splits is not None:
            log.info("%d training and %d validation volume(s) from the node's cache of the DICOM folder",
                     len(splits[0]), len(splits[1]))
            return splits
    source = DicomSegmentationSource(root, info.labels)
    skipped: dict[str, str] = {}
    cases = source.cases()
    images, masks, shapes = load_records(source, cases, info.volume_shape, skipped=skipped)
    kept = [c for c in cases if c not in skipped]
    index = source.index
    for case, reason in sorted(skipped.items()):
        log.warning("skipped %s", reason if reason.startswith(case) else f"{case}: {reason}")
    for reason, count in sorted(Counter(index.rejected.values()).items()):
        log.info("%d file(s) left out: %s", count, reason)
    log.info(
        "%d segmented series read (%d skipped); %d mask object(s) without their series in the folder; "
        "%d further series of patients that already have one", len(kept), len(skipped), index.orphan_masks,
        index.extra_series,
    )
    if not kept:
        raise DataError(
            f"no usable image series with a DICOM-SEG or RT-STRUCT mask under {root} ({len(cases)} found, "
            f"{len(index.rejected)} file(s) left out); export each segmented series together with its mask object"
        )
    val = validation_mask([index.cases[c].patient_key for c in kept], val_fraction=val_fraction)
    labels = masks.astype(np.int64)
    splits = Split(images[~val], labels[~val], shapes[~val]), Split(images[val], labels[val], shapes[val])
    if cached is not None:
        _to_cache(cached, splits, prefix=info.name)
    return _locked(splits)


@dataclass(frozen=True)
class CaseReport:
    """What the pre-flight found for one case (a pseudonym; no identifier, UID or value from the files)."""

    case: str
    mask: str  # "seg" or "rtstruct"
    slices: int
    shape: tuple[int, ...] = ()
    voxels: dict[str, int] | None = None  # per class
    lost_voxels: int = 0  # mask voxels outside the task's volume shape (cropped away)
    problem: str = ""


@dataclass(frozen=True)
class SegmentationCheck:
    """``medsilo site check`` for a segmentation folder: what a node would train on, and what it would skip."""

    source: str
    task_shape: tuple[int, ...]
    cases: tuple[CaseReport, ...]
    index: Index
    #: DICOMweb: reasons of the instances that could not be retrieved (their series may be incomplete)
    retrieval_failures: tuple[str, ...] = ()

    @property
    def usable(self) -> list[CaseReport]:
        return [c for c in self.cases if not c.problem]

    @property
    def errors(self) -> list[str]:
        if not self.usable:
            return ["no usable image series with a DICOM-SEG or RT-STRUCT mask: export each segmented series "
                    "together with its mask object"]
        return []

    @property
    def warnings(self) -> list[str]:
        out = [f"{c.case}: skipped: {c.problem}" for c in self.cases if c.problem]
        out += [f"{c.case}: {c.lost_voxels} mask voxel(s) lie outside the task's {'x'.join(map(str, self.task_shape))}"
                " volume and are cropped away; crop the series around the structure before export"
                for c in self.usable if c.lost_voxels]
        if self.index.orphan_masks:
            out.append(f"{self.index.orphan_masks} mask object(s) reference an image series that is not in the folder")
        if self.retrieval_failures:
            out.append(f"{len(self.retrieval_failures)} instance(s) could not be retrieved from the PACS this time "
                       f"({self.retrieval_failures[0]}); a series without its first or last slices looks complete: "
                       "run the check again")
        if self.index.extra_series:
            out.append(f"{self.index.extra_series} further segmented series of patients that already have one are "
                       "not used (one volume per patient: the patient is the privacy unit)")
        return out

    @property
    def ready(self) -> bool:
        return not self.errors

    def table(self) -> str:
        lines = [f"segmentation source {self.source}: {len(self.usable)} usable case(s) of {len(self.cases)}, "
                 f"{len(self.index.rejected)} file(s) left out"]
        lines.append(f"{'case':24s} {'mask':9s} {'slices':>6s} {'shape':>14s}  voxels per class")
        for c in self.cases:
            shape = "x".join(map(str, c.shape)) if c.shape else "-"
            voxels = ", ".join(f"{k} {v}" for k, v in (c.voxels or {}).items()) or c.problem
            lines.append(f"{c.case:24s} {c.mask:9s} {c.slices:6d} {shape:>14s}  {voxels}")
        lines += [f"left out ({n} file(s)): {reason}"
                  for reason, n in sorted(Counter(self.index.rejected.values()).items())]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"ERROR: {e}" for e in self.errors]
        lines.append("ready: the node can train on this folder" if self.ready else "NOT READY")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source, "ready": self.ready, "task_shape": list(self.task_shape),
            "cases": [{**c.__dict__, "shape": list(c.shape)} for c in self.cases],
            "rejected_files": self.index.rejected, "orphan_masks": self.index.orphan_masks,
            "extra_series": self.index.extra_series, "errors": self.errors, "warnings": self.warnings,
        }


def check_folder(root: str | Path, info: DatasetInfo, *, source: str | None = None,
                 retrieval_failures: Sequence[str] = ()) -> SegmentationCheck:
    """Read every case of ``root`` as the node would and report per case (``medsilo site check``).

    ``source`` names what was checked (a DICOMweb URL whose spool ``root`` is); ``retrieval_failures``
    are the instances that URL could not deliver.
    """
    assert info.volume_shape is not None
    volumes = DicomSegmentationSource(root, info.labels)
    reports = []
    for case in volumes.cases():
        entry = volumes.index.cases[case]
        base = CaseReport(case=case, mask=entry.mask_kind, slices=len(entry.slices))
        try:
            _, mask = volumes.read(case)
        except DataError as exc:
            reports.append(replace(base, problem=str(exc).removeprefix(f"{case}: ")))
            continue
        kept = restore_shape(pad_or_crop(mask, info.volume_shape), mask.shape)
        reports.append(replace(
            base, shape=tuple(mask.shape),
            voxels={c: int((mask == k).sum()) for k, c in enumerate(info.labels, start=1)},
            lost_voxels=int((mask > 0).sum() - (kept > 0).sum()),
        ))
    return SegmentationCheck(source=source or str(root), task_shape=tuple(info.volume_shape), cases=tuple(reports),
                             index=volumes.index, retrieval_failures=tuple(retrieval_failures))
