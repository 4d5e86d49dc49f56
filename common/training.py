"""Framework-neutral PyTorch pieces: tensors from splits, loss, one epoch, predictions.

Used by sites (with or without DP-SGD) and by the pooled / local-only reference trainings,
so all of them optimise exactly the same objective.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.datasets import DatasetInfo, Split, Task, to_tensor_layout


def cosine_lr(base_lr: float, *, step: int, total: int, floor: float = 0.05) -> float:
    """Cosine decay from ``base_lr`` (step 1) to ``floor * base_lr`` (step ``total``).

    Late rounds of DP-SGD are dominated by noise; a decaying rate lets the model settle.
    """
    if total <= 1:
        return base_lr
    frac = (step - 1) / (total - 1)
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * frac)))


def device() -> torch.device:
    """CUDA when the node has a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_dataset(split: Split, info: DatasetInfo) -> TensorDataset:
    """Float images in model layout and targets in the loss's dtype."""
    x = torch.from_numpy(to_tensor_layout(split.images, info))
    if info.task is Task.BINARY or info.task is Task.MULTILABEL:
        y = torch.from_numpy(split.labels.astype(np.float32))
        if info.task is Task.BINARY:
            y = y.reshape(-1, 1)
    else:
        y = torch.from_numpy(split.labels.astype(np.int64))
    return TensorDataset(x, y)


def loss_function(task: Task) -> nn.Module:
    """Binary and multi-label: logistic loss per output; multi-class: cross-entropy."""
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
    per-record clipping and accounting are unchanged).
    """
    dev = next(model.parameters()).device
    model.train()
    total, count = 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in loader:
        if x.shape[0] == 0:  # an empty Poisson batch (vanishingly rare): nothing is released
            optimizer.zero_grad(set_to_none=True)
            continue
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
