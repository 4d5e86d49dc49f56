"""Clinical classification metrics: AUC, accuracy, balanced accuracy, sensitivity, specificity.

Scores are probabilities: ``(N,)`` of the positive class for binary tasks, ``(N, C)`` class
probabilities for multi-class, ``(N, L)`` per-label probabilities for multi-label.
The histogram functions let sites share only aggregate counts of validation scores, from
which the coordinator derives a federated AUC and a decision threshold.

The AUC is the Mann-Whitney statistic on mid-ranks, in numpy: equal to scikit-learn's
``roc_auc_score`` (the reference in the tests) without importing scikit-learn and SciPy, about
1.5 s that every ClientApp process of a deployed node would pay to validate a model.
"""

from __future__ import annotations

import numpy as np

from common.datasets import Task


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of scores for the greater of two labels: P(score_pos > score_neg) + P(tie) / 2.

    Computed from the mid-ranks of the scores (Mann-Whitney U); NaN unless both labels occur.
    """
    y_true = np.asarray(y_true).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(
            f"received {y_true.shape[0]} labels and {y_score.shape[0]} scores; expected one score per label"
        )
    labels = np.unique(y_true)
    if len(labels) != 2:
        return float("nan")
    pos = y_true == labels[1]
    n_pos = int(pos.sum())
    n_neg = len(y_true) - n_pos
    _, inverse, counts = np.unique(y_score, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of each distinct score's last occurrence
    mid_ranks = (last - (counts - 1) / 2.0)[inverse]
    u = mid_ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc(y_true: np.ndarray, y_score: np.ndarray, *, task: Task) -> float:
    """ROC AUC (one-vs-rest macro for multi-class, macro over labels for multi-label).

    Classes absent from ``y_true`` are left out of the macro average; NaN if no class can be scored.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if task is Task.BINARY:
        return binary_auc(y_true, y_score)
    if task is Task.MULTILABEL:
        cols = [j for j in range(y_true.shape[1]) if len(np.unique(y_true[:, j])) == 2]
        if not cols:
            return float("nan")
        return float(np.mean([binary_auc(y_true[:, j], y_score[:, j]) for j in cols]))
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    scores = [binary_auc(y_true == c, y_score[:, c]) for c in present]
    return float(np.mean(scores))


def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, *, task: Task, threshold: float = 0.5
) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy, sensitivity and specificity.

    Binary: at ``threshold`` on the positive-class probability. Multi-class: arg-max decision,
    sensitivity and specificity averaged over classes (macro). Multi-label: per-label decisions at
    ``threshold``, averaged over labels.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    out = {"auc": auc(y_true, y_score, task=task), "n": float(len(y_true))}
    if task is Task.BINARY:
        pred = (y_score >= threshold).astype(np.int64)
        sens, spec = _sens_spec(y_true, pred)
        out.update(accuracy=float(np.mean(pred == y_true)), sensitivity=sens, specificity=spec)
    elif task is Task.MULTILABEL:
        pred = (y_score >= threshold).astype(np.int64)
        pairs = [_sens_spec(y_true[:, j], pred[:, j]) for j in range(y_true.shape[1])]
        out.update(
            accuracy=float(np.mean(pred == y_true)),
            sensitivity=float(np.nanmean([p[0] for p in pairs])),
            specificity=float(np.nanmean([p[1] for p in pairs])),
        )
    else:
        k = y_score.shape[1]
        pred = y_score.argmax(axis=1)
        cm = np.bincount(y_true.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)  # rows: truth
        tp = np.diag(cm).astype(np.float64)
        support = cm.sum(axis=1).astype(np.float64)
        predicted = cm.sum(axis=0).astype(np.float64)
        negatives = cm.sum() - support
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, tp / support, np.nan)
            tnr = np.where(negatives > 0, (negatives - (predicted - tp)) / negatives, np.nan)
        out.update(
            accuracy=float(np.mean(pred == y_true)),
            sensitivity=float(np.nanmean(recall)),
            specificity=float(np.nanmean(tnr)),
        )
    out["balanced_accuracy"] = (
        float(np.nanmean([out["sensitivity"], out["specificity"]]))
        if task is not Task.MULTICLASS and task is not Task.ORDINAL
        else out["sensitivity"]  # macro recall
    )
    return out


def _sens_spec(y_true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    pos = y_true == 1
    neg = ~pos
    sens = float(np.mean(pred[pos] == 1)) if pos.any() else float("nan")
    spec = float(np.mean(pred[neg] == 0)) if neg.any() else float("nan")
    return sens, spec


def bootstrap_auc_ci(
    y_true: np.ndarray, y_score: np.ndarray, *, task: Task, n_boot: int = 500, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC over test records."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        value = auc(y_true[idx], y_score[idx], task=task)
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


# ---------------------------------------------------------------- federated validation statistics
#: Bin edges on the logit scale (probabilities 4.5e-5 .. 0.99995, half a logit apart):
#: well-trained models put most scores near 0 or 1, where equal-width probability bins would
#: lump them together.
LOGIT_EDGES = np.linspace(-10.0, 10.0, 41)
HISTOGRAM_BINS = len(LOGIT_EDGES) + 1


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def score_histogram(y_true: np.ndarray, p_pos: np.ndarray) -> np.ndarray:
    """Counts of validation records per score bin, one row per class: ``(2, HISTOGRAM_BINS)``.

    This aggregate is what a site shares about its validation split (binary tasks).
    """
    idx = np.searchsorted(LOGIT_EDGES, _logit(p_pos), side="right")
    hist = np.zeros((2, HISTOGRAM_BINS), dtype=np.int64)
    np.add.at(hist, (np.asarray(y_true, dtype=np.int64), idx), 1)
    return hist


def auc_from_histogram(hist: np.ndarray) -> float:
    """AUC implied by summed class histograms (ties within a bin count one half)."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    wins = np.sum(pos * (neg_below + 0.5 * neg))
    return float(wins / (pos.sum() * neg.sum()))


def threshold_from_histogram(hist: np.ndarray, *, edges: np.ndarray = LOGIT_EDGES) -> float:
    """Probability threshold at a bin edge (of logit ``edges``) that maximises balanced accuracy (Youden's J)."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return 0.5
    # Predict positive for bins >= k: sensitivity = pos[k:]/P, specificity = neg[:k]/N.
    sens = np.cumsum(pos[::-1])[::-1] / pos.sum()
    spec = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) / neg.sum()
    j = sens + spec
    best = np.flatnonzero(j >= j.max() - 1e-12)
    k = int(best[len(best) // 2])  # middle of a plateau of equally good edges
    if k == 0:
        return 0.0
    return float(1.0 / (1.0 + np.exp(-edges[k - 1])))
