"""The coordinator's reading of site replies: typed reports (:mod:`common.wire`) and the released validation.

Everything here is post-processing of what the sites released: their DP validation sums become histograms,
AUC, a threshold or mean Dice; their reports become the privacy rows of ``metrics.jsonl``. The site registry
of a deployed coordinator names the nodes (:func:`site_names_from_registry`).
"""

from __future__ import annotations

import json
import os
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from common.datasets import DatasetInfo, Task
from common.errors import ConfigError
from common.metrics import auc_from_histogram, threshold_from_histogram
from common.wire import VALIDATION_LOGIT_EDGES, SiteReport, ValidationLayout, WireError


class RejectedReply(WireError):
    """A reply refused by the allow-list, kept as a failure of its node."""

    def __init__(self, node_id: int, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id
        self.reason = reason


def parsed(results: list[tuple[ClientProxy, Any]], failures: list[Any]) -> tuple[
        list[tuple[ClientProxy, Any, SiteReport]], list[Any]]:
    """Replies with their :class:`SiteReport`, ordered by site name (then node id), whatever order they arrived in.

    A reply whose metrics break the allow-list of :mod:`common.wire` is counted as a failure
    (:class:`RejectedReply`), not used.
    """
    parsed, failed = [], list(failures)
    for proxy, res in results:
        try:
            parsed.append((proxy, res, SiteReport.from_metrics(dict(res.metrics))))
        except WireError as exc:
            failed.append(RejectedReply(int(proxy.node_id), str(exc)))
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
    """One site's privacy accounting for a round, as ``metrics.jsonl`` and ``federated.json`` list it.

    ``reported_round`` is the round of the report the row carries; ``stale`` is set on rows whose site may have
    spent more since (see :mod:`server.participation`).
    """
    return {
        "site": report.site, "round": server_round, "epsilon": report.epsilon, "delta": report.delta,
        "accountant": report.accountant, "sampling": "poisson", "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate, "max_grad_norm": report.max_grad_norm,
        "epsilon_lifetime": report.epsilon_lifetime, "delta_lifetime": report.delta_lifetime,
        "privacy_unit": report.privacy_unit, "randomness": report.randomness,
        "validation_noise": report.validation_noise, "reported_round": server_round, "stale": False,
    }


def site_names_from_registry(path: str | os.PathLike[str] | None) -> dict[int, str]:
    """Node id -> site name from the coordinator kit's ``state/registry.json`` (see :mod:`server.superlink`).

    ``None`` or an empty path gives no names; a missing file gives none with a warning (sites are then named by
    their own reports). A registry that cannot be read raises :class:`~common.errors.ConfigError`.
    """
    if not path:
        return {}
    registry = Path(path)
    if not registry.is_file():
        log(WARNING, "site registry %s not found: sites are named by their replies", registry)
        return {}
    try:
        data = json.loads(registry.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"site registry {registry} cannot be read ({exc}); point MEDSILO_SITE_REGISTRY at "
                           "the coordinator kit's state/registry.json"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"site registry {registry} is not a JSON object of site name -> entry"])
    names: dict[int, str] = {}
    for site, entry in sorted(data.items()):
        node = entry.get("node_id") if isinstance(entry, dict) else None
        if isinstance(node, int) and not isinstance(node, bool):
            names[node] = str(site)
    return names
