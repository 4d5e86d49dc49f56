"""Server-side evaluation of the global model on the dataset's official test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.datasets import DatasetInfo, Split, to_tensor_layout
from common.metrics import bootstrap_auc_ci, classification_metrics
from common.training import device, predict_proba


@dataclass
class TestSet:
    """Test images in model layout with their labels."""

    info: DatasetInfo
    x: torch.Tensor
    labels: np.ndarray

    @classmethod
    def from_split(cls, split: Split, info: DatasetInfo) -> TestSet:
        return cls(info=info, x=torch.from_numpy(to_tensor_layout(split.images, info)), labels=split.labels)

    def scores(self, model: torch.nn.Module) -> np.ndarray:
        """Class probabilities of ``model`` on every test record."""
        return predict_proba(model.to(device()), self.x, self.info.task)

    def metrics(self, scores: np.ndarray, *, threshold: float = 0.5, with_ci: bool = False, seed: int = 0) -> dict:
        """Clinical metrics of ``scores`` at ``threshold``; ``auc_ci`` (bootstrap 95%) on request."""
        out: dict = classification_metrics(self.labels, scores, task=self.info.task, threshold=threshold)
        out.pop("n", None)
        out["threshold"] = threshold
        if with_ci:
            out["auc_ci"] = list(bootstrap_auc_ci(self.labels, scores, task=self.info.task, seed=seed))
        return out
