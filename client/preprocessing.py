"""Decoded DICOM pixels -> the model's input: colour, aspect, size, normalisation, slice order.

Pure functions of arrays and a :class:`Preprocessing` setting (no I/O, no pydicom). The display
pipeline (Modality LUT, VOI window, MONOCHROME1) happens while decoding (``client.dicom``);
here display values in [0, 1] become uint8 records shaped like the dataset's own (MedMNIST
layout: ``(size, size)``, ``(size, size, 3)`` or ``(size, size, size)``), which the trainer
normalises as it does for every dataset. Training augmentation is :func:`augment`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from scipy.ndimage import zoom

from client.dicom import Limits, Rejected

#: Bump when the preprocessing code changes what it produces: every cache is rebuilt.
PREPROCESSING_VERSION = 1

NORMALIZATIONS = ("window", "minmax")

#: Modalities each MedMNIST task's images come from (``medsilo site check`` rejects others).
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("CR", "DX"),
    "chestmnist": ("CR", "DX"),
    "breastmnist": ("US",),
    "organamnist": ("CT",), "organcmnist": ("CT",), "organsmnist": ("CT",),
    "organmnist3d": ("CT",), "nodulemnist3d": ("CT",), "adrenalmnist3d": ("CT",), "fracturemnist3d": ("CT",),
    "vesselmnist3d": ("MR",),
    "octmnist": ("OPT", "OCT"),
    "retinamnist": ("OP",),
    "dermamnist": ("XC", "OT"),
    "pathmnist": ("SM", "OT"), "bloodmnist": ("SM", "OT"), "tissuemnist": ("SM", "OT"),
    "synapsemnist3d": ("OT", "EM"),
}


@dataclass(frozen=True)
class Preprocessing:
    """How a site turns DICOM objects into records. Part of the cache key."""

    size: int = 28
    channels: int = 1
    spatial_dims: int = 2
    window: tuple[float, float] | None = None  # (center, width) overriding the file and the presets
    normalization: str = "window"  # "window": display values as is; "minmax": stretch each record
    modalities: tuple[str, ...] = ()  # accepted modalities; empty accepts any
    limits: Limits = field(default_factory=Limits)

    def problems(self) -> list[str]:
        """Every invalid setting with its fix."""
        out = []
        if not 4 <= self.size <= 1024:
            out.append(f"image size {self.size} is outside 4..1024; use the model's input size (e.g. 28)")
        if self.channels not in (1, 3):
            out.append(f"channels {self.channels} must be 1 (gray) or 3 (RGB)")
        if self.spatial_dims not in (2, 3):
            out.append(f"spatial_dims {self.spatial_dims} must be 2 or 3")
        if self.window is not None and self.window[1] < 1:
            out.append(f"window width {self.window[1]} must be >= 1; pass --window CENTER,WIDTH")
        if self.normalization not in NORMALIZATIONS:
            out.append(f"normalization {self.normalization!r} must be one of {', '.join(NORMALIZATIONS)}")
        return out

    def describe(self) -> dict[str, Any]:
        """Plain values (JSON), including the code version."""
        d = asdict(self)
        d["window"] = list(self.window) if self.window else None
        d["modalities"] = list(self.modalities)
        d["version"] = PREPROCESSING_VERSION
        return d

    def key(self) -> str:
        """Cache key: changes whenever the output could change."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:20]

    def record_shape(self) -> tuple[int, ...]:
        """Shape of one record."""
        if self.spatial_dims == 3:
            return (self.size,) * 3
        return (self.size, self.size) if self.channels == 1 else (self.size, self.size, 3)

    @classmethod
    def for_dataset(cls, name: str, *, size: int, channels: int, spatial_dims: int, **kw: Any) -> Preprocessing:
        """Settings matching a catalog dataset (its input size, channels and expected modalities)."""
        kw.setdefault("modalities", TASK_MODALITIES.get(name, ()))
        return cls(size=size, channels=channels, spatial_dims=spatial_dims, **kw)


