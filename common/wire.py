"""What crosses the wire from a site to the coordinator: the one allow-list, as typed records.

Every value a site sends is one of:

- **masked**: summed under SecAgg+ before the coordinator sees it (the model update, SCAFFOLD's control variate);
- **accounted**: released by a DP mechanism whose cost is in the site's accountant and ledger (the record
  count behind the FedAvg weight, the validation statistics), or computed from such releases only;
- **public**: data-independent (settings, names, the site's budget and what it has spent, refusal reasons).

:class:`SiteReport` is what a fit or evaluate reply carries beside its arrays; the site builds it with
:meth:`SiteReport.to_metrics` and the coordinator reads it with :meth:`SiteReport.from_metrics`, which refuses
any key that is not in :data:`FIELDS`. A test sends every kind of message through the real ClientApp and
checks each key it finds against this module.

:class:`ValidationLayout` fixes the shape of the validation statistic: each validation record contributes one
row of L2 norm at most 1 (a one-hot score-bin per class, one cell of an ordinal task's true grade x expected grade
table, or a volume's Dice per class), so the sum over records has sensitivity 1 and the Gaussian mechanism of
:mod:`client.dp.release` releases it; the coordinator decodes the noisy sum into histograms, AUC, a decision
rule (threshold, class offsets, grade cut points) or mean Dice (post-processing, free of privacy cost).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import numpy as np

from common.datasets import DatasetInfo, Task
from common.errors import DataError


class Disclosure(Enum):
    """How a value that leaves a site is protected."""

    MASKED = "masked by SecAgg+"
    ACCOUNTED = "released under DP, inside the site's ε"
    PUBLIC = "data-independent"


@dataclass(frozen=True)
class Field:
    """One allowed key of a site's reply: its protection and why it is safe to send."""

    disclosure: Disclosure
    why: str


#: Every key a site's reply may carry in its metrics, and the reply's other parts.
FIELDS: dict[str, Field] = {
    "site": Field(Disclosure.PUBLIC, "the node's display name, from the hospital's node config"),
    "refused": Field(Disclosure.PUBLIC, "whether the site refused; decided from settings, budget and policy"),
    "reason": Field(Disclosure.PUBLIC, "the refusal reason: settings, budgets, ε (no record, count or score)"),
    "dp": Field(Disclosure.PUBLIC, "whether the site trained with DP-SGD (run config)"),
    "randomness": Field(Disclosure.PUBLIC, "where the mechanism's randomness came from (os-entropy or research)"),
    "epsilon": Field(Disclosure.PUBLIC, "ε the run has spent: a function of the plan (DP releases) and the rounds"),
    "epsilon-lifetime": Field(Disclosure.PUBLIC, "lifetime ε of the site's data source, from the same plans"),
    "epsilon-budget": Field(Disclosure.PUBLIC, "the run's ε budget at the site (run config capped by policy)"),
    "delta": Field(Disclosure.PUBLIC, "δ of the run's ε (run config)"),
    "delta-lifetime": Field(Disclosure.PUBLIC, "δ of the lifetime ε (site policy)"),
    "accountant": Field(Disclosure.PUBLIC, "the Opacus accountant (run config)"),
    "privacy-unit": Field(Disclosure.PUBLIC, "record or patient: what one DP unit is at this site"),
    "noise-multiplier": Field(Disclosure.ACCOUNTED, "DP-SGD's σ: calibrated from the DP record count"),
    "sample-rate": Field(Disclosure.ACCOUNTED, "Poisson rate q: computed from the DP record count"),
    "max-grad-norm": Field(Disclosure.PUBLIC, "the clipping bound (run config)"),
    "steps": Field(Disclosure.PUBLIC, "DP-SGD steps this round: always the planned number (empty batches too)"),
    "validated-round": Field(Disclosure.PUBLIC, "which global model the validation statistic scores (-1: none)"),
    "validation": Field(Disclosure.ACCOUNTED, "noisy sum of validation rows (Gaussian, sensitivity 1)"),
    "validation-noise": Field(Disclosure.PUBLIC, "σ of that release (run config, or its ε-scaled default)"),
    "validation-refused": Field(Disclosure.PUBLIC, "why no validation statistic was released"),
}

#: The reply's parts outside the metrics.
REPLY_PARTS: dict[str, Field] = {
    "parameters": Field(Disclosure.MASKED, "local minus global weights (and SCAFFOLD's c_i), summed under SecAgg+; "
                                           "without SecAgg+ (an explicit opt-out) a DP-SGD output"),
    "num_examples": Field(Disclosure.ACCOUNTED, "the DP estimate of the site's privacy units (0 when refused)"),
    "loss": Field(Disclosure.PUBLIC, "always 0.0: no validation loss is released"),
}

#: Keys of Flower's SecAgg+ protocol records (key exchange, encrypted shares, masked vector, unmasking shares).
SECAGG_PROTOCOL = Field(Disclosure.MASKED, "SecAgg+ protocol: public keys, encrypted key shares, the masked vector")


