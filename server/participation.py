"""Who took part in a round, named: contributors, refusals, failures and sites that went silent.

Flower hands the strategy the replies that arrived and, under SecAgg+, errors without the node that sent them. A
site that was asked to train and whose reply never came (a crash, a network failure, the round timeout) leaves no
trace there, although it may have trained and charged its privacy ledger. :class:`Participation` reads the round's
exchange record (:mod:`server.exchange`) beside the replies and keeps, for one run:

- the name of each node (from the coordinator's registry, else from the sites' own reports, else ``node <id>``);
- each site's latest report of its ε (every reply carries the site's ledger totals) and whether the site went
  silent after it, so that ``federated.json`` flags an ε that may be out of date as ``stale``.

Each round's findings go into its :class:`RoundRecord`, one line of ``metrics.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.common import Error
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from common.wire import SiteReport, WireError
from server.exchange import TRAINING_STAGES, RoundExchange
from server.site_reports import RejectedReply, privacy_row

#: What a site that went silent at each stage may have done, as the round's ``dropped`` entries say.
DROPPED_NOTES = {
    "training": "asked to train, no reply before the round timeout: it may have trained and charged this round; "
                "its ε below is the last it reported",
    "key-exchange": "stopped answering during the SecAgg+ key exchange, before any training request: nothing "
                    "trained or charged this round",
    "unmask": "sent its masked update, then no unmasking share before the round timeout (its ε includes the round)",
    "evaluate": "asked to validate the final model, no reply before the timeout: it may have released its "
                "validation statistic and charged it; its ε below is the last it reported",
    "other": "no reply before the round timeout",
}

#: Longest failure reason kept (the tail of a stack trace names the cause).
REASON_CHARS = 300


@dataclass
class RoundRecord:
    """Everything observed about one round, written as one line of ``metrics.jsonl``.

    ``sites_answered`` counts the contributors, the sites whose update is in the aggregate (0 for a round not
    aggregated); ``refused`` lists ``{"site", "reason"}`` (``"stage"`` for a SecAgg+ refusal); ``failures`` the
    failures as text (``"site: reason"``) and ``failed`` the same as ``{"site", "node_id", "stage", "reason"}``;
    ``dropped`` the sites asked at some stage that never answered, ``{"site", "node_id", "stage", "note"}``;
    ``halted_stage`` the SecAgg+ stage at which a round stopped without aggregating (``None`` otherwise).
    """

    round: int
    started: float = field(default_factory=time.time)
    fit_s: float | None = None
    sites_sampled: int = 0
    sites_answered: int = 0
    sites_failed: int = 0
    failures: list[str] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None
    privacy: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] = field(default_factory=dict)
    val_sites: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)
    contributors: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    halted_stage: str | None = None

    def line(self, elapsed_s: float) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` line (the keys older readers know first)."""
        return {
            "round": self.round, "elapsed_s": elapsed_s, "fit_s": self.fit_s, "sites_sampled": self.sites_sampled,
            "sites_answered": self.sites_answered, "sites_failed": self.sites_failed, "failures": self.failures,
            "refused": self.refused, "train_loss": self.train_loss, "val": self.val, "val_sites": self.val_sites,
            "test": self.test, "privacy": self.privacy, "contributors": self.contributors, "failed": self.failed,
            "dropped": self.dropped, "halted_stage": self.halted_stage,
        }


@dataclass
class Failure:
    """One failed reply, attributed to its node and stage where the exchange record allows."""

    reason: str
    node_id: int | None = None
    stage: str | None = None
    report: SiteReport | None = None


def _stage_kind(stage: str | None) -> str:
    if stage is None or stage in TRAINING_STAGES:
        return "training"
    if stage in ("setup", "share-keys"):
        return "key-exchange"
    return stage if stage in DROPPED_NOTES else "other"


def identify_failures(failures: list[Any], exchange: RoundExchange | None) -> list[Failure]:
    """Each distinct failure with its reason, and its node and stage when known.

    A SecAgg+ failure is ``Exception(flwr Error)`` without a node id (Flower's masked-vector stage lists each error
    twice, once per loop): it is matched to the exchange record's error replies by reason. A reason carrying a
    :class:`SiteReport` (a site's refusal) is decoded; one that is malformed is a failure of its own.
    """
    claims = [(s.stage, node, reason) for s in (exchange.stages if exchange else []) if s.stage != "evaluate"
              for node, reason in sorted(s.errors.items())]
    claimed: set[int] = set()
    seen: set[int] = set()
    out: list[Failure] = []
    for failure in failures:
        node: int | None = None
        stage: str | None = None
        if isinstance(failure, tuple):
            proxy, res = failure
            node, stage, reason = int(proxy.node_id), "fit", str(res.status.message)
        elif isinstance(failure, RejectedReply):
            node, stage, reason = failure.node_id, "fit", failure.reason
        else:
            error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
            if isinstance(error, Error):
                if id(error) in seen:
                    continue  # the same error reply, listed twice by Flower
                seen.add(id(error))
                reason = str(error.reason or f"error code {error.code}")
            else:
                reason = str(failure)
            match = next((i for i, c in enumerate(claims) if i not in claimed and c[2] == reason), None)
            if match is not None:
                claimed.add(match)
                stage, node = claims[match][0], claims[match][1]
        report = None
        try:
            report = SiteReport.from_error_reason(reason)
        except WireError as exc:
            reason = f"{exc} ({reason[:REASON_CHARS]})"
        out.append(Failure(reason=reason.strip()[-REASON_CHARS:] if report is None else reason, node_id=node,
                           stage=stage, report=report))
    return out


