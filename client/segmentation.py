"""Segmentation at the hospital with an exported model: label masks, structure volumes, DICOM-SEG results.

``medsilo predict --model BUNDLE INPUTS`` with a segmentation bundle reads each input volume (a NIfTI file,
or every image series in a DICOM folder), prepares it exactly as the sites trained (per-volume percentile
scaling to 8 bits, centre padding or cropping to the card's ``volume_shape``), labels every voxel with the
most probable class, and maps the mask back to the input's own shape. It writes, per volume:

- NIfTI input: ``<name>-seg.nii.gz`` with the input's affine (label ``k`` is the card's class ``k``);
- DICOM input: ``<name>-seg.npy``, and with ``--dicom-out`` a DICOM-SEG ``<name>-medsilo-seg.dcm`` in the
  source series' study, marked as an automatic segmentation by the model;

plus ``predictions.json`` with each structure's volume (mL, from the voxel spacing). Arrays keep the input's
axis order (DICOM: slice, row, column), which must match the volumes the model was trained on: no
reorientation or resampling is done. A series that cannot be read is reported and skipped.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.dicom import Rejected, Volume, read_volume, write_segmentation_result
from client.inference import ExportedModel
from client.series import scan
from common.errors import ConfigError, DataError
from common.io import atomic_write_bytes, atomic_write_json
from common.volumes import restore_shape, volume_record

log = logging.getLogger("medsilo")

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class VolumeInput:
    """One volume to segment: its values, the size of a voxel, and where it came from."""

    name: str
    values: np.ndarray  # float32 (D, H, W)
    voxel_ml: float | None
    path: Path
    #: DICOM input: the series read as a volume (for the DICOM-SEG result)
    series: Volume | None = None
    #: NIfTI input: the image's affine (for the NIfTI result)
    affine: np.ndarray | None = None


@dataclass
class VolumePrediction:
    """What ``predict`` found for one volume."""

    input: str
    shape: list[int]
    volumes_ml: dict[str, float] | None  # None when the voxel size is not known (a single slice)
    voxels: dict[str, int]
    written: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _nifti(path: Path) -> VolumeInput:
    import nibabel

    try:
        image: Any = nibabel.load(path)
        values = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI image ({type(exc).__name__}); re-export it") from None
    if values.ndim != 3:
        raise DataError(f"{path}: a {values.ndim}D image; segmentation needs one 3D volume per file")
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    name = path.name[: -len(next(s for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)))]
    return VolumeInput(name=name, values=values, voxel_ml=float(np.prod(zooms)) / 1000.0, path=path,
                       affine=np.asarray(image.affine))


def _voxel_ml(volume: Volume) -> float | None:
    """A voxel's volume in mL; ``None`` for a single slice (no slice spacing to measure)."""
    gaps = np.diff(volume.positions)
    if not len(gaps):
        return None
    return volume.pixel_spacing[0] * volume.pixel_spacing[1] * float(np.median(gaps)) / 1000.0


def find_volumes(paths: Sequence[str | Path]) -> tuple[list[VolumeInput], list[str]]:
    """Every volume among ``paths`` and the reasons for those that could not be read.

    A NIfTI file is one volume; a folder gives each DICOM image series in it (named ``<folder>-<k>``,
    never by UID) and each NIfTI file under it. Unreadable volumes are skipped with their reason; an input
    given twice is read once, and inputs named alike get ``-2``, ``-3`` suffixes.

    Raises
    ------
    ConfigError
        Every missing path or unknown file type at once.
    DataError
        When no volume is found.

    """
    found: list[VolumeInput] = []
    skipped: list[str] = []
    problems: list[str] = []
    seen_files: set[Path] = set()
    seen_series: set[str] = set()
    names: set[str] = set()

    def unique(name: str) -> str:  # two inputs named alike must not overwrite each other's results
        candidate, k = name, 1
        while candidate in names:
            k += 1
            candidate = f"{name}-{k}"
        names.add(candidate)
        return candidate

    def add_nifti(path: Path) -> None:
        if path.resolve() in seen_files:
            return
        seen_files.add(path.resolve())
        try:
            item = _nifti(path)
        except DataError as exc:
            skipped.append(str(exc))
            return
        found.append(replace(item, name=unique(item.name)))

    for raw in paths:
        path = Path(raw)
        if path.is_file() and _is_nifti(path):
            add_nifti(path)
        elif path.is_dir():
            for nifti in sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p)):
                add_nifti(nifti)
            series = scan(path).series
            for k, uid in enumerate(sorted(series, key=lambda u: sorted(series[u])[0]), start=1):
                if uid in seen_series:
                    continue
                seen_series.add(uid)
                name = unique(f"{path.name}-{k}")
                try:
                    volume = read_volume(series[uid])
                except Rejected as exc:
                    skipped.append(f"{name}: {exc.reason}")
                    continue
                found.append(VolumeInput(name=name, values=volume.values, voxel_ml=_voxel_ml(volume), path=path,
                                         series=volume))
        elif path.is_file():
            problems.append(f"{path}: give a NIfTI file (.nii, .nii.gz) or a folder of DICOM series")
        else:
            problems.append(f"{path}: no such file or folder")
    if problems:
        raise ConfigError(problems)
    if not found:
        raise DataError(f"no volume found in {', '.join(map(str, paths))}" +
                        (f" ({len(skipped)} series could not be read: {skipped[0]})" if skipped else ""))
    return found, skipped