class WireError(DataError):
    """A reply with a key or value outside the allow-list."""


#: Flower error code of a site's refusal sent as an error reply rather than as metrics: a site that refuses a
#: SecAgg+ round drops out of the masked sum (a zero vector of a refusing site would leave the others' sum one
#: contributor short without anyone knowing), and a site refuses to unmask a sum below its cohort floor.
REFUSAL_CODE = 4100

#: How a refusal's :class:`SiteReport` starts inside a Flower error reason.
REFUSAL_PREFIX = "medsilo-site-report:"


@dataclass(frozen=True)
class SiteReport:
    """What a site's fit or evaluate reply says beside its arrays (see :data:`FIELDS`)."""

    site: str
    refused: bool = False
    reason: str = ""
    dp: bool = False
    randomness: str = ""
    epsilon: float = 0.0
    epsilon_lifetime: float = 0.0
    epsilon_budget: float = 0.0
    delta: float = 0.0
    delta_lifetime: float = 0.0
    accountant: str = ""
    privacy_unit: str = "record"
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    max_grad_norm: float = 0.0
    steps: int = 0
    validated_round: int = -1
    validation: str = ""
    validation_noise: float = 0.0
    validation_refused: str = ""

    def to_metrics(self) -> dict[str, bool | int | float | str]:
        """The reply's metrics: every field under its kebab-case key."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> SiteReport:
        """Parse a reply's metrics; a key outside :data:`FIELDS` or a value of the wrong type is refused."""
        unknown = sorted(set(metrics) - set(FIELDS))
        if unknown:
            raise WireError(f"a site reply carries key(s) {unknown} outside the allow-list (common/wire.py)")
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in metrics:
                continue
            kind: type = str if f.name == "site" else type(getattr(cls, f.name))
            raw = metrics[key]
            if kind is bool:
                values[f.name] = bool(raw)
            elif kind in (int, float) and isinstance(raw, (int, float)) and not isinstance(raw, bool):
                values[f.name] = kind(raw)
            elif kind is str and isinstance(raw, str):
                values[f.name] = raw
            else:
                raise WireError(f"a site reply's {key}={raw!r} is not a {kind.__name__}")
        values.setdefault("site", "")
        return cls(**values)

    def to_error_reason(self) -> str:
        """The report as the reason text of a Flower error reply (a refusal that is not a reply with metrics)."""
        return REFUSAL_PREFIX + json.dumps(self.to_metrics(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_error_reason(cls, reason: str) -> SiteReport | None:
        """The report inside an error reply's reason, ``None`` when the error is not a medsilo site's refusal.

        The payload passes the same allow-list as :meth:`from_metrics`.
        """
        if not reason.startswith(REFUSAL_PREFIX):
            return None
        try:
            metrics = json.loads(reason[len(REFUSAL_PREFIX):])
        except json.JSONDecodeError:
            raise WireError("a site refusal's report is not JSON") from None
        if not isinstance(metrics, dict):
            raise WireError("a site refusal's report is not a JSON object")
        return cls.from_metrics(metrics)


#: Logit edges of the validation score bins: 12 bins of one logit from -5 to 5, plus the two open ends.
VALIDATION_LOGIT_EDGES = np.linspace(-5.0, 5.0, 11)

#: Ordinal tasks: bins of the expected grade per grade step (the expected grade of ``K`` grades lies in [0, K-1]).
GRADE_BINS_PER_STEP = 8


def grade_edges(grades: int) -> np.ndarray:
    """Inner edges of the expected-grade bins of an ordinal task with ``grades`` grades (width 1/8 of a grade)."""
    return np.linspace(0.0, grades - 1.0, GRADE_BINS_PER_STEP * (grades - 1) + 1)[1:-1]


@dataclass(frozen=True)
class ValidationLayout:
    """The validation statistic's layout for a task (shared by the site that builds it and the coordinator).

    Binary, multi-class and multi-label: one score histogram per output (one-vs-rest for multi-class and
    multi-label tasks), two rows (label negative, positive) of ``len(VALIDATION_LOGIT_EDGES) + 1`` bins each; a
    record adds a one-hot to each output's histogram, scaled by ``1 / sqrt(outputs)`` so that its row has L2 norm
    1. Ordinal: a table of true grade x expected-grade bin (:func:`grade_edges`; the expected grade is
    ``sum_k k p_k``); a record adds a single 1 (norm 1, no scaling). Segmentation: per foreground class a volume's
    Dice (0 when undefined) and whether it is defined, scaled by ``1 / sqrt(2 C)``.

    Sensitivity: adding or removing one record (or one patient, whose rows are averaged: a convex combination of
    rows of norm 1 has norm at most 1) moves the sum by a row of L2 norm at most 1, so the Gaussian mechanism of
    :func:`client.dp.release.noisy_sum` with σ_V is the one the site's accountant charges; the layout, not the
    data, decides which cells a record may touch.
    """

    task: Task
    outputs: int

    @classmethod
    def for_dataset(cls, info: DatasetInfo) -> ValidationLayout:
        """The layout of ``info``'s task: one output for a binary task, else one per label (or class, or grade)."""
        return cls(task=info.task, outputs=1 if info.task is Task.BINARY else len(info.labels))

    @property
    def ordinal(self) -> bool:
        return self.task is Task.ORDINAL

    @property
    def bins(self) -> int:
        """Bins of one histogram row: score bins, or expected-grade bins for an ordinal task."""
        if self.ordinal:
            return len(grade_edges(self.outputs)) + 1
        return len(VALIDATION_LOGIT_EDGES) + 1

    @property
    def groups(self) -> int:
        """How many parts each record's row has (it is scaled by ``1 / sqrt(groups)``)."""
        if self.ordinal:
            return 1
        return 2 * self.outputs if self.task is Task.SEGMENTATION else self.outputs

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.groups)

    @property
    def size(self) -> int:
        if self.ordinal:
            return self.outputs * self.bins
        return 2 * self.outputs if self.task is Task.SEGMENTATION else self.outputs * 2 * self.bins

    def rows(self, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Each classification record's row, ``(n, size)``; ``scores``: probabilities as the model outputs them."""
        labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
        n = len(labels)
        if self.ordinal:
            grade = scores.reshape(n, self.outputs) @ np.arange(self.outputs, dtype=np.float64)
            cell = labels.reshape(n).astype(np.int64) * self.bins + np.searchsorted(
                grade_edges(self.outputs), grade, side="right")
            table = np.zeros((n, self.size))
            table[np.arange(n), cell] = 1.0
            return table
        if self.task is Task.BINARY:
            y, p = labels.reshape(n, 1), scores.reshape(n, 1)
        elif self.task is Task.MULTILABEL:
            y, p = labels.reshape(n, self.outputs), scores.reshape(n, self.outputs)
        else:
            y = (labels.reshape(n, 1) == np.arange(self.outputs)).astype(np.int64)
            p = scores.reshape(n, self.outputs)
        logits = np.log(np.clip(p, 1e-12, 1)) - np.log(np.clip(1 - p, 1e-12, 1))
        idx = np.searchsorted(VALIDATION_LOGIT_EDGES, logits, side="right")  # (n, outputs)
        out = np.zeros((n, self.outputs, 2, self.bins))
        rec, k = np.meshgrid(np.arange(n), np.arange(self.outputs), indexing="ij")
        out[rec, k, y.astype(np.int64), idx] = 1.0
        return out.reshape(n, self.size) * self.scale

    def grade_table(self, released: np.ndarray) -> np.ndarray:
        """Ordinal: noisy counts ``(grades, bins)`` of true grade x expected-grade bin, negatives set to 0."""
        if not self.ordinal:
            raise ValueError(f"{self.task.value}: a grade table exists for ordinal tasks only")
        return np.clip(np.asarray(released, dtype=np.float64).reshape(self.outputs, self.bins), 0, None)

    def volume_rows(self, dice: np.ndarray) -> np.ndarray:
        """Each segmentation volume's row from its per-class Dice ``(n, outputs)`` (NaN: undefined)."""
        dice = np.asarray(dice, dtype=np.float64).reshape(-1, self.outputs)
        defined = np.isfinite(dice)
        return np.concatenate([np.where(defined, np.clip(dice, 0, 1), 0.0), defined.astype(np.float64)], axis=1) \
            * self.scale

    def histograms(self, released: np.ndarray) -> np.ndarray:
        """Noisy counts ``(outputs, 2, bins)`` from a released sum, negative counts set to 0 (post-processing).

        Ordinal: ``(grades - 1, 2, bins)``, the expected-grade histograms of each cumulative split (grade below
        ``k`` against grade ``k`` or above, ``k = 1 .. grades - 1``), so that AUC reads them as it reads scores.
        """
        if self.ordinal:
            table = self.grade_table(released)
            below = np.cumsum(table, axis=0)[:-1]
            return np.stack([below, table.sum(axis=0) - below], axis=1)
        return np.clip(np.asarray(released, dtype=np.float64).reshape(self.outputs, 2, self.bins) / self.scale, 0, None)

    def dice(self, released: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Dice sums, defined counts) per foreground class from a released sum (counts clipped at 0)."""
        values = np.asarray(released, dtype=np.float64).reshape(2, self.outputs) / self.scale
        return values[0], np.clip(values[1], 0, None)


def encode_values(values: np.ndarray) -> str:
    """A released vector as text (metrics carry scalars and strings): comma-separated, 3 decimals."""
    return ",".join(f"{v:.3f}" for v in np.asarray(values, dtype=np.float64).ravel())


def decode_values(text: str, *, size: int) -> np.ndarray:
    """The vector :func:`encode_values` wrote; a wrong length or a non-finite value is a :class:`WireError`."""
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64) if text else np.zeros(0)
    except ValueError as exc:
        raise WireError(f"a validation statistic is not a list of numbers ({exc})") from None
    if values.size != size or not np.isfinite(values).all():
        raise WireError(f"a validation statistic has {values.size} values (expected {size}, all finite)")
    return values
