"""Server-side evaluation of the global model on the dataset's test split, and the decision rule it is scored with.

Multi-class and ordinal models are scored with a :class:`common.metrics.Decision` the coordinator chose from the
sites' summed DP validation statistics (:func:`validation_decision`: post-processing of what they released).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.datasets import DatasetInfo, Split, Task, to_tensor_layout
from common.features import precompute
from common.metrics import (
    Decision,
    balanced_accuracy_from_confusion,
    bootstrap_auc_ci,
    classification_metrics,
    cuts_from_grade_table,
    kappa_from_confusion,
    offsets_from_histograms,
)
from common.models import fixed_front
from common.segmentation_metrics import summarize, volume_metrics
from common.training import device, predict_labels, predict_proba
from common.volumes import restore_shape
from common.wire import VALIDATION_LOGIT_EDGES, ValidationLayout, grade_edges


def validation_decision(layout: ValidationLayout, released: np.ndarray) -> tuple[Decision | None, dict[str, Any]]:
    """The decision rule chosen from a (summed, noisy) validation release, and what it scores on that release.

    Ordinal: cut points on the expected grade maximising balanced accuracy on the true grade x expected-grade
    table, with that table's balanced accuracy and quadratic κ under them. Multi-class: per-class logit offsets
    from the one-vs-rest histograms (:func:`common.metrics.offsets_from_histograms`) and the mean one-vs-rest
    balanced accuracy at those thresholds (``ovr_balanced_accuracy``; the joint confusion of an arg-max is not in
    the release). Other tasks: ``(None, {})``. Post-processing only.
    """
    if layout.task is Task.ORDINAL:
        table = layout.grade_table(released)
        decision = cuts_from_grade_table(table, grade_edges(layout.outputs))
        assigned = np.searchsorted(np.asarray(decision.cuts), _bin_lows(layout), side="right")
        cm = np.stack([np.bincount(assigned, weights=row, minlength=layout.outputs) for row in table])
        return decision, {"decision": decision.to_meta(), "balanced_accuracy": balanced_accuracy_from_confusion(cm),
                          "kappa": kappa_from_confusion(cm)}
    if layout.task is Task.MULTICLASS:
        hists = layout.histograms(released)
        decision = offsets_from_histograms(hists, edges=VALIDATION_LOGIT_EDGES)
        scores = []
        for hist, offset in zip(hists, decision.offsets, strict=True):
            # The first bin predicted positive: the one whose lower edge is the class's threshold (-offset).
            positive = 0 if -offset < VALIDATION_LOGIT_EDGES[0] else int(
                np.searchsorted(VALIDATION_LOGIT_EDGES, -offset, side="left")) + 1
            neg, pos = hist[0], hist[1]
            if neg.sum() > 0 and pos.sum() > 0:
                scores.append(0.5 * (pos[positive:].sum() / pos.sum() + neg[:positive].sum() / neg.sum()))
        return decision, {"decision": decision.to_meta(),
                          "ovr_balanced_accuracy": float(np.mean(scores)) if scores else float("nan")}
    return None, {}


def _bin_lows(layout: ValidationLayout) -> np.ndarray:
    """The lower edge of each expected-grade bin (the first bin starts at 0)."""
    return np.concatenate([[0.0], grade_edges(layout.outputs)])


@dataclass
class TestSet:
    """Test images in model layout with their labels."""

    info: DatasetInfo
    x: torch.Tensor
    labels: np.ndarray
    #: Fixed features of ``x`` by the front that computed them (``repr`` of its modules and settings).
    _features: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: The metric that ranks models (best round, best epoch) and is logged per round.
    primary = "auc"

    @classmethod
    def from_split(cls, split: Split, info: DatasetInfo) -> TestSet:
        """The test set of ``info``'s task (segmentation: :class:`SegmentationTestSet`)."""
        x = torch.from_numpy(to_tensor_layout(split.images, info))
        if info.task is Task.SEGMENTATION:
            return SegmentationTestSet(info=info, x=x, labels=split.labels, shapes=split.shapes)
        return cls(info=info, x=x, labels=split.labels)

    def scores(self, model: torch.nn.Module) -> np.ndarray:
        """Class probabilities of ``model`` on every test record.

        A model on fixed features (:func:`common.models.fixed_front`) is evaluated every round on the same
        records: their features are computed once and only the trainable part runs again.
        """
        model = model.to(device())
        split = fixed_front(model)
        if split is None:
            return predict_proba(model, self.x, self.info.task)
        front, trainable = split
        key = repr(front)
        if key not in self._features:
            self._features[key] = precompute(front, self.x, device=device())
        return predict_proba(trainable, self._features[key], self.info.task)

    def metrics(self, scores: np.ndarray, *, threshold: float = 0.5, with_ci: bool = False, seed: int = 0,
                decision: Decision | None = None) -> dict:
        """Clinical metrics of ``scores`` at ``threshold`` (multi-class, ordinal: ``decision``, arg-max if ``None``).

        ``auc_ci`` (bootstrap 95%) on request; ``decision`` names the rule applied (multi-class and ordinal).
        """
        out: dict = classification_metrics(self.labels, scores, task=self.info.task, threshold=threshold,
                                           decision=decision)
        out.pop("n", None)
        out["threshold"] = threshold
        if self.info.task in (Task.MULTICLASS, Task.ORDINAL):
            out["decision"] = decision.to_meta() if decision is not None else {"kind": "argmax"}
        if with_ci:
            out["auc_ci"] = list(bootstrap_auc_ci(self.labels, scores, task=self.info.task, seed=seed))
        return out


@dataclass
class SegmentationTestSet(TestSet):
    """Test volumes: predictions are label maps, restored to each volume's own shape before scoring."""

    shapes: np.ndarray | None = None
    primary = "dice_mean"

    def scores(self, model: torch.nn.Module) -> np.ndarray:
        """The predicted class of every voxel of every test volume (uint8, padded shape)."""
        return predict_labels(model.to(device()), self.x)

    def metrics(self, scores: np.ndarray, *, threshold: float = 0.5, with_ci: bool = False, seed: int = 0,
                decision: Decision | None = None) -> dict:
        """Per-class Dice and HD95 on whole volumes, averaged over test volumes (``threshold`` unused)."""
        del threshold, with_ci, seed, decision
        per_volume = []
        for i in range(len(scores)):
            ref, pred = self.labels[i], scores[i]
            if self.shapes is not None:
                ref, pred = restore_shape(ref, self.shapes[i]), restore_shape(pred, self.shapes[i])
            per_volume.append(volume_metrics(ref, pred, self.info.num_outputs))
        return summarize(per_volume, self.info.labels)
