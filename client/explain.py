"""Grad-CAM heatmaps: which part of an image drove the model's score, and PNG overlays for a clinician.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last convolution block's output by the mean
gradient of the class score over that channel, sums, keeps the positive part, upsamples to the image and
scales to [0, 1]. medsilo weighs each position by the gradient at that position instead (HiResCAM; Draelos
& Carin, 2020): for a head that averages the maps over space before its linear layer (the CNNs) the gradient
is the same everywhere and this *is* Grad-CAM, and for a linear layer on the whole maps (the scattering
model ``scatnet``) it is each position's exact share of the score, where Grad-CAM's spatial mean would
erase where the evidence lies.
The model must consist of ``body`` (up to the last convolution block) and ``head`` submodules
(:class:`common.models.ExplainableModel`, and every TorchScript file ``medsilo export`` writes, which keeps
both); autograd runs through TorchScript, so no Python model class is needed at the hospital.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.io import atomic_write_bytes


def grad_cam(model: Any, x: torch.Tensor, target: int | None = None) -> np.ndarray:
    """Heatmap in [0, 1] of shape ``x.shape[2:]`` for one input ``x`` of shape ``(1, C, *spatial)``.

    Parameters
    ----------
    model
        A module (or TorchScript module) with ``body`` and ``head`` submodules.
    x
        One preprocessed image.
    target
        Output index to explain; ``None``: the single output of a binary model, else the highest logit.

    """
    if x.shape[0] != 1:
        raise ValueError(f"grad_cam explains one image at a time; received a batch of {x.shape[0]}")
    with torch.no_grad():
        features = model.body(x)
    with torch.enable_grad():
        # The head runs on a leaf copy of the activations: the gradient is taken exactly there, whatever
        # TorchScript's executor fuses inside the body.
        features = features.detach().clone().requires_grad_(True)
        logits = model.head(features)
        if target is None:
            target = 0 if logits.shape[1] == 1 else int(logits[0].argmax())
        grads = torch.autograd.grad(logits[0, target], features)[0]
    cam = F.relu((grads * features).sum(dim=1, keepdim=True)).detach()  # per position (module docstring)
    mode = "trilinear" if features.dim() == 5 else "bilinear"
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[0, 0]
    low, high = float(cam.min()), float(cam.max())  # min-max scaling, as the pytorch-grad-cam library does
    return ((cam - low) / (high - low)).numpy() if high > low else np.zeros(tuple(x.shape[2:]), dtype=np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """An 8-bit RGB image: ``image`` (gray or RGB, any size) with ``heatmap`` blended in the jet colour map."""
    from matplotlib import colormaps
    from PIL import Image

    base = np.asarray(image)
    if base.ndim == 2:
        base = np.stack([base] * 3, axis=-1)
    base = base[..., :3].astype(np.uint8)
    height, width = base.shape[:2]
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BILINEAR)
    colour = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255
    weight = alpha * (np.asarray(heat, dtype=np.float64)[..., None] / 255.0)
    return np.clip(base * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an 8-bit RGB array as PNG, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