def segment(model: ExportedModel, values: np.ndarray) -> np.ndarray:
    """The label mask (uint8, the shape of ``values``): as trained, most probable class per voxel."""
    shape = model.card.preprocessing.volume_shape
    if not shape:
        raise DataError(f"{model.card.name} is not a segmentation model (its card has no volume_shape)")
    if not np.isfinite(values).all():
        raise DataError("the volume has non-finite values (NaN or infinity); fix its scaling before segmenting it")
    x = volume_record(values, shape).astype(np.float32) / 127.5 - 1.0
    labels = np.argmax(model.logits(x[None, None]), axis=1)[0].astype(np.uint8)
    return restore_shape(labels, values.shape)


def predict_volumes(model: ExportedModel, volumes: Sequence[VolumeInput], out_dir: str | Path, *,
                    dicom_out: bool = False) -> list[VolumePrediction]:
    """Segment every volume, write the masks (and DICOM-SEGs) and ``predictions.json`` into ``out_dir``.

    A volume that cannot be segmented or written is recorded with its reason in ``predictions.json``.

    Raises
    ------
    ConfigError
        When ``out_dir`` is a file.

    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--out {out} is a file; give a folder for the masks and predictions.json"])
    classes = model.card.classes
    results = []
    for item in volumes:
        label = f"{item.path}" if item.series is None else item.name
        try:
            results.append(_predict_one(model, item, label, out, dicom_out=dicom_out))
        except (DataError, OSError) as exc:  # one volume's problem never stops the others
            reason = str(exc) if isinstance(exc, DataError) else \
                f"its result could not be written ({type(exc).__name__})"
            log.warning("%s: %s", item.name, reason)
            results.append(VolumePrediction(input=label, shape=list(item.values.shape), volumes_ml=None, voxels={},
                                            problems=[reason]))
    atomic_write_json(out / "predictions.json", {
        "model": model.card.name, "task": "segmentation", "classes": classes,
        "predictions": [asdict(r) for r in results],
    })
    return results


def _predict_one(model: ExportedModel, item: VolumeInput, label: str, out: Path, *,
                 dicom_out: bool) -> VolumePrediction:
    classes = model.card.classes
    mask = segment(model, item.values)
    voxels = {c: int((mask == k).sum()) for k, c in enumerate(classes, start=1)}
    result = VolumePrediction(input=label, shape=list(mask.shape), voxels=voxels,
                              volumes_ml=None if item.voxel_ml is None else
                              {c: round(v * item.voxel_ml, 4) for c, v in voxels.items()})
    if item.affine is not None:
        import nibabel

        target = out / f"{item.name}-seg.nii.gz"
        atomic_write_bytes(target, gzip.compress(nibabel.Nifti1Image(mask, item.affine).to_bytes()))
        result.written.append(str(target))
    if item.series is not None:
        target = out / f"{item.name}-seg.npy"
        atomic_write_bytes(target, _npy(mask))
        result.written.append(str(target))
        if dicom_out:
            try:
                seg = write_segmentation_result(item.series, mask, classes, out, name=item.name,
                                                algorithm=model.card.name)
            except Rejected as exc:
                log.warning("%s: no DICOM-SEG written: %s", item.name, exc.reason)
                result.problems.append(f"no DICOM-SEG: {exc.reason}")
            else:
                result.written.append(str(seg))
    return result


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
