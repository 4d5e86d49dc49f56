"""The coordinator's strategy: a Flower aggregation rule plus medsilo's round bookkeeping.

:class:`FederationStrategy` delegates aggregation to a stock Flower strategy (FedAvg, FedProx,
FedAdam) and adds what a coordinator needs: refused rounds kept out of the average, each
site's ε per round, federated validation statistics (AUC and a decision rule from the summed noisy
statistics: a binary threshold, multi-class logit offsets or ordinal cut points), server-side test metrics
under that rule, and best / final checkpoints carrying it.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from common import audit, control_variates, crypto
from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import DatasetInfo, Task
from common.io import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from common.metrics import Decision
from common.models import build_model, resolve_model_name
from common.training import ndarrays_to_state, state_to_ndarrays
from common.wire import SiteReport, ValidationLayout, decode_values
from server.evaluation import TestSet, validation_decision
from server.exchange import RecordingGrid, RoundExchange
from server.participation import Participation, RoundRecord
from server.progress import RoundProgress, round_text
from server.resume import ResumeState, restore_strategy_arrays, strategy_arrays
from server.site_reports import parsed, statistics

__all__ = ["FederationStrategy", "RoundRecord", "build_inner_strategy", "initial_parameters"]

#: Name of SCAFFOLD's control variate among the arrays a resumed run restores (see :mod:`server.resume`).
CONTROL_ARRAYS = "control"


def build_inner_strategy(config: RunConfig, initial: Parameters, min_sites: int) -> Strategy:
    """The stock Flower aggregation rule named by ``config.strategy``."""
    common: dict[str, Any] = dict(
        fraction_fit=config.fraction_fit,
        fraction_evaluate=1.0,
        min_fit_clients=max(1, min(min_sites, round(config.fraction_fit * min_sites))),
        min_evaluate_clients=min_sites,
        min_available_clients=min_sites,
        accept_failures=True,
        initial_parameters=initial,
    )
    if config.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=1.0, server_momentum=config.server_momentum, **common)
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_lr, eta_l=config.lr, beta_1=0.9, beta_2=0.99, tau=1e-3, **common)
    return FedAvg(**common)


class FederationStrategy(Strategy):
    """Delegating strategy with medsilo's bookkeeping (see module docstring)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        config: RunConfig,
        info: DatasetInfo,
        out_dir: Path,
        test_set: TestSet | None,
        run_key: int = 0,
        progress: RoundProgress | None = None,
        signer: crypto.Signer | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        #: Signs the coordinator's audit log (its kit's ``server.key``), when the ServerApp has it.
        self.signer = signer
        self.config = config
        self.info = info
        self.out_dir = out_dir
        self.test_set = test_set
        self.model = build_model(config.model, info)
        self.records: dict[int, RoundRecord] = {}
        #: Global weights of rounds not yet finished (validation arrives with the next exchange).
        self.params_by_round: dict[int, list[np.ndarray]] = {}
        self.finished: set[int] = set()
        self.test_scores: dict[int, np.ndarray] = {}
        self.best: dict[str, Any] | None = None
        #: Rounds whose sites' updates were aggregated into the global model (a resumed run keeps the count).
        self.aggregated_rounds: list[int] = []
        self.privacy_by_site: dict[str, list[dict[str, Any]]] = {}
        self.fit_base: dict[int, list[np.ndarray]] = {}
        self.t0 = time.time()
        #: The run's identity at the sites' privacy ledgers; a resumed run keeps the first run's.
        self.run_key = run_key
        self.progress = progress
        self._resumed: ResumeState | None = None
        #: The metric that ranks rounds: test-set AUC, or mean Dice for segmentation.
        self.primary = "dice_mean" if info.task is Task.SEGMENTATION else "auc"
        #: SCAFFOLD's control variate ``c`` (``scaffold`` runs): the sites' last mean gradients, averaged.
        self.control: list[np.ndarray] | None = (
            [np.zeros_like(a) for a in state_to_ndarrays(self.model)] if config.scaffold else None
        )
        #: Who was asked and who answered, per round and exchange (set by the ServerApp; see server.exchange).
        self.exchanges: RecordingGrid | None = None
        #: Node names, each site's latest ε report and silences (see server.participation).
        self.participation = Participation()

    @property
    def node_names(self) -> dict[int, str]:
        """Node id -> site name (the ServerApp fills it from the registry; replies fill the gaps)."""
        return self.participation.node_names

    @node_names.setter
    def node_names(self, names: dict[int, str]) -> None:
        self.participation.node_names = dict(names)

    def __repr__(self) -> str:
        return f"FederationStrategy({self.inner!r})"

    def _audit(self, record: dict[str, Any]) -> None:
        """Append to the run's audit log, signed when the coordinator's key is available."""
        audit.append(self.out_dir / "audit.jsonl", record, signer=self.signer)

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(round=server_round))

    # ------------------------------------------------------------------ checkpoint and resume
    def save_state(self, server_round: int) -> None:
        """Atomically save what a resumed run needs to continue after ``server_round`` (see server.resume)."""
        rec = self._record(server_round)
        meta = {
            "record": asdict(rec),
            "best": self.best,
            "aggregated_rounds": self.aggregated_rounds,
            "privacy_by_site": self.privacy_by_site,
            "participation": self.participation.to_meta(),
            "elapsed_s": round(time.time() - self.t0, 2),
        }
        arrays = strategy_arrays(self.inner)
        if self.control is not None:
            arrays[CONTROL_ARRAYS] = self.control
        ResumeState(
            round=server_round, run_key=self.run_key, weights=self.params_by_round[server_round],
            strategy_arrays=arrays, meta=meta, test_scores=self.test_scores.get(server_round),
        ).save(self.out_dir)

    def restore(self, state: ResumeState) -> None:
        """Continue from ``state``: rounds up to ``state.round`` are done, its validation is pending.

        ``metrics.jsonl`` keeps the lines of the rounds before ``state.round`` (the pending round's line,
        if a crash came after it was written, is written again when its validation arrives).
        """
        r = state.round
        self._resumed = state
        self.run_key = state.run_key
        arrays = dict(state.strategy_arrays)
        control = arrays.pop(CONTROL_ARRAYS, None)
        if self.control is not None and control is not None:
            self.control = [np.array(c, copy=True) for c in control]
        restore_strategy_arrays(self.inner, arrays)
        self.params_by_round = {r: [np.array(w, copy=True) for w in state.weights]}
        self.records = {r: RoundRecord(**state.meta["record"])}
        if state.test_scores is not None:
            self.test_scores = {r: state.test_scores}
        self.best = state.meta.get("best")
        # A state saved before the count was kept: its rounds count as aggregated (it had a model).
        self.aggregated_rounds = [int(x) for x in state.meta.get("aggregated_rounds", range(1, r + 1))]
        self.privacy_by_site = {k: list(v) for k, v in state.meta.get("privacy_by_site", {}).items()}
        self.participation.restore(state.meta.get("participation", {}))
        self.finished = set(range(r))
        self.t0 = time.time() - float(state.meta.get("elapsed_s", 0.0))
        metrics = self.out_dir / "metrics.jsonl"
        kept = [row for row in read_jsonl(metrics) if int(row["round"]) < r] if metrics.is_file() else []
        atomic_write_text(metrics, "".join(json.dumps(row, sort_keys=False) + "\n" for row in kept))
        self._audit({
            "side": "coordinator", "event": "resumed", "after_round": r,
            "model_sha256": audit.digest(*[np.ascontiguousarray(w).tobytes() for w in state.weights]),
        })
        log(INFO, "medsilo: resuming after round %d of %d (%s)", r, self.config.rounds, self.out_dir)

    # ------------------------------------------------------------------ delegation
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if self._resumed is not None:
            return ndarrays_to_parameters(self._resumed.weights)
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        if self.control is not None:
            sent = self._with_control(parameters)
            for ins in {id(ins): ins for _, ins in instructions}.values():  # stock strategies share one FitIns
                ins.parameters = sent
        validate = server_round - 1 if server_round - 1 in self.config.validated_rounds() else -1
        for _, ins in instructions:
            ins.config["server-round"] = server_round
            ins.config["secure-aggregation"] = int(self.config.secure_aggregation)
            # The model sent is round server_round - 1's aggregate: validated in the same exchange where planned.
            ins.config["validate-round"] = validate
            ins.config["run-key"] = self.run_key
        self._record(server_round).sites_sampled = len(instructions)
        self.fit_base = {server_round: parameters_to_ndarrays(parameters)}
        self._audit({
            "side": "coordinator", "event": "sent-global-model", "round": server_round,
            "sites": len(instructions), "model_sha256": _sha(parameters),
            "secure_aggregation": self.config.secure_aggregation,
        })
        return instructions

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if server_round < self.config.rounds:
            return []  # sites validate this model at the start of the next round's training exchange
        # The final model goes to the sites that are there now: waiting for min-sites (what the stock strategy does)
        # would block for ever once a site has died during the run.
        available = client_manager.num_available()
        if available == 0:
            return []
        config: dict[str, Scalar] = {"server-round": server_round, "validate-round": server_round,
                                     "run-key": self.run_key}
        ins = EvaluateIns(parameters, config)
        return [(proxy, ins) for proxy in client_manager.sample(num_clients=available, min_num_clients=1)]

    # ------------------------------------------------------------------ fit
    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rec, replies, accepted = self._account_fit(server_round, results, failures)
        if not accepted:
            log(WARNING, "round %d: no site update to aggregate; keeping the global model", server_round)
            self._audit_aggregated(rec, replies, None)
            return None, {}
        rec.contributors = [self.participation.reported_as.get(int(p.node_id), str(p.cid)) for p, _ in accepted]
        rec.sites_answered = len(accepted)
        aggregated, agg_metrics = self.inner.aggregate_fit(
            server_round, self._as_weights(server_round, self._take_control(accepted)), failures
        )
        if aggregated is not None:
            self.aggregated_rounds.append(server_round)
        self._audit_aggregated(rec, replies, aggregated)
        return aggregated, agg_metrics

    def round_not_aggregated(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                             failures: list[Any], stage: str) -> None:
        """A secure round stopped at ``stage`` (see server.secure_workflow): record it, aggregate nothing.

        ``results`` are the masked replies of sites whose sum was never unmasked: their reports (ε, validation of
        the previous model) count, their updates do not. The global model, the aggregation rule's state and
        SCAFFOLD's ``c`` stay as they were.
        """
        log(WARNING, "round %d: secure aggregation stopped at the %s stage; nothing aggregated", server_round, stage)
        rec, replies, _ = self._account_fit(server_round, results, failures)
        rec.halted_stage = stage
        self._audit_aggregated(rec, replies, None)

    def _account_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any],
                     ) -> tuple[RoundRecord, list[tuple[ClientProxy, FitRes, SiteReport]],
                                list[tuple[ClientProxy, FitRes]]]:
        """Finish the previous round with the validation these replies carry; record this round's participation."""
        rec = self._record(server_round)
        rec.fit_s = round(time.time() - rec.started, 2)  # training request -> every reply (all SecAgg+ stages)
        # Replies arrive in scheduling order; a fixed order makes the float sums (and a resumed run) reproducible.
        replies, failures = parsed(results, failures)
        if server_round - 1 not in self.finished:
            self._validation(server_round - 1, [(p, r) for p, r, _ in replies])
            self._finish_round(server_round - 1)
        accepted = self.participation.account_fit(rec, replies, failures, self._exchange(server_round),
                                                  self.privacy_by_site)
        rec.contributors, rec.sites_answered = [], 0  # set when the updates are aggregated
        return rec, replies, accepted

    def _exchange(self, server_round: int) -> RoundExchange | None:
        return None if self.exchanges is None else self.exchanges.rounds.get(server_round)

    def _audit_aggregated(self, rec: RoundRecord, replies: list[tuple[ClientProxy, FitRes, SiteReport]],
                          aggregated: Parameters | None) -> None:
        received = [
            {"site": self.participation.reported_as.get(int(p.node_id), report.site), "num_examples": r.num_examples,
             "refused": int(report.refused), "epsilon": report.epsilon, "epsilon_lifetime": report.epsilon_lifetime}
            for p, r, report in replies
        ]
        self._audit({
            "side": "coordinator", "event": "aggregated", "round": rec.round, "received": received,
            "failures": rec.sites_failed, "refused": len(rec.refused), "dropped": len(rec.dropped),
            "halted_stage": rec.halted_stage,
            # Under SecAgg+ every result carries the same unmasked sum: one digest, no individual update.
            "update_sha256": sorted({_sha(r.parameters) for _, r, _ in replies}),
            "aggregate_sha256": _sha(aggregated) if aggregated is not None else None,
        })

    def _with_control(self, parameters: Parameters) -> Parameters:
        """The global weights followed, under SCAFFOLD, by the control variate ``c`` in its wire form."""
        if self.control is None:
            return parameters
        wire = ndarrays_to_parameters(control_variates.encode(self.control, config=self.config))
        return Parameters(tensors=[*parameters.tensors, *wire.tensors], tensor_type=parameters.tensor_type)

    def _take_control(self, results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
        """Under SCAFFOLD: set ``c`` to the weighted mean of the sites' ``c_i``; return the bare updates.

        Under SecAgg+ every result carries the same unmasked weighted mean, which is then ``c`` itself. With
        ``fraction_fit < 1`` it is the mean over the round's sites only, an approximation of SCAFFOLD's
        running update ``c += |S|/N * mean(Δc_i)`` that needs no per-site bookkeeping at the coordinator.
        """
        if self.control is None:
            return results
        n = len(self.control)
        # Under SecAgg+ all results share one Parameters object: split and decode it once.
        halves: dict[int, tuple[Parameters, list[np.ndarray]]] = {}
        updates, controls = [], []
        for proxy, res in results:
            key = id(res.parameters)
            if key not in halves:
                kind = res.parameters.tensor_type
                weights, wire = control_variates.split(res.parameters.tensors, model_arrays=n)
                halves[key] = (Parameters(tensors=weights, tensor_type=kind), control_variates.decode(
                    parameters_to_ndarrays(Parameters(tensors=wire, tensor_type=kind)), config=self.config))
            update, control = halves[key]
            controls.append(control)
            updates.append((proxy, FitRes(res.status, update, res.num_examples, res.metrics)))
        self.control = control_variates.weighted_mean(controls, [r.num_examples for _, r in results])
        return updates

    def _as_weights(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> list[tuple[ClientProxy, FitRes]]:
        """Sites send updates (local minus global weights); the stock strategies average weights.

        Under SecAgg+ every result already carries the same unmasked sum, so this adds the round's
        global weights to that one aggregate update.
        """
        base = self.fit_base[server_round]
        converted: dict[int, Parameters] = {}
        out = []
        for proxy, res in results:
            key = id(res.parameters)
            if key not in converted:
                update = parameters_to_ndarrays(res.parameters)
                converted[key] = ndarrays_to_parameters(
                    [(b + u).astype(b.dtype, copy=False) for b, u in zip(base, update, strict=True)]
                )
            out.append((proxy, FitRes(res.status, converted[key], res.num_examples, res.metrics)))
        return out

    # ------------------------------------------------------------------ centralized evaluation
    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self._resumed is not None and server_round == self._resumed.round:
            return None  # evaluated before the restart; the checkpoint carries its scores
        self.params_by_round[server_round] = parameters_to_ndarrays(parameters)
        if self.test_set is None:
            if server_round > 0:
                self.save_state(server_round)
            return None
        ndarrays_to_state(self.model, self.params_by_round[server_round])
        scores = self.test_set.scores(self.model)
        self.test_scores[server_round] = scores
        if server_round > 0:
            self.save_state(server_round)
        m = self.test_set.metrics(scores)
        if server_round > 0:
            log(INFO, "medsilo round %d/%d aggregated | test %s %s (validation follows with the next exchange)",
                server_round, self.config.rounds, self.primary, _fmt(m[self.primary]))
        return 0.0, {self.primary: m[self.primary]}

    # ------------------------------------------------------------------ federated evaluation
    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        replies, failures = parsed(results, failures)
        self._validation(server_round, [(p, r) for p, r, _ in replies])
        rec = self._record(server_round)
        self.participation.account_evaluate(rec, replies, failures, self._exchange(server_round))
        val = rec.val
        self._finish_round(server_round)
        return None, {k: v for k, v in val.items() if isinstance(v, (int, float))}

    def _validation(self, server_round: int, replies: list[tuple[ClientProxy, Any]]) -> None:
        """Combine the sites' released validation statistics of the model of ``server_round`` (no record is pooled).

        Each site released a noisy sum of per-record rows (:class:`common.wire.ValidationLayout`); the sums add up
        to the federation's noisy score histograms (or Dice sums), from which AUC, the decision threshold and mean
        Dice follow. Negative noisy counts are set to zero; everything here is post-processing.
        """
        rec = self._record(server_round)
        layout = ValidationLayout.for_dataset(self.info)
        total: np.ndarray | None = None
        for proxy, res in replies:
            report = SiteReport.from_metrics(dict(res.metrics))
            site = report.site or self.participation.name_of(int(proxy.node_id))
            self._latest_epsilon(site, report)
            if report.validated_round != server_round or not report.validation:
                if report.validation_refused:
                    rec.val_sites.append({"site": site, "refused": report.validation_refused})
                continue
            released = decode_values(report.validation, size=layout.size)
            total = released if total is None else total + released
            rec.val_sites.append({"site": site, "noise": report.validation_noise,
                                  **statistics(layout, released, self.info)})
        rec.val = statistics(layout, total, self.info) if total is not None else {}
        if total is not None:
            rec.val.update(validation_decision(layout, total)[1])
            rec.val["sites"] = len([v for v in rec.val_sites if "refused" not in v])

    def _latest_epsilon(self, site: str, report: SiteReport) -> None:
        """A site's ε after a release outside training (the final validation) updates its latest privacy row."""
        rows = self.privacy_by_site.get(site)
        if not report.dp or not rows or report.epsilon <= rows[-1]["epsilon"]:
            return
        rows[-1] = {**rows[-1], "epsilon": report.epsilon, "epsilon_lifetime": report.epsilon_lifetime,
                    "validation_noise": report.validation_noise or rows[-1].get("validation_noise", 0.0)}

    # ------------------------------------------------------------------ bookkeeping
    def _threshold(self, rec: RoundRecord) -> float:
        return float(rec.val.get("threshold", 0.5)) if self.info.task is Task.BINARY else 0.5

    @staticmethod
    def _decision(rec: RoundRecord) -> Decision | None:
        """Multi-class and ordinal: the rule chosen from the round's federated validation (``None``: arg-max)."""
        return Decision.from_meta(rec.val.get("decision"))

    def _finish_round(self, server_round: int) -> None:
        rec = self._record(server_round)
        threshold = self._threshold(rec)
        scores = self.test_scores.get(server_round)
        if scores is not None and self.test_set is not None:
            rec.test = self.test_set.metrics(scores, threshold=threshold, decision=self._decision(rec))
        line = rec.line(round(time.time() - self.t0, 2))
        append_jsonl(self.out_dir / "metrics.jsonl", line)
        if self.progress is not None:
            self.progress.round_finished(line)
        self.finished.add(server_round)
        params = self.params_by_round.pop(server_round, None)
        if params is not None and server_round > 0:
            self._checkpoints(server_round, rec, threshold, params)
        log(INFO, "medsilo %s", round_text(line, rounds=self.config.rounds,
                                           epsilon=self.config.epsilon if self.config.dp else None))

    def _meta(self, server_round: int, threshold: float) -> dict[str, Any]:
        return {
            "dataset": self.info.name,
            "task": self.info.task.value,
            "labels": list(self.info.labels),
            "model": resolve_model_name(self.config.model, self.info),
            "round": server_round,
            "threshold": threshold,
            "dp": self.config.dp,
            "epsilon": self.config.epsilon if self.config.dp else None,
            "delta": self.config.delta if self.config.dp else None,
        }

    def _checkpoints(self, server_round: int, rec: RoundRecord, threshold: float, params: list[np.ndarray]) -> None:
        if not self.aggregated_rounds:  # still the initial weights: not a result, so no model file says it is
            return
        ndarrays_to_state(self.model, params)
        state = self.model.state_dict()
        meta = self._meta(server_round, threshold)
        if rec.val.get("decision"):
            meta["decision"] = rec.val["decision"]
        save_checkpoint(self.out_dir / "model-final.safetensors", state, meta)
        val_auc = rec.val.get(self.primary)
        # A validated round always beats one without validation; among those, the latest.
        score = float(val_auc) if val_auc is not None and np.isfinite(val_auc) else -1e6 + server_round
        if self.best is None or score > self.best["val_auc"]:
            self.best = {"round": server_round, "val_auc": score, "threshold": threshold}
            save_checkpoint(self.out_dir / "model-best.safetensors", state, meta)

    def summary(self) -> dict[str, Any]:
        """Final and best-by-validation results, each site's ε, written to ``federated.json``."""
        for server_round in sorted(self.params_by_round):
            if server_round not in self.finished:  # e.g. no site answered the final validation
                self._finish_round(server_round)
        out: dict[str, Any] = {"rounds": self.config.rounds, "strategy": self.config.aggregation,
                               "aggregated_rounds": len(self.aggregated_rounds)}
        final_round = max((r for r in self.records if r > 0), default=0)
        if self.test_set is not None and self.aggregated_rounds:  # the initial model's scores are no result
            for key, rnd in (("final", final_round), ("best", (self.best or {}).get("round", final_round))):
                scores = self.test_scores.get(rnd)
                if scores is not None:
                    thr = self._threshold(self._record(rnd))
                    m = self.test_set.metrics(scores, threshold=thr, with_ci=True, seed=self.config.seed,
                                              decision=self._decision(self._record(rnd)))
                    m["round"] = rnd
                    out[key] = m
        if self.best:
            out["best_round"] = self.best["round"]
        last_training = max((r for r, rec in self.records.items() if r > 0 and rec.sites_sampled), default=0)
        out["privacy"] = self.participation.federated_privacy(self.privacy_by_site, last_training)
        out["never_reported"] = self.participation.never_reported()
        if not self.aggregated_rounds:
            out["why_not_aggregated"] = self.why_not_aggregated()
        atomic_write_json(self.out_dir / "federated.json", out)
        best_round = out.get("best", {}).get("round")
        if best_round is not None and best_round in self.test_scores:
            buffer = io.BytesIO()
            np.save(buffer, self.test_scores[best_round], allow_pickle=False)
            atomic_write_bytes(self.out_dir / "test_scores.npy", buffer.getvalue())
        return out

    def why_not_aggregated(self) -> list[str]:
        """Each distinct reason a round aggregated nothing, with the sites that gave it (refusals, then failures)."""
        by_reason: dict[str, set[str]] = {}
        for rec in (self.records[r] for r in sorted(self.records) if r > 0):
            for outcome, rows, default in (("refused", rec.refused, "refused"), ("failed", rec.failed, "no reply")):
                for row in rows:
                    by_reason.setdefault(f"{outcome}: {row.get('reason', default)}", set()).add(row["site"])
            if rec.halted_stage:
                by_reason.setdefault(f"secure aggregation stopped at the {rec.halted_stage} stage", set())
        if not by_reason:
            return ["no site answered a training request"]
        return [f"{', '.join(sorted(sites))} {reason}" if sites else reason for reason, sites in by_reason.items()]


def _sha(parameters: Parameters) -> str:
    return audit.digest(*parameters.tensors)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.4f}"


def initial_parameters(config: RunConfig, info: DatasetInfo) -> Parameters:
    """Seeded initial weights (optionally from a transfer-learning checkpoint)."""
    from common.checkpoint import initial_model

    model = initial_model(config, info)
    return ndarrays_to_parameters([v.detach().cpu().numpy() for v in model.state_dict().values()])


