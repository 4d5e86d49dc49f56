from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from common.datasets import Task
from common.metrics import (
    auc,
    auc_from_histogram,
    binary_auc,
    bootstrap_auc_ci,
    classification_metrics,
    score_histogram,
    threshold_from_histogram,
)


def test_binary_auc_hand_computed() -> None:
    # 2 positives x 2 negatives: pairs (0.8>0.1), (0.8>0.4), (0.35>0.1), (0.35<0.4) -> 3/4
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert auc(y, s, task=Task.BINARY) == pytest.approx(0.75)


@pytest.mark.parametrize("levels", [None, 5, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_equals_scikit_learn_with_and_without_ties(levels: int | None, seed: int) -> None:
    # Prepare: continuous scores, or scores rounded to a few levels (many ties); imbalanced labels
    rng = np.random.default_rng(seed)
    y = (rng.random(301) < 0.2).astype(int)
    s = rng.normal(y * 0.8, 1.0)
    if levels is not None:
        s = np.round((s - s.min()) / np.ptp(s) * (levels - 1))

    # Execute
    ours = binary_auc(y, s)

    # Assert
    assert ours == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert binary_auc(2 * y + 3, s) == pytest.approx(ours)  # the greater label is the positive one
    assert np.isnan(binary_auc(np.zeros(5), np.arange(5.0)))


def test_binary_auc_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 labels and 2 scores"):
        binary_auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))


def test_multiclass_auc_is_one_vs_rest_macro() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    s = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y] * 0.3
    s /= s.sum(axis=1, keepdims=True)
    manual = np.mean([roc_auc_score(y == c, s[:, c]) for c in range(3)])
    assert auc(y, s, task=Task.MULTICLASS) == pytest.approx(manual)
    assert auc(y, s, task=Task.MULTICLASS) == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"))


def test_binary_confusion_metrics_hand_computed() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1])
    m = classification_metrics(y, s, task=Task.BINARY, threshold=0.5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)


def test_multiclass_balanced_accuracy_is_macro_recall() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    s = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    m = classification_metrics(y, s, task=Task.MULTICLASS)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1.0, 0.5]))
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_multiclass_metrics_equal_scikit_learn() -> None:
    # Prepare: 4 classes, one of them never predicted
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 400)
    s = rng.dirichlet(np.ones(4), 400) + np.eye(4)[y] * 0.5
    s[:, 3] = 0.0

    # Execute
    m = classification_metrics(y, s, task=Task.MULTICLASS)

    # Assert
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, s.argmax(axis=1)))
    assert m["accuracy"] == pytest.approx(np.mean(s.argmax(axis=1) == y))


def test_histogram_auc_matches_exact_auc_closely() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    logits = rng.normal(1.5 * y - 0.5, 1.0)
    p = 1 / (1 + np.exp(-logits))
    exact = roc_auc_score(y, p)
    approx = auc_from_histogram(score_histogram(y, p))
    assert abs(approx - exact) < 0.01


def test_summed_site_histograms_equal_the_pooled_histogram() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    p = rng.random(500)
    parts = np.array_split(np.arange(500), 4)
    summed = sum(score_histogram(y[i], p[i]) for i in parts)
    assert np.array_equal(summed, score_histogram(y, p))


def test_threshold_from_histogram_maximises_balanced_accuracy() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(800, int), np.ones(200, int)]
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.0, -2.0), 1.0)))
    thr = threshold_from_histogram(score_histogram(y, p))
    chosen = classification_metrics(y, p, task=Task.BINARY, threshold=thr)["balanced_accuracy"]
    grid = [classification_metrics(y, p, task=Task.BINARY, threshold=t)["balanced_accuracy"]
            for t in np.linspace(0.01, 0.99, 99)]
    assert chosen >= max(grid) - 0.02
    # The prior-blind 0.5 cut-off is clearly worse on this imbalanced set.
    assert chosen > classification_metrics(y, p, task=Task.BINARY, threshold=0.5)["balanced_accuracy"] + 0.03


def test_bootstrap_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.4 * y
    lo, hi = bootstrap_auc_ci(y, s, task=Task.BINARY, n_boot=200)
    point = auc(y, s, task=Task.BINARY)
    assert lo < point < hi and hi - lo < 0.2


def test_auc_undefined_with_one_class() -> None:
    assert np.isnan(auc(np.ones(5), np.linspace(0, 1, 5), task=Task.BINARY))
