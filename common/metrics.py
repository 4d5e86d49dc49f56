"""Clinical classification metrics: AUC, accuracy, balanced accuracy, sensitivity, specificity, Cohen's κ.

Scores are probabilities: ``(N,)`` of the positive class for binary tasks, ``(N, C)`` class
probabilities for multi-class, ``(N, L)`` per-label probabilities for multi-label.
The histogram functions let sites share only aggregate counts of validation scores, from
which the coordinator derives a federated AUC and a decision rule (:class:`Decision`): a threshold for binary
tasks, per-class logit offsets for multi-class tasks, cut points on the expected grade for ordinal tasks.

The AUC is the Mann-Whitney statistic on mid-ranks, in numpy: equal to scikit-learn's
``roc_auc_score`` (the reference in the tests) without importing scikit-learn and SciPy, about
1.5 s that every ClientApp process of a deployed node would pay to validate a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Decision:
    """How a multi-class or ordinal model's class probabilities become one class.

    ``offsets``: the class with the largest ``logit(p_k) + offsets[k]`` (all zero: the plain arg-max).
    ``cuts``: ordinal, the grade ``g`` with ``cuts[g-1] <= sum_k k p_k < cuts[g]`` (the expected grade cut at
    ``grades - 1`` increasing points). Exactly one of the two is set.
    """

    offsets: tuple[float, ...] = ()
    cuts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.offsets) == bool(self.cuts):
            raise ValueError("a Decision has either per-class offsets or ordinal cut points, not both or neither")
        if self.cuts and any(b < a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
            raise ValueError(f"cut points {list(self.cuts)} are not increasing")

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """The class (grade) of each row of ``scores`` ``(N, C)``."""
        p = np.asarray(scores, dtype=np.float64)
        if self.cuts:
            grade = p @ np.arange(p.shape[1], dtype=np.float64)
            return np.searchsorted(np.asarray(self.cuts), grade, side="right").astype(np.int64)
        return (_logit(p) + np.asarray(self.offsets)).argmax(axis=1).astype(np.int64)

    def to_meta(self) -> dict[str, Any]:
        """JSON form (checkpoint metadata, ``metrics.jsonl``, ``summary.json``)."""
        if self.cuts:
            return {"kind": "ordinal-cut-points", "cut_points": [round(c, 6) for c in self.cuts]}
        return {"kind": "class-offsets", "offsets": [round(o, 6) for o in self.offsets]}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Decision | None:
        """The rule :meth:`to_meta` wrote; ``None`` for no rule (plain arg-max, also written ``{"kind": "argmax"}``)."""
        if not meta or meta.get("kind") == "argmax":
            return None
        if meta.get("kind") == "ordinal-cut-points":
            return cls(cuts=tuple(float(c) for c in meta["cut_points"]))
        return cls(offsets=tuple(float(o) for o in meta["offsets"]))


def confusion(y_true: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts ``(classes, classes)``: rows the true class, columns the prediction."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    return np.bincount(y * classes + np.asarray(pred).astype(np.int64).ravel(),
                       minlength=classes * classes).reshape(classes, classes)


def kappa_from_confusion(cm: np.ndarray) -> float:
    """Quadratic-weighted Cohen's κ of a (possibly noisy, non-negative) confusion table; NaN when undefined."""
    cm = np.asarray(cm, dtype=np.float64)
    k, total = cm.shape[0], cm.sum()
    if total <= 0:
        return float("nan")
    grades = np.arange(k, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2 / max(k - 1, 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / total
    denominator = float((weights * expected).sum())
    return float(1.0 - (weights * cm).sum() / denominator) if denominator > 0 else float("nan")


def quadratic_kappa(y_true: np.ndarray, pred: np.ndarray, *, classes: int) -> float:
    """Quadratic-weighted Cohen's κ between true and predicted grades ``0 .. classes - 1``."""
    return kappa_from_confusion(confusion(y_true, pred, classes))


def balanced_accuracy_from_confusion(cm: np.ndarray) -> float:
    """Mean recall over the classes present (row sum > 0) of a confusion table."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, *, task: Task, threshold: float = 0.5, decision: Decision | None = None
) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy, sensitivity and specificity (and quadratic κ for ordinal tasks).

    Binary: at ``threshold`` on the positive-class probability. Multi-class and ordinal: ``decision`` (arg-max
    when ``None``), sensitivity and specificity averaged over classes (macro). Multi-label: per-label decisions at
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
        pred = decision.predict(y_score) if decision is not None else y_score.argmax(axis=1)
        cm = confusion(y_true, pred, k)  # rows: truth
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
    if task is Task.ORDINAL:
        out["kappa"] = kappa_from_confusion(cm)
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


def _youden_bin(hist: np.ndarray) -> int | None:
    """First bin predicted positive that maximises sensitivity + specificity (``None``: a class is missing)."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return None
    # Predict positive for bins >= k: sensitivity = pos[k:]/P, specificity = neg[:k]/N.
    sens = np.cumsum(pos[::-1])[::-1] / pos.sum()
    spec = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) / neg.sum()
    j = sens + spec
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return int(best[len(best) // 2])  # middle of a plateau of equally good edges


def threshold_from_histogram(hist: np.ndarray, *, edges: np.ndarray = LOGIT_EDGES) -> float:
    """Probability threshold at a bin edge (of logit ``edges``) that maximises balanced accuracy (Youden's J)."""
    k = _youden_bin(hist)
    if k is None:
        return 0.5
    if k == 0:
        return 0.0
    return float(1.0 / (1.0 + np.exp(-edges[k - 1])))


def offsets_from_histograms(hists: np.ndarray, *, edges: np.ndarray = LOGIT_EDGES) -> Decision:
    """Multi-class: per-class logit offsets from one-vs-rest score histograms ``(classes, 2, bins)``.

    Class ``k``'s offset is minus the logit edge at which its one-vs-rest balanced accuracy (Youden's J) peaks, so
    the rule predicts the class whose score clears its own federated threshold by the most: a model that gives
    every record a high probability of the majority class (an under-confident or collapsed one) is scored against
    that class's usual level, not against 0.5. A class without a threshold (one side of its histogram empty) keeps
    offset 0; an edge before the first bin or after the last counts as one logit beyond the outer edges.
    """
    offsets = []
    outer = np.concatenate([[edges[0] - 1.0], edges, [edges[-1] + 1.0]])
    for hist in hists:
        k = _youden_bin(hist)
        offsets.append(0.0 if k is None else -float(outer[k]))
    return Decision(offsets=tuple(offsets))


def cuts_from_grade_table(table: np.ndarray, edges: np.ndarray) -> Decision:
    """Ordinal: cut points on the expected grade that maximise balanced accuracy on a (noisy) grade table.

    ``table[g, b]`` counts records of true grade ``g`` whose expected grade fell in bin ``b`` (bins split at
    ``edges``). Each grade is assigned a run of consecutive bins, in grade order (possibly empty); the assignment
    that maximises the mean over present grades of the fraction of their records in their own run is found
    exactly by dynamic programming over the run boundaries. A cut point at no edge lies half a grade outside
    ``[0, grades - 1]``.
    """
    table = np.clip(np.asarray(table, dtype=np.float64), 0, None)
    grades, bins = table.shape
    support = table.sum(axis=1)
    weight = np.where(support > 0, 1.0 / np.maximum(support, 1e-12), 0.0)
    cum = np.concatenate([np.zeros((grades, 1)), np.cumsum(table, axis=1)], axis=1) * weight[:, None]
    # best[g, j]: best score of grades < g covering bins [0, j); start[g, j]: where grade g - 1's run began.
    best = np.full((grades + 1, bins + 1), -np.inf)
    best[0, 0] = 0.0
    start = np.zeros((grades + 1, bins + 1), dtype=np.int64)
    for g in range(grades):
        for j in range(bins + 1):
            gains = best[g, : j + 1] + cum[g, j] - cum[g, : j + 1]
            i = int(np.argmax(gains))
            best[g + 1, j], start[g + 1, j] = gains[i], i
    bounds, j = [], bins
    for g in range(grades, 0, -1):
        j = int(start[g, j])
        bounds.append(j)
    bounds = bounds[::-1][1:]  # where grades 1 .. grades - 1 begin
    outer = np.concatenate([[-0.5], edges, [grades - 0.5]])
    return Decision(cuts=tuple(float(outer[b]) for b in bounds))
