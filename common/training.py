"""Framework-neutral PyTorch pieces: tensors from splits, loss, one epoch, predictions.

Used by sites (with or without DP-SGD) and by the pooled / local-only reference trainings,
so all of them optimise exactly the same objective.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.datasets import DatasetInfo, Split, Task, to_tensor_layout
from common.features import FeatureCache, precompute
from common.models import fixed_front


def cosine_lr(base_lr: float, *, step: int, total: int, floor: float = 0.05) -> float:
    """Cosine decay from ``base_lr`` (step 1) to ``floor * base_lr`` (step ``total``).

    Late rounds of DP-SGD are dominated by noise; a decaying rate lets the model settle.
    """
    if total <= 1:
        return base_lr
    frac = (step - 1) / (total - 1)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * frac)))


#: glibc's mallopt parameters (malloc.h) and the values training sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling for this parameter on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 2**20


@functools.cache
def retain_freed_memory() -> bool:
    """Let this process reuse the memory a training step frees instead of handing it back to the kernel.

    DP-SGD's per-record gradients and unfolded inputs are a few MB per layer and step. glibc serves
    such blocks with ``mmap`` and unmaps them when freed, or trims the heap top, so every step
    page-faults its temporaries in again: DP steps took 29-33 ms instead of 25-28 ms on the
    benchmark's CNN (``make bench``). With blocks up to 32 MB served from the heap and up to 256 MB of
    freed heap kept, the working set stays mapped. :func:`train_epoch` calls it; a no-op after
    the first call and outside glibc (returns whether glibc accepted both settings).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: keep its defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def device() -> torch.device:
    """CUDA when the node has a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_dataset(split: Split, info: DatasetInfo) -> TensorDataset:
    """Float images in model layout and targets in the loss's dtype (segmentation: a class per voxel)."""
    x = torch.from_numpy(to_tensor_layout(split.images, info))
    if info.task is Task.SEGMENTATION:
        return TensorDataset(x, torch.from_numpy(np.asarray(split.labels, dtype=np.int64)))
    if info.task is Task.BINARY or info.task is Task.MULTILABEL:
        y = torch.from_numpy(split.labels.astype(np.float32))
        if info.task is Task.BINARY:
            y = y.reshape(-1, 1)
    else:
        y = torch.from_numpy(split.labels.astype(np.int64))
    return TensorDataset(x, y)


#: A training or validation set: whole records (whose fixed features can be computed), or samples of volumes.
_Records = TypeVar("_Records", bound="TensorDataset | PatientSamples")


def on_fixed_features(
    model: nn.Module, dataset: _Records, *, augmented: bool, cache: FeatureCache | None = None
) -> tuple[nn.Module, _Records]:
    """What to train or score: ``model`` on ``dataset``, or its trainable part on precomputed fixed features.

    A model that starts with fixed per-record features (:func:`common.models.fixed_front`) need not
    compute them again at every step and epoch: they are computed once here (or read from ``cache``,
    a site's :class:`~common.features.FeatureCache`, when an earlier round computed them) and the
    trainable part (sharing the model's parameters) trains on them. Not with augmentation, which
    changes the inputs at every step, and not for records sampled from volumes.
    """
    split = fixed_front(model)
    if split is None or augmented or not isinstance(dataset, TensorDataset):
        return model, dataset
    front, trainable = split
    x, y = dataset.tensors
    dev = next(model.parameters()).device
    features = precompute(front, x, device=dev) if cache is None else cache.features(front, x, device=dev)
    return trainable, cast(_Records, TensorDataset(features, y))  # records in, records out


class PatientSamples(Dataset):
    """Segmentation training records: one per patient, each a random part of that patient's volume.

    ``slices=S`` (slice-wise models) draws S of the patient's slices; ``patch=(d, h, w)`` (3D models)
    a random patch. Either way record ``i`` is built from patient ``i`` alone, so a sampled batch of
    records is a sample of patients and a per-record gradient is a per-patient gradient: the
    patient, with all of their slices, is the unit that is sampled, clipped and counted by DP-SGD.
    """

    def __init__(
        self, base: TensorDataset, *, slices: int | None = None, patch: tuple[int, int, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.x, self.y = base.tensors
        self.slices, self.patch = slices, patch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.x[i], self.y[i]  # (C, D, H, W), (D, H, W)
        if self.slices is not None and self.slices < x.shape[1]:
            pick = torch.randperm(x.shape[1], generator=self.generator)[: self.slices].sort().values
            return x[:, pick], y[pick]
        if self.patch is not None:
            starts = [int(torch.randint(0, s - p + 1, (1,), generator=self.generator))
                      for s, p in zip(y.shape, self.patch, strict=True)]
            window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True))
            return x[(slice(None), *window)], y[window]
        return x, y


