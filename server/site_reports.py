"""The coordinator's reading of site replies: typed reports (:mod:`common.wire`) and the released validation.

Everything here is post-processing of what the sites released: their DP validation sums become histograms,
AUC, a threshold or mean Dice; their reports become the privacy rows of ``metrics.jsonl``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.server.client_proxy import ClientProxy

from common.datasets import DatasetInfo, Task
from common.metrics import auc_from_histogram, threshold_from_histogram
from common.wire import VALIDATION_LOGIT_EDGES, SiteReport, ValidationLayout, WireError


def parsed(results: list[tuple[ClientProxy, Any]], failures: list[Any]) -> tuple[
        list[tuple[ClientProxy, Any, SiteReport]], list[Any]]:
    """Replies with their :class:`SiteReport`, ordered by site name (then node id), whatever order they arrived in.

    A reply whose metrics break the allow-list of :mod:`common.wire` is counted as a failure, not used.
    """
    parsed, failed = [], list(failures)
    for proxy, res in results:
        try:
            parsed.append((proxy, res, SiteReport.from_metrics(dict(res.metrics))))
        except WireError as exc:
            failed.append(exc)
    return sorted(parsed, key=lambda pr: (pr[2].site, str(pr[0].cid))), failed


def statistics(layout: ValidationLayout, released: np.ndarray, info: DatasetInfo) -> dict[str, Any]:
    """AUC (macro over outputs), threshold (binary), estimated count, or Dice per class, from a released sum."""
    task = info.task
    if task is Task.SEGMENTATION:
        sums, defined = layout.dice(released)
        dice = np.where(defined >= 0.5, np.clip(sums / np.maximum(defined, 1e-9), 0, 1), np.nan)
        out: dict[str, Any] = {"dice": {label: float(d) for label, d in zip(info.labels, dice, strict=True)}}
        out["dice_mean"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
        out["dice_defined"] = int(np.isfinite(dice).any())
        return out
    hists = layout.histograms(released)
    aucs = [auc_from_histogram(h) for h in hists]
    finite = [a for a in aucs if np.isfinite(a)]
    out = {"auc": float(np.mean(finite)) if finite else float("nan"), "auc_defined": int(bool(finite)),
           "n_estimate": float(hists[0].sum())}
    if task is Task.BINARY:
        out["threshold"] = threshold_from_histogram(hists[0], edges=VALIDATION_LOGIT_EDGES)
    return out


def privacy_row(report: SiteReport, server_round: int) -> dict[str, Any]:
    """One site's privacy accounting for a round, as ``metrics.jsonl`` and ``federated.json`` list it."""
    return {
        "site": report.site, "round": server_round, "epsilon": report.epsilon, "delta": report.delta,
        "accountant": report.accountant, "sampling": "poisson", "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate, "max_grad_norm": report.max_grad_norm,
        "epsilon_lifetime": report.epsilon_lifetime, "delta_lifetime": report.delta_lifetime,
        "privacy_unit": report.privacy_unit, "randomness": report.randomness,
        "validation_noise": report.validation_noise,
    }
