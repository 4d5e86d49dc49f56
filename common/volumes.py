"""Labeled image volumes behind a data-source interface: reading, intensity scaling, padding and cropping.

A :class:`VolumeSource` lists cases and reads one ``(image, mask)`` pair per case; the Medical
Segmentation Decathlon's NIfTI layout is :class:`NiftiSource` (read with nibabel). A hospital's DICOM
series with DICOM-SEG or RT-STRUCT masks plugs in as another source with the same two methods; nothing
downstream knows the file format.

Every volume becomes a fixed-shape record: intensities scaled per volume to uint8 (robust min-max over
the 0.5-99.5th percentiles, the same scale the MedMNIST images use), then centre-padded (background) or
centre-cropped to the dataset's shape. :func:`restore_shape` undoes the padding and cropping of a
prediction (cropped-away voxels are predicted background), so metrics are computed on whole volumes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from common.errors import DataError

#: Fixed seed of the labeled-volume split: the same train / validation / test cases on every run.
SPLIT_SEED = 20190209
#: Fixed seed of the public share of a training split (:func:`public_indices`), independent of ``--seed`` too.
PUBLIC_SEED = 20190210


class VolumeSource(Protocol):
    """Where labeled volumes come from (NIfTI files today; DICOM series with SEG/RT-STRUCT at a hospital)."""

    def cases(self) -> list[str]:
        """Identifiers of the labeled cases, one per patient, in a stable order."""
        ...

    def read(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image float32, mask uint8)`` of ``case``, same 3D shape, labels 0 (background) .. K."""
        ...


@dataclass(frozen=True)
class NiftiSource:
    """Decathlon layout: ``dataset.json`` listing ``imagesTr/*.nii.gz`` with ``labelsTr/*.nii.gz``."""

    root: Path

    def _entries(self) -> list[dict[str, str]]:
        path = self.root / "dataset.json"
        if not path.is_file():
            raise DataError(f"{path} not found; expected a Medical Segmentation Decathlon task folder")
        return list(json.loads(path.read_text())["training"])

    def cases(self) -> list[str]:
        return sorted(Path(e["image"]).name.removesuffix(".nii.gz") for e in self._entries())

    def read(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        import nibabel

        image_path = self.root / "imagesTr" / f"{case}.nii.gz"
        label_path = self.root / "labelsTr" / f"{case}.nii.gz"
        for path in (image_path, label_path):
            if not path.is_file():
                raise DataError(f"{path} not found; the task folder lacks a file dataset.json lists")
        image = np.asarray(cast(Any, nibabel.load(image_path)).dataobj, dtype=np.float32)
        mask = np.asarray(cast(Any, nibabel.load(label_path)).dataobj).astype(np.uint8)
        if image.shape != mask.shape:
            raise DataError(f"{case}: image shape {image.shape} differs from mask shape {mask.shape}")
        return image, mask


def scale_intensity(image: np.ndarray, *, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """uint8 image from per-volume percentiles ``low``..``high`` (MRI has no absolute intensity scale)."""
    lo, hi = np.percentile(image, [low, high])
    scaled = (np.clip(image, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    return (scaled * 255).round().astype(np.uint8)


def _window(size: int, target: int) -> tuple[slice, slice]:
    """Source and destination slices that centre a length ``size`` in a length ``target``."""
    if size <= target:
        start = (target - size) // 2
        return slice(0, size), slice(start, start + size)
    start = (size - target) // 2
    return slice(start, start + target), slice(0, target)


def pad_or_crop(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre ``volume`` in ``shape``: zero padding where it is smaller, a centre crop where larger."""
    out = np.zeros(tuple(shape), dtype=volume.dtype)
    windows = [_window(s, t) for s, t in zip(volume.shape, shape, strict=True)]
    out[tuple(w[1] for w in windows)] = volume[tuple(w[0] for w in windows)]
    return out


def restore_shape(volume: np.ndarray, original: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pad_or_crop` for a prediction: back to ``original`` (cropped-away voxels are 0)."""
    return pad_or_crop(volume, original)


def to_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The slices of a volume along its first axis (what the slice-wise model sees one at a time)."""
    return [volume[i] for i in range(volume.shape[0])]


def from_slices(slices: Sequence[np.ndarray]) -> np.ndarray:
    """Reassemble slices (first axis) into the volume :func:`to_slices` took apart."""
    return np.stack(list(slices), axis=0)


def seeded_split(cases: Sequence[str], counts: tuple[int, int, int]) -> tuple[list[str], list[str], list[str]]:
    """Train / validation / test cases: a permutation with :data:`SPLIT_SEED` of the sorted case list.

    Independent of the run's ``--seed``, so the test volumes never change between runs.
    """
    ordered = sorted(cases)
    if sum(counts) != len(ordered):
        raise DataError(f"the split needs {sum(counts)} labeled cases {counts}, found {len(ordered)}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(ordered))
    picked = [ordered[i] for i in perm]
    n_train, n_val, _ = counts
    return picked[:n_train], picked[n_train : n_train + n_val], picked[n_train + n_val :]


def public_indices(n_train: int, n_public: int) -> np.ndarray:
    """Sorted indices of the ``n_public`` training records a federation declares public: a seeded subset.

    The same records on every run (:data:`PUBLIC_SEED`, independent of ``--seed``): ``medsilo pretrain`` trains on
    them without DP, and no site is given any of them. The validation and test splits are never touched.

    Raises
    ------
    DataError
        When ``n_public`` is negative or leaves no training record for the sites.

    """
    if not 0 <= n_public < n_train:
        raise DataError(f"public-records={n_public}: the training split has {n_train} records; declare between 0 "
                        f"and {n_train - 1} of them public (the sites need the rest)")
    return np.sort(np.random.default_rng(PUBLIC_SEED).permutation(n_train)[:n_public])


def volume_record(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The fixed-shape uint8 record of one volume, as training, evaluation and inference all see it."""
    return pad_or_crop(scale_intensity(image), shape)


def load_records(
    source: VolumeSource, cases: Sequence[str], shape: Sequence[int], *, skipped: dict[str, str] | None = None
) -> tuple[np.ndarray, ...]:
    """Fixed-shape uint8 images and masks ``(N, *shape)`` and each case's original shape ``(N, 3)``.

    With ``skipped``, a case whose read raises :class:`DataError` is left out and its reason recorded
    there (a hospital's one bad series must not stop the node); without, the error propagates.
    """
    images, masks, shapes = [], [], []
    for case in cases:
        try:
            image, mask = source.read(case)
        except DataError as exc:
            if skipped is None:
                raise
            skipped[case] = str(exc)
            continue
        images.append(volume_record(image, shape))
        masks.append(pad_or_crop(mask, shape))
        shapes.append(image.shape)
    if not images:
        empty = np.zeros((0, *shape), dtype=np.uint8)
        return empty, empty.copy(), np.zeros((0, 3), dtype=np.int64)
    return np.stack(images), np.stack(masks), np.asarray(shapes, dtype=np.int64)
