"""Server-side evaluation of the global model on the dataset's test split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.datasets import DatasetInfo, Split, Task, to_tensor_layout
from common.features import precompute
from common.metrics import bootstrap_auc_ci, classification_metrics
from common.models import fixed_front
from common.segmentation_metrics import summarize, volume_metrics
from common.training import device, predict_labels, predict_proba
from common.volumes import restore_shape


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

    def metrics(self, scores: np.ndarray, *, threshold: float = 0.5, with_ci: bool = False, seed: int = 0) -> dict:
        """Clinical metrics of ``scores`` at ``threshold``; ``auc_ci`` (bootstrap 95%) on request."""
        out: dict = classification_metrics(self.labels, scores, task=self.info.task, threshold=threshold)
        out.pop("n", None)
        out["threshold"] = threshold
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

    def metrics(self, scores: np.ndarray, *, threshold: float = 0.5, with_ci: bool = False, seed: int = 0) -> dict:
        """Per-class Dice and HD95 on whole volumes, averaged over test volumes (``threshold`` unused)."""
        del threshold, with_ci, seed
        per_volume = []
        for i in range(len(scores)):
            ref, pred = self.labels[i], scores[i]
            if self.shapes is not None:
                ref, pred = restore_shape(ref, self.shapes[i]), restore_shape(pred, self.shapes[i])
            per_volume.append(volume_metrics(ref, pred, self.info.num_outputs))
        return summarize(per_volume, self.info.labels)
