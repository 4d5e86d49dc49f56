"""Reference trainings for the comparison table: pooled (upper bound) and local-only (lower bound).

Both train without DP (a hospital training alone pays no privacy cost), with the same model,
loss and optimiser as the sites and the same epoch budget as the federation
(``rounds * local_epochs`` epochs). The model kept is the best epoch on the trainer's own
validation records, and its decision threshold comes from those records, as in the federation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.trainer import augmenter
from common.checkpoint import initial_model
from common.config import RunConfig
from common.datasets import DatasetInfo, Split, Task
from common.metrics import Decision, auc, score_histogram, threshold_from_histogram
from common.models import resolve_model_name
from common.segmentation_metrics import summarize, volume_metrics
from common.training import (
    cosine_lr,
    device,
    loss_function,
    on_fixed_features,
    predict_labels,
    predict_proba,
    tensor_dataset,
    train_epoch,
    training_dataset,
)
from common.wire import ValidationLayout
from server.evaluation import TestSet, validation_decision


@dataclass
class ReferenceResult:
    """Test metrics of one reference model and its validation trace."""

    name: str
    test: dict[str, Any]
    val_auc: list[float]
    best_epoch: int
    n_train: int


def select_threshold(labels: np.ndarray, scores: np.ndarray, info: DatasetInfo) -> float:
    """Decision threshold from validation scores, by the same histogram rule the federation uses."""
    if info.task is not Task.BINARY or len(np.unique(labels)) < 2:
        return 0.5
    return threshold_from_histogram(score_histogram(labels, scores))


def select_decision(labels: np.ndarray, scores: np.ndarray, info: DatasetInfo) -> Decision | None:
    """Multi-class offsets or ordinal cut points from validation scores, by the rule the federation uses.

    The federation chooses them from the sites' summed noisy validation rows; a reference model, trained on data
    in one place, chooses them from the same rows of its own validation records, without noise.
    """
    if info.task not in (Task.MULTICLASS, Task.ORDINAL) or len(labels) == 0:
        return None
    layout = ValidationLayout.for_dataset(info)
    decision, _ = validation_decision(layout, layout.rows(labels, scores).sum(axis=0))
    return decision


def validation_score(model: torch.nn.Module, x_val: torch.Tensor, val: Split, info: DatasetInfo) -> float:
    """The model-selection score on validation records: AUC, or mean Dice for segmentation."""
    if info.task is Task.SEGMENTATION:
        pred = predict_labels(model, x_val)
        per_volume = [volume_metrics(val.labels[i], pred[i], info.num_outputs) for i in range(len(pred))]
        return float(summarize(per_volume, info.labels)["dice_mean"])
    return auc(val.labels, predict_proba(model, x_val, info.task), task=info.task)


def train_reference(
    name: str,
    train: Split,
    val: Split,
    info: DatasetInfo,
    config: RunConfig,
    test_set: TestSet,
    *,
    seed: int,
) -> ReferenceResult:
    """Train one model without DP for the federation's epoch budget; evaluate its best epoch."""
    torch.manual_seed(seed)
    model = initial_model(config, info).to(device())
    dataset = training_dataset(train, info, resolve_model_name(config.model, info), seed=seed)
    augment = augmenter(config, torch.Generator().manual_seed(seed + 1), info.task)  # the sites' recipe
    # Fixed features (scattering) are computed once, for the training and the validation records alike.
    net, data = on_fixed_features(model, dataset, augmented=augment is not None)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = loss_function(info.task)
    x_val = None
    if len(val):
        _, val_set = on_fixed_features(model, tensor_dataset(val, info), augmented=augment is not None)
        x_val = val_set.tensors[0]  # what ``net`` takes: fixed features, or the images
    epochs = config.rounds * config.local_epochs
    best_state, best_score, best_epoch = None, -np.inf, 0
    val_trace: list[float] = []
    for epoch in range(1, epochs + 1):
        # Same cosine decay as the sites, stepped once per round's worth of epochs.
        round_index = (epoch - 1) // config.local_epochs + 1
        for group in opt.param_groups:
            group["lr"] = cosine_lr(config.lr, step=round_index, total=config.rounds)
        train_epoch(net, loader, opt, loss_fn, augment=augment)
        if info.task is Task.SEGMENTATION and epoch % config.local_epochs and epoch < epochs:
            continue  # whole-volume validation is costly: once per round's worth of epochs, as the federation
        score = float("nan")
        if x_val is not None:
            score = validation_score(net, x_val, val, info)
        val_trace.append(score)
        key = score if np.isfinite(score) else float(epoch) - 1e6  # no usable val: keep the last
        if key >= best_score:
            best_score, best_epoch = key, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    threshold, decision = 0.5, None
    if x_val is not None and info.task is not Task.SEGMENTATION:
        val_scores = predict_proba(net, x_val, info.task)
        threshold = select_threshold(val.labels, val_scores, info)
        decision = select_decision(val.labels, val_scores, info)
    test = test_set.metrics(test_set.scores(model), threshold=threshold, with_ci=True, seed=seed, decision=decision)
    test["best_epoch"] = best_epoch
    return ReferenceResult(name=name, test=test, val_auc=val_trace, best_epoch=best_epoch, n_train=len(train))
