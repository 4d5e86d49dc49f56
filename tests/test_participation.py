"""Honest participation: every site asked is accounted for, by name, and an ε that may be out of date says so."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, Error, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from render_probe import proxy
from test_report import _run_outputs

from common import audit
from common.config import RunConfig
from common.datasets import dataset_info
from common.errors import ConfigError
from common.wire import REFUSAL_CODE, SiteReport
from server.exchange import RecordingGrid, RoundExchange, StageOutcome
from server.participation import DROPPED_NOTES
from server.progress import RoundProgress
from server.resume import ResumeState
from server.site_reports import site_names_from_registry
from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters
from simulations.report import write_report

INFO = dataset_info("breastmnist")
SITES = {10: "site-a", 11: "site-b", 12: "site-c"}




def _strategy(tmp_path: Path, *, rounds: int = 2, strategy: str = "fedavg",
              min_sites: int = 2) -> tuple[FederationStrategy, Parameters, io.StringIO, RecordingGrid]:
    cfg = RunConfig(dataset="breastmnist", strategy=strategy, min_sites=min_sites, rounds=rounds, server_eval=False,
                    epsilon=8.0)
    initial = initial_parameters(cfg, INFO)
    stream = io.StringIO()
    progress = RoundProgress(rounds=rounds, epsilon=8.0, tensorboard_dir=None, stream=stream)
    coordinator = FederationStrategy(build_inner_strategy(cfg, initial, min_sites), config=cfg, info=INFO,
                                     out_dir=tmp_path, test_set=None, progress=progress)
    grid = RecordingGrid(object())  # type: ignore[arg-type]  # only its round records are read here
    coordinator.exchanges = grid
    coordinator.evaluate(0, initial)
    return coordinator, initial, stream, grid


def _manager(nodes: list[int]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(proxy(node))
    return manager


def _report(node: int, epsilon: float, **extra: Any) -> SiteReport:
    return SiteReport(site=SITES.get(node, f"site-{node}"), dp=True, epsilon=epsilon, epsilon_lifetime=epsilon,
                      delta=1e-5, accountant="rdp", noise_multiplier=1.1, sample_rate=0.1, **extra)


def _reply(node: int, parameters: Parameters, epsilon: float) -> tuple[ClientProxy, FitRes]:
    update = ndarrays_to_parameters([np.full_like(w, 0.01) for w in parameters_to_ndarrays(parameters)])
    return proxy(node), FitRes(Status(Code.OK, ""), update, 40, dict(_report(node, epsilon).to_metrics()))


def _record(grid: RecordingGrid, server_round: int, *stages: StageOutcome) -> None:
    grid.rounds[server_round] = RoundExchange(round=server_round, stages=list(stages))


def _rows(tmp_path: Path) -> dict[int, dict[str, Any]]:
    return {row["round"]: row for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}


def _privacy(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["site"]: p for p in row["privacy"]}


# ------------------------------------------------------------------------------ (a) silent in training
def test_a_site_silent_in_training_is_named_and_its_last_epsilon_is_flagged_stale(tmp_path) -> None:
    # Prepare: three sites answer round 1; in round 2 site-c receives the training request and never answers.
    coordinator, initial, stream, grid = _strategy(tmp_path)
    manager = _manager(list(SITES))
    coordinator.configure_fit(1, initial, manager)
    _record(grid, 1, StageOutcome("fit", asked=set(SITES), replied=set(SITES)))
    model1, _ = coordinator.aggregate_fit(1, [_reply(n, initial, 1.0) for n in SITES], [])
    assert model1 is not None
    coordinator.evaluate(1, model1)
    coordinator.configure_fit(2, model1, manager)
    _record(grid, 2, StageOutcome("fit", asked=set(SITES), replied={10, 11}))
    # Execute
    model2, _ = coordinator.aggregate_fit(2, [_reply(n, model1, 2.0) for n in (10, 11)], [])
    assert model2 is not None
    coordinator.evaluate(2, model2)
    federated = coordinator.summary()
    # Assert: round 2's row names the silent site and carries its round-1 ε, flagged stale
    row = _rows(tmp_path)[2]
    assert row["sites_sampled"] == 3 and row["sites_answered"] == 2 and row["contributors"] == ["site-a", "site-b"]
    assert row["dropped"] == [{"site": "site-c", "node_id": 12, "stage": "fit", "note": DROPPED_NOTES["training"]}]
    assert not row["refused"] and not row["failures"] and row["sites_failed"] == 0
    privacy = _privacy(row)
    assert privacy["site-c"]["stale"] is True and privacy["site-c"]["reported_round"] == 1
    assert privacy["site-c"]["epsilon"] == 1.0
    assert privacy["site-a"]["stale"] is False and privacy["site-a"]["reported_round"] == 2
    # ... the round line names it ...
    lines = stream.getvalue().splitlines()
    round2 = next(line for line in lines if line.startswith("round 2/2"))
    assert "sites 2/3 contributed" in round2 and "dropped: site-c (fit)" in round2 and "ε stale: site-c" in round2
    # ... and federated.json keeps its last reported ε as stale, with the round of that report.
    on_disk = json.loads((tmp_path / "federated.json").read_text())
    assert on_disk["privacy"] == federated["privacy"]
    by_site = {p["site"]: p for p in on_disk["privacy"]}
    assert by_site["site-c"]["stale"] is True and by_site["site-c"]["reported_round"] == 1
    assert by_site["site-c"]["epsilon"] == 1.0 and by_site["site-c"]["rounds_trained"] == 1
    assert by_site["site-a"]["stale"] is False and by_site["site-a"]["epsilon"] == 2.0


def test_a_site_that_answers_again_is_up_to_date_and_a_node_that_never_reported_is_listed(tmp_path) -> None:
    # Prepare: site-c is silent in round 1 and answers round 2 (its reply carries its ledger's totals); node 13
    # never answers at all.
    coordinator, initial, _, grid = _strategy(tmp_path)
    nodes = [*SITES, 13]
    manager = _manager(nodes)
    coordinator.configure_fit(1, initial, manager)
    _record(grid, 1, StageOutcome("fit", asked=set(nodes), replied={10, 11}))
    model1, _ = coordinator.aggregate_fit(1, [_reply(n, initial, 1.0) for n in (10, 11)], [])
    assert model1 is not None
    coordinator.evaluate(1, model1)
    coordinator.configure_fit(2, model1, manager)
    _record(grid, 2, StageOutcome("fit", asked=set(nodes), replied=set(SITES)))
    # Execute
    model2, _ = coordinator.aggregate_fit(2, [_reply(n, model1, 2.0) for n in SITES], [])
    assert model2 is not None
    coordinator.evaluate(2, model2)
    federated = coordinator.summary()
    # Assert: site-c's ε is its latest report's (2.0, up to date); node 13 is named by id in every round and
    # listed as never reported.
    rows = _rows(tmp_path)
    assert [d["site"] for d in rows[1]["dropped"]] == ["node 12", "node 13"]  # unknown before it ever answered
    assert [d["site"] for d in rows[2]["dropped"]] == ["node 13"]
    by_site = {p["site"]: p for p in federated["privacy"]}
    assert by_site["site-c"]["epsilon"] == 2.0 and by_site["site-c"]["stale"] is False
    assert federated["never_reported"] == [{"site": "node 13", "node_id": 13, "last_asked_round": 2}]


def test_a_site_silent_in_the_final_validation_has_its_epsilon_flagged_stale(tmp_path) -> None:
    # Prepare: one round; every site trains; site-b never answers the final validation request.
    coordinator, initial, _, grid = _strategy(tmp_path, rounds=1)
    coordinator.configure_fit(1, initial, _manager(list(SITES)))
    model1, _ = coordinator.aggregate_fit(1, [_reply(n, initial, 1.0) for n in SITES], [])
    assert model1 is not None
    coordinator.evaluate(1, model1)
    _record(grid, 1, StageOutcome("fit", asked=set(SITES), replied=set(SITES)),
            StageOutcome("evaluate", asked=set(SITES), replied={10, 12}))
    # Execute
    coordinator.aggregate_evaluate(1, [], [])
    federated = coordinator.summary()
    # Assert
    row = _rows(tmp_path)[1]
    assert row["dropped"] == [{"site": "site-b", "node_id": 11, "stage": "evaluate", "note": DROPPED_NOTES["evaluate"]}]
    assert _privacy(row)["site-b"]["stale"] is True and _privacy(row)["site-a"]["stale"] is False
    by_site = {p["site"]: p for p in federated["privacy"]}
    assert by_site["site-b"]["stale"] is True and by_site["site-b"]["reported_round"] == 1
    assert by_site["site-a"]["stale"] is False


# ------------------------------------------------------------------------------ (b) SecAgg+ refusals
def _secure_round(grid: RecordingGrid, server_round: int, *, masked: set[int], errors: dict[int, str],
                  nodes: set[int]) -> None:
    keys = [StageOutcome(s, asked=set(nodes), replied=set(nodes)) for s in ("setup", "share-keys")]
    _record(grid, server_round, *keys, StageOutcome("masked-vector", asked=set(nodes), replied=masked, errors=errors))


def test_a_secure_aggregation_refusal_is_a_refusal_with_its_reason_and_epsilon_not_a_failure(tmp_path) -> None:
    # Prepare: site-c refuses the masked round with its report (an error reply); node 13, named "site-d" by the
    # coordinator's registry, fails with a crash. Flower lists each masked-vector error twice, without node ids.
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"site-d": {"node_id": 13, "fingerprint": "ab", "status": "registered"},
                                    "site-e": {"fingerprint": "cd", "status": "revoked"}}))
    coordinator, initial, stream, grid = _strategy(tmp_path)
    coordinator.node_names.update(site_names_from_registry(registry))
    nodes = {*SITES, 13}
    coordinator.configure_fit(1, initial, _manager(sorted(nodes)))
    refusal = Error(REFUSAL_CODE, _report(12, 7.5, refused=True, reason="epsilon-per-run=8.0 would be exceeded")
                    .to_error_reason())
    crash = Error(2, "Traceback (most recent call last): ... RuntimeError: the site's GPU ran out of memory")
    _secure_round(grid, 1, masked={10, 11}, errors={12: refusal.reason or "", 13: crash.reason or ""}, nodes=nodes)
    total = ndarrays_to_parameters([np.zeros_like(w) for w in parameters_to_ndarrays(initial)])  # the unmasked sum
    results = [(proxy(n), FitRes(Status(Code.OK, ""), total, 40, dict(_report(n, 1.0).to_metrics())))
               for n in (10, 11)]
    failures: list[Any] = [Exception(refusal), Exception(crash), Exception(refusal), Exception(crash)]
    # Execute
    aggregated, _ = coordinator.aggregate_fit(1, results, failures)
    coordinator.evaluate(1, aggregated or initial)
    coordinator.summary()
    # Assert: one refusal with its reason, stage and ε; one failure, named by the registry
    row = _rows(tmp_path)[1]
    assert aggregated is not None and row["sites_answered"] == 2
    assert row["refused"] == [{"site": "site-c", "reason": "epsilon-per-run=8.0 would be exceeded",
                               "stage": "masked-vector"}]
    assert row["sites_failed"] == 1 and len(row["failures"]) == 1
    assert row["failures"][0].startswith("site-d: ") and "ran out of memory" in row["failures"][0]
    assert row["failed"][0]["site"] == "site-d" and row["failed"][0]["stage"] == "masked-vector"
    privacy = _privacy(row)
    assert privacy["site-c"]["epsilon"] == 7.5 and privacy["site-c"]["stale"] is False
    assert sorted(privacy) == ["site-a", "site-b", "site-c"] and not row["dropped"]
    line = next(x for x in stream.getvalue().splitlines() if x.startswith("round 1/2"))
    assert "refused: site-c" in line and "failed: site-d (masked-vector)" in line


def test_the_site_registry_names_nodes_and_a_broken_one_names_the_file(tmp_path) -> None:
    # Prepare
    good, broken = tmp_path / "registry.json", tmp_path / "broken.json"
    good.write_text(json.dumps({"alpha": {"node_id": 7, "status": "registered"}, "beta": {"node_id": True}}))
    broken.write_text("{not json")
    # Execute
    names = site_names_from_registry(good)
    # Assert: only integer node ids; no path, no names; a missing file, no names; a broken one, a ConfigError
    assert names == {7: "alpha"}
    assert site_names_from_registry(None) == {} and site_names_from_registry(tmp_path / "missing.json") == {}
    with pytest.raises(ConfigError, match=r"broken\.json"):
        site_names_from_registry(broken)


# ------------------------------------------------------------------------------ (c) a round not aggregated
def test_a_secure_round_stopped_before_unmasking_records_zero_contributors_and_keeps_the_model(
        tmp_path, monkeypatch) -> None:
    # Prepare: FedAvgM (its momentum would move with any aggregation); site-b refuses, so one masked vector is
    # left, below min-sites=2: the coordinator stops before unmasking.
    coordinator, initial, stream, grid = _strategy(tmp_path, strategy="fedavgm")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a round that was not unmasked must not reach the aggregation rule")

    monkeypatch.setattr(coordinator.inner, "aggregate_fit", never)
    nodes = {10, 11}
    coordinator.configure_fit(1, initial, _manager(sorted(nodes)))
    refusal = Error(REFUSAL_CODE, _report(11, 3.0, refused=True, reason="min-cohort=2 not met").to_error_reason())
    _secure_round(grid, 1, masked={10}, errors={11: refusal.reason or ""}, nodes=nodes)
    masked = [(proxy(10), FitRes(Status(Code.OK, ""), Parameters(tensors=[], tensor_type=""), 40,
                                  dict(_report(10, 1.0).to_metrics())))]
    # Execute
    coordinator.round_not_aggregated(1, masked, [Exception(refusal), Exception(refusal)], "unmask")
    coordinator.evaluate(1, initial)  # the workflow keeps the global model
    coordinator.summary()
    # Assert: a row with no contributor, the refusal and site-a's ε; nothing aggregated; the model is the initial one
    row = _rows(tmp_path)[1]
    assert row["sites_answered"] == 0 and row["contributors"] == []
    assert row["halted_stage"] == "unmask" and row["sites_sampled"] == 2
    assert [r["site"] for r in row["refused"]] == ["site-b"]
    assert _privacy(row)["site-a"]["epsilon"] == 1.0 and _privacy(row)["site-b"]["epsilon"] == 3.0
    assert getattr(coordinator.inner, "momentum_vector", None) is None
    saved = ResumeState.load(tmp_path)
    for before, after in zip(parameters_to_ndarrays(initial), saved.weights, strict=True):
        np.testing.assert_array_equal(before, after)
    entry = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if '"aggregated"' in x][-1]
    assert entry["aggregate_sha256"] is None and entry["halted_stage"] == "unmask"
    assert audit.verify(tmp_path / "audit.jsonl").ok
    line = next(x for x in stream.getvalue().splitlines() if x.startswith("round 1/2"))
    assert "sites 0/2 contributed (not aggregated" in line and "val AUC n/a" in line


def test_the_round_line_never_counts_0_of_0_and_prints_n_a_for_what_a_round_lacks() -> None:
    # Prepare
    stream = io.StringIO()
    progress = RoundProgress(rounds=3, epsilon=None, tensorboard_dir=None, stream=stream)
    old = {"round": 2, "sites_sampled": 3, "sites_answered": 2, "sites_failed": 1, "failures": ["boom"],
           "refused": [], "val": {}, "test": {}, "privacy": []}  # a line written before sites were named
    # Execute
    progress.round_finished({"round": 0, "sites_sampled": 0, "sites_answered": 0, "val": {}, "test": {"auc": 0.5}})
    progress.round_finished({"round": 1, "sites_sampled": 0, "sites_answered": 0, "val": {"auc": 0.5, "sites": 0}})
    progress.round_finished(old)
    # Assert
    first, second, third = stream.getvalue().splitlines()
    assert "0/0" not in first + second and "initial model" in first and "no site was asked" in second
    assert "val AUC n/a" in first and "val AUC n/a" in second and "0.5000" not in second
    assert "sites 2/3 contributed" in third and "failed: 1 site(s)" in third


# ------------------------------------------------------------------------------ (d) the report
def test_the_report_prints_the_stale_note_and_names_non_contributing_sites(tmp_path) -> None:
    # Prepare: site-2's ε was last reported in round 2; it went silent in round 3.
    summary, rounds, labels, scores = _run_outputs()
    summary["privacy"][2].update({"stale": True, "reported_round": 2, "epsilon": 5.0})
    rounds[3]["dropped"] = [{"site": "site-2", "node_id": 12, "stage": "fit", "note": DROPPED_NOTES["training"]}]
    # Execute
    write_report(tmp_path, summary, rounds, test_labels=labels, test_scores=scores)
    # Assert
    md = (tmp_path / "report.md").read_text()
    note = ("site-2: ε as last reported in round 2; the site's own ledger is authoritative and may include later "
            "rounds: `medsilo site ledger`")
    assert note in md and "| 2 (stale: see note) |" in md
    assert "round 3: sites 3/3 contributed  dropped: site-2 (fit)" in md
    assert "site-0: ε as last reported" not in md
    page = (tmp_path / "report.html").read_text()
    assert "site-2: ε as last reported in round 2" in page and "<code>medsilo site ledger</code>" in page


def test_participation_state_survives_a_resumed_run(tmp_path) -> None:
    # Prepare: site-c silent in round 1; the coordinator saves its state after round 1.
    coordinator, initial, _, grid = _strategy(tmp_path)
    coordinator.configure_fit(1, initial, _manager(list(SITES)))
    _record(grid, 1, StageOutcome("fit", asked=set(SITES), replied={10, 11}))
    coordinator.participation.reported_as[12] = "site-c"  # it answered an earlier run's round
    coordinator.participation.sites["site-c"] = {"reported_round": 0, "silent_round": None}
    model1, _ = coordinator.aggregate_fit(1, [_reply(n, initial, 1.0) for n in (10, 11)], [])
    coordinator.evaluate(1, model1 or initial)
    # Execute
    resumed, _, _, _ = _strategy(tmp_path)
    resumed.node_names = {12: "registry-c"}
    resumed.restore(ResumeState.load(tmp_path))
    # Assert: names (the registry's kept), reports and silences carry over
    assert resumed.node_names[12] == "registry-c" and resumed.node_names[10] == "site-a"
    assert resumed.participation.sites["site-c"]["silent_round"] == 1
    assert resumed.participation.reported_as == coordinator.participation.reported_as


# ------------------------------------------------------------------------------ end to end
def test_a_site_that_drops_out_of_a_secure_round_is_named_through_the_real_server_app(tmp_path) -> None:
    # Prepare: three real ClientApps, DP-SGD and SecAgg+, two rounds; node 12 (site-2) goes offline when round 2's
    # training request (its masked-vector message) is sent.
    from flwr.app import Context, RecordDict
    from test_secure_aggregation import _write_sites

    from server.app import main
    from simulations.loopback import LoopbackGrid
    from simulations.reproducible import app as research_app

    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=2, local_epochs=1,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=2, epsilon=4.0,
                    accountant="rdp", max_site_records=250)
    grid = LoopbackGrid(research_app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)},
                        cfg.to_flower())

    def drop(msg: Any) -> None:
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.group_id == "2" and rec is not None and rec.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            grid.offline.add(12)

    grid.before_delivery = drop
    # Execute
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: round 2 counts two contributors and names site-2 as silent at its training request; its ε is the
    # one it reported in round 1, flagged stale, in the round's row and in federated.json.
    rows = _rows(tmp_path / "run")
    assert rows[1]["sites_answered"] == 3 and not rows[1]["dropped"]
    assert rows[2]["sites_answered"] == 2 and rows[2]["contributors"] == ["site-0", "site-1"]
    assert [(d["site"], d["node_id"], d["stage"]) for d in rows[2]["dropped"]] == [("site-2", 12, "masked-vector")]
    stale = _privacy(rows[2])["site-2"]
    assert stale["stale"] is True and stale["reported_round"] == 1
    assert stale["epsilon"] == _privacy(rows[1])["site-2"]["epsilon"]
    federated = json.loads((tmp_path / "run" / "federated.json").read_text())
    by_site = {p["site"]: p for p in federated["privacy"]}
    assert by_site["site-2"]["stale"] is True and by_site["site-2"]["reported_round"] == 1
    assert by_site["site-0"]["stale"] is False and by_site["site-0"]["epsilon"] > by_site["site-2"]["epsilon"]