#: Slices per patient per step for slice-wise models; patch per patient per step for 3D models.
TRAIN_SLICES = 4
TRAIN_PATCH = (16, 32, 24)


#: What local training iterates over: whole records, or per-patient samples of volumes.
TrainingSet = TensorDataset | PatientSamples


def training_dataset(split: Split, info: DatasetInfo, model_name: str, *, seed: int) -> TrainingSet:
    """What a trainer iterates: :func:`tensor_dataset`, or :class:`PatientSamples` for segmentation."""
    base = tensor_dataset(split, info)
    if info.task is not Task.SEGMENTATION:
        return base
    if model_name == "unet3d":
        return PatientSamples(base, patch=TRAIN_PATCH, seed=seed)
    return PatientSamples(base, slices=TRAIN_SLICES, seed=seed)


class DiceCELoss(nn.Module):
    """Soft Dice over the foreground classes present in a record plus voxel cross-entropy, per record, averaged.

    Each record's loss depends on that record only (Dice is per volume, not over the batch), so the
    batch mean is a sum of per-record terms, which per-record gradient clipping (DP-SGD) requires.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over records of ``CE + 1 - mean foreground Dice``; ``target`` holds class indices."""
        num_classes = logits.shape[1]
        dims = tuple(range(2, logits.ndim))
        ce = nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
        probs = torch.softmax(logits, dim=1)
        onehot = nn.functional.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        soft_dice = (2 * inter + self.smooth) / (denom + self.smooth)
        # Dice only for foreground classes present in the record: a record (a sample of a patient's slices)
        # without a class would otherwise reward pushing that class's probability to zero everywhere,
        # which suppresses the class altogether; its false positives are still penalised by the CE term.
        present = (onehot.sum(dims) > 0)[:, 1:].to(probs.dtype)
        dice_loss = ((1 - soft_dice[:, 1:]) * present).sum(1) / present.sum(1).clamp(min=1)
        return (ce + dice_loss).mean()


def loss_function(task: Task) -> nn.Module:
    """Binary and multi-label: logistic loss per output; multi-class: cross-entropy; segmentation: Dice + CE."""
    if task is Task.SEGMENTATION:
        return DiceCELoss()
    if task is Task.BINARY or task is Task.MULTILABEL:
        return nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss()


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    proximal: tuple[list[torch.Tensor], float, float] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``proximal=(global_params, mu, lr)`` applies FedProx's proximal pull as a separate,
    data-independent step after each optimiser step, so it is also exact under DP-SGD
    (where a loss term outside the per-record graph would be dropped by per-sample clipping).
    ``augment`` transforms each input batch (training augmentation; per record, so DP-SGD's
    per-record clipping and accounting are unchanged). DP-SGD has its own loop (:func:`client.dp.sgd.dp_epoch`),
    which also decides what an empty Poisson batch does.
    """
    retain_freed_memory()
    dev = next(model.parameters()).device
    model.train()
    total, count = 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        if augment is not None:
            x = augment(x)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if proximal is not None:
            global_params, mu, lr = proximal
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.sub_(lr * mu * (p - g))
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray | torch.Tensor, task: Task, batch_size: int = 512) -> np.ndarray:
    """Probabilities: ``(N,)`` positive class (binary), ``(N, C)`` otherwise."""
    dev = next(model.parameters()).device
    model.eval()
    xt = torch.as_tensor(x)
    outs = []
    for start in range(0, xt.shape[0], batch_size):
        logits = model(xt[start : start + batch_size].to(dev)).float()
        if task is Task.BINARY:
            outs.append(torch.sigmoid(logits[:, 0]))
        elif task is Task.MULTILABEL:
            outs.append(torch.sigmoid(logits))
        else:
            outs.append(torch.softmax(logits, dim=1))
    return torch.cat(outs).cpu().numpy().astype(np.float64)


@torch.no_grad()
def predict_labels(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """Segmentation: the arg-max class of every voxel, ``(N, *spatial)`` uint8."""
    dev = next(model.parameters()).device
    model.eval()
    xt = torch.as_tensor(x)
    outs = [model(xt[s : s + batch_size].to(dev)).argmax(1).to(torch.uint8).cpu()
            for s in range(0, len(xt), batch_size)]
    return torch.cat(outs).numpy()


def state_to_ndarrays(model: nn.Module) -> list[np.ndarray]:
    """Model weights in ``state_dict`` order as numpy arrays (Opacus prefixes stripped)."""
    inner = getattr(model, "_module", model)
    return [v.detach().cpu().numpy() for v in inner.state_dict().values()]


def ndarrays_to_state(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load numpy arrays in ``state_dict`` order into ``model``."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise ValueError(
            f"received {len(arrays)} weight arrays, this model has {len(keys)}; "
            "the coordinator and this site must use the same --model and dataset"
        )
    state = {k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(keys, arrays, strict=True)}
    model.load_state_dict(state, strict=True)
