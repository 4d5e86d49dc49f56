from __future__ import annotations

import numpy as np
import pytest
import torch

from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import Split, dataset_info, to_tensor_layout
from common.models import build_model
from server.evaluation import TestSet
from simulations.baselines import train_reference


def _split(n: int, seed: int) -> Split:
    """28-pixel images whose label says which half is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(60, 120, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        half = (slice(None), slice(14, None)) if label else (slice(None), slice(0, 14))
        images[i][half] += 80
    return Split(images, labels.astype(np.int64))


def test_references_start_from_the_transfer_learning_checkpoint(tmp_path) -> None:
    # Prepare: a checkpoint trained on inverted labels (a fresh CNN already ranks these images well, so the
    # checkpoint must rank them the other way to be told apart) and a reference run that barely trains
    info = dataset_info("breastmnist")
    train, val, test = _split(64, 0), _split(32, 1), _split(64, 2)
    source = build_model("cnn", info, seed=1)
    opt = torch.optim.Adam(source.parameters(), lr=0.01)
    x = torch.from_numpy(to_tensor_layout(train.images, info))
    y = torch.from_numpy(1 - train.labels.astype(np.float32)).reshape(-1, 1)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(source(x), y).backward()
        opt.step()
    save_checkpoint(tmp_path / "start.safetensors", source.state_dict(), {})
    test_set = TestSet.from_split(test, info)
    from_checkpoint = test_set.metrics(test_set.scores(source))["auc"]
    from_scratch = test_set.metrics(test_set.scores(build_model("cnn", info, seed=0)))["auc"]
    config = RunConfig(dataset="breastmnist", model="cnn", rounds=1, local_epochs=1, batch_size=32, lr=1e-9, seed=0,
                       init_checkpoint=str(tmp_path / "start.safetensors"))

    # Execute
    pooled = train_reference("pooled", train, val, info, config, test_set, seed=0)

    # Assert: the reference is the checkpoint's model, not a fresh one (which the test can tell apart)
    assert abs(from_checkpoint - from_scratch) > 0.5
    assert pooled.test["auc"] == pytest.approx(from_checkpoint, abs=1e-6)


def test_a_reference_model_decides_ordinal_grades_by_the_federations_rule_not_by_arg_max() -> None:
    # Prepare: an under-confident model whose arg-max always says grade 0, while its expected grade tracks the truth
    from sklearn.metrics import balanced_accuracy_score

    from common.datasets import dataset_info
    from simulations.baselines import select_decision

    rng = np.random.default_rng(0)
    info = dataset_info("retinamnist")
    labels = rng.integers(0, 5, 500)
    logits = np.stack([np.full(500, 1.0), *[0.8 * (labels >= k) + rng.normal(0, 0.05, 500) for k in range(1, 5)]],
                      axis=1)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Execute
    decision = select_decision(labels, scores, info)
    # Assert: chosen from the validation records' rows, it beats arg-max (chance) by far, as sklearn scores them
    assert decision is not None and decision.cuts
    plain = balanced_accuracy_score(labels, scores.argmax(axis=1))
    chosen = balanced_accuracy_score(labels, decision.predict(scores))
    assert plain == pytest.approx(0.2) and chosen > 0.6
    assert select_decision(labels[:0], scores[:0], info) is None
    assert select_decision(labels % 2, scores[:, :1], dataset_info("breastmnist")) is None  # binary: a threshold