@dataclass
class Participation:
    """Node names and each site's latest ε report across a run (see module docstring)."""

    #: Node id -> display name: the registry's kit names (set by the ServerApp), else learned from replies.
    node_names: dict[int, str] = field(default_factory=dict)
    #: Node id -> the name its reports carry (the key of its privacy rows).
    reported_as: dict[int, str] = field(default_factory=dict)
    #: Site -> {"reported_round": k, "silent_round": r or None}: its latest report, and a silence after it.
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Node id -> last round it was asked to train or validate, for nodes that never sent a report.
    unreported: dict[int, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ names and events
    def name_of(self, node_id: int) -> str:
        """The node's site name, ``node <id>`` when it is not known."""
        return self.node_names.get(node_id) or f"node {node_id}"

    def reported(self, node_id: int | None, report: SiteReport, server_round: int) -> str:
        """Note a report from ``node_id`` (its ε is the site's ledger total now); return the site's key."""
        if node_id is None:
            site = report.site or "unknown site"
        else:
            site = report.site or self.name_of(node_id)
            self.reported_as[node_id] = site
            self.unreported.pop(node_id, None)
            if report.site and node_id not in self.node_names:
                self.node_names[node_id] = report.site
        self.sites[site] = {"reported_round": server_round, "silent_round": None}
        return site

    def silent(self, node_id: int, server_round: int) -> str | None:
        """Note that ``node_id`` may have spent ε without reporting it; return its site key if it ever reported."""
        site = self.reported_as.get(node_id)
        if site is None or site not in self.sites:
            self.unreported[node_id] = server_round
            return None
        self.sites[site]["silent_round"] = server_round
        return site

    # ------------------------------------------------------------------ rounds
    def account_fit(self, rec: RoundRecord, replies: list[tuple[ClientProxy, Any, SiteReport]], failures: list[Any],
                    exchange: RoundExchange | None, privacy_by_site: dict[str, list[dict[str, Any]]],
                    ) -> list[tuple[ClientProxy, Any]]:
        """Record a training exchange's replies, refusals, failures and silences; return the updates to average."""
        r = rec.round
        accepted = []
        for proxy, res, report in replies:
            site = self.reported(int(proxy.node_id), report, r)
            if report.dp:
                add_privacy(rec, privacy_by_site, site, privacy_row(report, r))
            if report.refused:
                rec.refused.append({"site": site, "reason": report.reason})
                log(WARNING, "%s refused round %d: %s", site, r, report.reason)
                continue
            accepted.append((proxy, res))
        for failure in identify_failures(failures, exchange):
            if failure.report is not None:
                report = failure.report
                site = self.reported(failure.node_id, report, r)
                if report.dp:
                    add_privacy(rec, privacy_by_site, site, privacy_row(report, r))
                rec.refused.append({"site": site, "reason": report.reason or "refused", "stage": failure.stage})
                log(WARNING, "%s refused round %d at the %s stage: %s", site, r, failure.stage or "training",
                    report.reason)
                continue
            name = None if failure.node_id is None else self.name_of(failure.node_id)
            rec.failed.append({"site": name, "node_id": failure.node_id, "stage": failure.stage,
                               "reason": failure.reason})
            rec.failures.append(f"{name}: {failure.reason}" if name else failure.reason)
            log(WARNING, "%s failed round %d%s: %s", name or "a site", r,
                f" at the {failure.stage} stage" if failure.stage else "", failure.reason)
            if failure.node_id is not None and failure.stage in TRAINING_STAGES:
                self._carry_stale(rec, privacy_by_site, failure.node_id)
        for stage in exchange.stages if exchange else []:
            if stage.stage != "evaluate":
                for node in sorted(stage.silent):
                    self._dropped(rec, privacy_by_site, node, stage.stage)
        rec.sites_failed = len(rec.failed)
        return accepted

    def account_evaluate(self, rec: RoundRecord, replies: list[tuple[ClientProxy, Any, SiteReport]],
                         failures: list[Any], exchange: RoundExchange | None) -> None:
        """Record the final validation exchange: who reported, who failed, who went silent after reporting."""
        for proxy, _, report in replies:
            self.reported(int(proxy.node_id), report, rec.round)
        evaluate = exchange.stage("evaluate") if exchange else None
        for node, reason in sorted(evaluate.errors.items()) if evaluate else []:
            refusal = _report_in(reason)
            if refusal is not None:
                self.reported(node, refusal, rec.round)
                continue
            name = self.name_of(node)
            rec.failed.append({"site": name, "node_id": node, "stage": "evaluate", "reason": reason[-REASON_CHARS:]})
            log(WARNING, "%s failed the validation of round %d: %s", name, rec.round, reason[-REASON_CHARS:])
            self._mark_stale(rec, self.silent(node, rec.round))
        if evaluate is None and failures:
            log(WARNING, "%d site(s) failed the validation of round %d", len(failures), rec.round)
        for node in sorted(evaluate.silent) if evaluate else []:
            self._dropped(rec, {}, node, "evaluate")

    def _dropped(self, rec: RoundRecord, privacy_by_site: dict[str, list[dict[str, Any]]], node: int,
                 stage: str) -> None:
        kind = _stage_kind(stage)
        name = self.name_of(node)
        rec.dropped.append({"site": name, "node_id": node, "stage": stage, "note": DROPPED_NOTES[kind]})
        log(WARNING, "%s did not answer the %s request of round %d: %s", name, stage, rec.round, DROPPED_NOTES[kind])
        if kind == "training":
            self._carry_stale(rec, privacy_by_site, node)
        elif kind == "evaluate":
            self._mark_stale(rec, self.silent(node, rec.round))

    def _carry_stale(self, rec: RoundRecord, privacy_by_site: dict[str, list[dict[str, Any]]], node: int) -> None:
        """A site that may have trained without reporting: its last reported ε, flagged stale, in this round's rows."""
        site = self.silent(node, rec.round)
        rows = privacy_by_site.get(site or "")
        if site is None or not rows or any(p["site"] == site for p in rec.privacy):
            self._mark_stale(rec, site)
            return
        last = rows[-1]
        rec.privacy.append({**last, "round": rec.round, "stale": True,
                            "reported_round": self.sites[site]["reported_round"]})

    @staticmethod
    def _mark_stale(rec: RoundRecord, site: str | None) -> None:
        for row in rec.privacy:
            if site is not None and row["site"] == site:
                row["stale"] = True

    # ------------------------------------------------------------------ the run's summary
    def federated_privacy(self, privacy_by_site: dict[str, list[dict[str, Any]]],
                          last_training_round: int) -> list[dict[str, Any]]:
        """Each site's latest ε, with the round of its latest report and ``stale`` when it may be out of date.

        Stale: the site did not report in the run's last training exchange, or went silent after its last report
        (the site's own ledger is then authoritative).
        """
        out = []
        for site, rows in sorted(privacy_by_site.items()):
            state = self.sites.get(site, {})
            reported = int(state.get("reported_round", rows[-1]["round"]))
            stale = state.get("silent_round") is not None or reported < last_training_round
            out.append({**rows[-1], "rounds_trained": len(rows), "reported_round": reported, "stale": stale})
        return out

    def never_reported(self) -> list[dict[str, Any]]:
        """Nodes asked to train or validate that never sent a report: the coordinator knows nothing of their ε."""
        return [{"site": self.name_of(node), "node_id": node, "last_asked_round": r}
                for node, r in sorted(self.unreported.items())]

    # ------------------------------------------------------------------ resume
    def to_meta(self) -> dict[str, Any]:
        """JSON-able state for a resumed run (node ids as text keys)."""
        return {"node_names": {str(k): v for k, v in self.node_names.items()},
                "reported_as": {str(k): v for k, v in self.reported_as.items()},
                "sites": self.sites, "unreported": {str(k): v for k, v in self.unreported.items()}}

    def restore(self, meta: dict[str, Any]) -> None:
        """Continue from :meth:`to_meta`'s state; names already set (the registry's) are kept."""
        for key, name in meta.get("node_names", {}).items():
            self.node_names.setdefault(int(key), str(name))
        self.reported_as.update({int(k): str(v) for k, v in meta.get("reported_as", {}).items()})
        self.sites.update({str(k): dict(v) for k, v in meta.get("sites", {}).items()})
        self.unreported.update({int(k): int(v) for k, v in meta.get("unreported", {}).items()})


def add_privacy(rec: RoundRecord, privacy_by_site: dict[str, list[dict[str, Any]]], site: str,
                row: dict[str, Any]) -> None:
    """Add a site's privacy row for the round; a later report of the same round replaces the earlier one."""
    row = {**row, "site": site}
    rec.privacy[:] = [p for p in rec.privacy if p["site"] != site] + [row]
    rows = privacy_by_site.setdefault(site, [])
    if rows and rows[-1]["round"] == rec.round:
        rows[-1] = row
    else:
        rows.append(row)


def _report_in(reason: str) -> SiteReport | None:
    try:
        return SiteReport.from_error_reason(reason)
    except WireError:
        return None