def _gray(x: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image (last axis)."""
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _square(x: np.ndarray) -> np.ndarray:
    """Pad the shorter side symmetrically with the image's darkest value (aspect ratio kept)."""
    h, w = x.shape[:2]
    if h == w:
        return x
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = [(top, side - h - top), (left, side - w - left)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, mode="constant", constant_values=float(x.min()))


def _resize2d(x: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a 2D float image (Pillow's bilinear filter widens when shrinking)."""
    if x.shape[0] == size and x.shape[1] == size:
        return x.astype(np.float32)
    img = PILImage.fromarray(x.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), PILImage.Resampling.BILINEAR), dtype=np.float32)


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def to_model_input(pixels: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """Display values ``(frames, rows, cols[, 3])`` in [0, 1] -> one record (2D) or one slice (3D series).

    2D tasks take single-frame objects; 3D tasks take a multi-frame object as a volume, or one slice
    of a series (assembled later by :func:`assemble_volume`), returned as float16 ``(size, size)``.

    Raises
    ------
    Rejected
        For a multi-frame object in a 2D task.

    """
    frames = pixels.shape[0]
    rgb = pixels.ndim == 4
    if settings.spatial_dims == 2:
        if frames != 1:
            raise Rejected(
                f"multi-frame object ({frames} frames) for a 2D task; export the key frame as its own image"
            )
        x = _square(pixels[0])
        if settings.channels == 1:
            x = _gray(x) if rgb else x
            out = _resize2d(x, settings.size)
        else:
            x = x if rgb else np.repeat(x[..., None], 3, axis=-1)
            out = np.stack([_resize2d(x[..., c], settings.size) for c in range(3)], axis=-1)
        if settings.normalization == "minmax":
            out = _stretch(out)
        return _to_uint8(out)
    slices = [_resize2d(_square(_gray(f) if rgb else f), settings.size) for f in pixels]
    if frames == 1:
        return slices[0].astype(np.float16)
    return _finish_volume(np.stack(slices), settings)


def _finish_volume(stack: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """``(slices, size, size)`` float -> ``(size, size, size)`` uint8 (linear along the slice axis)."""
    if stack.shape[0] != settings.size:
        stack = zoom(stack.astype(np.float32), (settings.size / stack.shape[0], 1.0, 1.0), order=1)
    if settings.normalization == "minmax":
        stack = _stretch(stack)
    return _to_uint8(stack)


def assemble_volume(
    slices: list[tuple[list[float] | tuple[float, ...], int, np.ndarray]], settings: Preprocessing
) -> np.ndarray:
    """One series -> one volume record, slices ordered by position along the slice normal.

    Parameters
    ----------
    slices
        ``(positions, instance_number, pixels)`` per object of the series; ``pixels`` is a prepared
        slice ``(size, size)`` or, for a multi-frame object, already a volume.
    settings
        Output size and normalisation.

    Raises
    ------
    Rejected
        For a series with too few slices, duplicate positions or mixed geometry.

    """
    if len(slices) == 1 and slices[0][2].ndim == 3:
        return slices[0][2]
    if any(s[2].ndim != 2 for s in slices):
        raise Rejected("series mixes multi-frame and single-frame objects; export it as one kind")
    if len(slices) < 3:
        raise Rejected(f"series has {len(slices)} slice(s); a volume needs at least 3")
    have_pos = all(len(s[0]) == 1 for s in slices)
    if have_pos:
        order = sorted(range(len(slices)), key=lambda i: slices[i][0][0])
        pos = np.array([slices[i][0][0] for i in order])
        gaps = np.diff(pos)
        if np.any(gaps < 1e-3):
            raise Rejected("series has two slices at the same position (duplicates?); remove the duplicates")
        if gaps.max() > 1.5 * gaps.min() + 1e-3:
            raise Rejected("series has missing slices (uneven spacing); re-send the complete series")
    else:
        order = sorted(range(len(slices)), key=lambda i: slices[i][1])
    stack = np.stack([slices[i][2].astype(np.float32) for i in order])
    return _finish_volume(stack, settings)


def augment(images: Any, *, generator: Any, max_shift: float = 0.08, max_rotate_deg: float = 10.0,
            intensity: float = 0.1, flip: bool = False) -> Any:
    """Random affine (shift, rotation, optional horizontal flip) and intensity jitter for a training batch.

    ``images`` is a float tensor ``(N, C, H, W)`` in the trainer's normalised units; one draw per
    record from ``generator`` (a ``torch.Generator``), so a seeded run is reproducible.
    """
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (max_rotate_deg * np.pi / 180)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * intensity
    bias = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * intensity
    return out * gain.to(images.dtype) + bias.to(images.dtype)
