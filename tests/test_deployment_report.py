"""The deployment report: built from a coordinator's run folder alone, as the real strategy writes it."""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from render_probe import CHROMIUM, proxy, rendered_image_widths

from common.config import RunConfig
from common.datasets import DatasetInfo, Task, dataset_info
from common.io import atomic_write_json
from common.wire import SiteReport, ValidationLayout, encode_values
from server.evaluation import TestSet as CentralTestSet
from server.exchange import RecordingGrid, RoundExchange, StageOutcome
from server.participation import RoundRecord
from server.report import RunFolderError, build_deployment_report, headline
from server.site_reports import site_names_from_registry
from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters

#: The coordinator kit's registry: node id -> kit name (node 13 is registered and never answers).
KIT = {10: "hospital-north", 11: "hospital-south", 12: "hospital-west", 13: "hospital-east"}




@dataclass
class Plan:
    """A small federation: who answers, who refuses, and what each site's validation release holds."""

    dataset: str = "breastmnist"
    rounds: int = 2
    answering: tuple[int, ...] = (10, 11, 12)
    asked: tuple[int, ...] = (10, 11, 12, 13)
    refusals: dict[int, set[int]] = field(default_factory=dict)  # round -> refusing nodes
    server_eval: bool = False


def _validation(info: DatasetInfo, node: int, server_round: int) -> str:
    """A site's released validation sum: better separated in later rounds (and at better sites)."""
    layout = ValidationLayout.for_dataset(info)
    if info.task is Task.SEGMENTATION:
        dice = np.full((4, len(info.labels)), 0.3 + 0.1 * server_round + 0.02 * (node - 10))
        return encode_values(layout.volume_rows(dice).sum(axis=0))
    labels = np.array([0, 1] * 20)
    rng = np.random.default_rng(node * 10 + server_round)
    scores = np.clip(0.5 + (labels - 0.5) * 0.2 * server_round + rng.normal(0, 0.25, labels.size), 0.01, 0.99)
    return encode_values(layout.rows(labels, scores).sum(axis=0))


def _report(info: DatasetInfo, node: int, server_round: int, *, validated: int, refused: bool = False) -> SiteReport:
    return SiteReport(site=KIT[node], dp=True, epsilon=1.5 * server_round + 0.1 * (node - 10),
                      epsilon_lifetime=2.0 * server_round, delta=1e-5, accountant="rdp", noise_multiplier=1.1,
                      sample_rate=0.1, refused=refused, reason="epsilon-per-run=8.0 would be exceeded" if refused
                      else "", validated_round=validated,
                      validation=_validation(info, node, validated) if validated > 0 else "", validation_noise=2.0)


def _run(tmp_path: Path, plan: Plan) -> Path:
    """Drive the real coordinator strategy through ``plan`` in-process; return its out-dir."""
    info = dataset_info(plan.dataset)
    run = tmp_path / "run"
    cfg = RunConfig(dataset=plan.dataset, strategy="fedavg", min_sites=2, rounds=plan.rounds, epsilon=8.0,
                    server_eval=plan.server_eval, validation_releases=plan.rounds, out_dir=str(run))
    run.mkdir(mode=0o700)
    atomic_write_json(run / "run_config.json", cfg.replace(resume=False).to_flower())  # as server.app writes it
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({name: {"node_id": node, "status": "registered"} for node, name in KIT.items()}))
    test_set = None
    if plan.server_eval:
        labels = np.array([0, 1] * 8)
        test_set = CentralTestSet(info=info, x=torch.rand(16, info.channels, info.size, info.size), labels=labels)
    initial = initial_parameters(cfg, info)
    coordinator = FederationStrategy(build_inner_strategy(cfg, initial, 2), config=cfg, info=info, out_dir=run,
                                     test_set=test_set)
    coordinator.node_names.update(site_names_from_registry(registry))
    grid = RecordingGrid(object())  # type: ignore[arg-type]  # only its round records are read
    coordinator.exchanges = grid
    manager = SimpleClientManager()
    for node in plan.asked:
        manager.register(proxy(node))
    params = initial
    coordinator.evaluate(0, params)
    for r in range(1, plan.rounds + 1):
        coordinator.configure_fit(r, params, manager)
        grid.rounds[r] = RoundExchange(r, [StageOutcome("fit", asked=set(plan.asked), replied=set(plan.answering))])
        replies = []
        for node in plan.answering:
            report = _report(info, node, r, validated=r - 1, refused=node in plan.refusals.get(r, set()))
            update = ndarrays_to_parameters([np.full_like(w, 0.01) for w in parameters_to_ndarrays(params)])
            replies.append((proxy(node), FitRes(Status(Code.OK, ""), update, 40, dict(report.to_metrics()))))
        aggregated, _ = coordinator.aggregate_fit(r, replies, [])
        params = aggregated or params
        coordinator.evaluate(r, params)
    final = plan.rounds
    grid.rounds[final].stages.append(StageOutcome("evaluate", asked=set(plan.answering), replied=set(plan.answering)))
    evaluations = [(proxy(n), EvaluateRes(Status(Code.OK, ""), 0.0, 40,
                                           dict(_report(info, n, final, validated=final).to_metrics())))
                   for n in plan.answering]
    coordinator.aggregate_evaluate(final, evaluations, [])
    coordinator.summary()
    return run


def _lines(run: Path) -> dict[int, dict[str, Any]]:
    return {row["round"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    from common.checkpoint import load_checkpoint

    return load_checkpoint(path)[1]


def _assert_self_contained(page: str, figures: int) -> None:
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == figures and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "http://" not in page and "https://" not in page and "<link" not in page


# ------------------------------------------------------------------------------ a finished run
def test_the_summary_reproduces_the_coordinators_files_and_names_sites_by_their_kit_names(tmp_path) -> None:
    # Prepare: two rounds, no server-eval; hospital-west refuses round 2, hospital-east (registered) never answers.
    run = _run(tmp_path, Plan(refusals={2: {12}}))
    federated = json.loads((run / "federated.json").read_text())
    lines = _lines(run)
    # Execute
    summary = build_deployment_report(run)
    # Assert: rounds, best round and its threshold as the coordinator recorded them
    assert summary["rounds"] == 2 and summary["rounds_run"] == 2
    assert summary["aggregated_rounds"] == federated["aggregated_rounds"] == 2
    best = federated["best_round"]
    assert summary["best_round"] == best and summary["validation"]["auc"] == lines[best]["val"]["auc"]
    assert summary["threshold"] == _checkpoint_meta(run / "model-best.safetensors")["threshold"]
    assert summary["threshold"] == lines[best]["val"]["threshold"]
    assert [v["round"] for v in summary["validation_by_round"]] == [1, 2]
    # ... each site's ε as federated.json has it, stale flags included ...
    assert {p["site"]: p["epsilon"] for p in summary["privacy"]} == \
        {p["site"]: p["epsilon"] for p in federated["privacy"]}
    assert [p["site"] for p in summary["privacy"]] == ["hospital-north", "hospital-south", "hospital-west"]
    # ... participation per site and per round, by kit name ...
    assert summary["sites"] == sorted(KIT.values())
    assert summary["participation"]["hospital-west"] == {"contributed": 1, "refused": 1, "failed": 0, "silent": 0}
    assert summary["participation"]["hospital-north"]["contributed"] == 2
    assert summary["participation"]["hospital-east"]["silent"] == 2
    assert summary["participation_by_round"][1]["refused"] == ["hospital-west"]
    assert summary["participation_by_round"][1]["contributed"] == lines[2]["contributors"]
    assert [n["site"] for n in summary["never_reported"]] == ["hospital-east"]
    # ... no test metrics without server-eval, and the report says what selected the model.
    assert "test" not in summary and summary["selected_by"] == "federated validation"
    assert json.loads((run / "summary.json").read_text()) == summary
    md = (run / "report.md").read_text()
    assert "server-eval=false" in md and "selected by the sites' federated validation" in md
    assert f"model selected: round {best}" in md
    assert "- round 2: hospital-west refused: epsilon-per-run=8.0 would be exceeded" in md
    assert "round 2: sites 2/4 contributed  refused: hospital-west  dropped: hospital-east (fit)" in md
    assert "hospital-east: asked up to round 2, never reported" in md
    page = (run / "report.html").read_text()
    _assert_self_contained(page, figures=4)
    assert "hospital-east" in page and "<code>medsilo site ledger</code>" in page
    assert headline(summary, run).splitlines()[1].startswith(f"selected round {best} of 2 by federated validation")


def test_every_output_is_owner_only(tmp_path) -> None:
    # Prepare
    run = _run(tmp_path, Plan(rounds=1))
    # Execute
    build_deployment_report(run)
    # Assert
    for name in ("summary.json", "report.md", "report.html", *(f"plots/{p}" for p in (
            "validation.png", "site_validation.png", "participation.png", "epsilon.png"))):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o600, name
        assert (run / name).stat().st_size > 0
    assert stat.S_IMODE((run / "plots").stat().st_mode) == 0o700


def test_a_run_with_nothing_aggregated_gives_a_report_that_says_why(tmp_path) -> None:
    # Prepare: every site refuses the only round.
    run = _run(tmp_path, Plan(rounds=1, refusals={1: {10, 11, 12}}))
    federated = json.loads((run / "federated.json").read_text())
    assert federated["aggregated_rounds"] == 0 and not (run / "model-best.safetensors").exists()
    # Execute
    summary = build_deployment_report(run)
    # Assert
    assert summary["aggregated_rounds"] == 0 and summary["best_round"] is None and summary["threshold"] is None
    assert summary["why_not_aggregated"] == federated["why_not_aggregated"]
    md = (run / "report.md").read_text()
    assert "**No round was aggregated: this run has no trained model.**" in md
    for reason in federated["why_not_aggregated"]:
        assert f"- {reason}" in md
    assert "epsilon-per-run=8.0 would be exceeded" in md
    page = (run / "report.html").read_text()
    assert "<strong>No round was aggregated: this run has no trained model.</strong>" in page
    assert "no round was aggregated" in headline(summary, run)


def test_a_segmentation_run_reports_dice_per_class_and_no_threshold(tmp_path) -> None:
    # Prepare
    info = dataset_info("msd-hippocampus")
    run = _run(tmp_path, Plan(dataset=info.name, rounds=1))
    line = _lines(run)[1]
    # Execute
    summary = build_deployment_report(run)
    # Assert
    assert summary["primary_metric"] == "dice_mean" and summary["threshold"] is None
    assert summary["validation"]["dice"] == line["val"]["dice"] and set(line["val"]["dice"]) == set(info.labels)
    md = (run / "report.md").read_text()
    assert "per-voxel arg-max" in md and all(f"val Dice {label}" in md for label in info.labels)
    _assert_self_contained((run / "report.html").read_text(), figures=4)


def test_a_run_with_the_central_test_set_reports_its_test_metrics(tmp_path) -> None:
    # Prepare
    run = _run(tmp_path, Plan(rounds=1, server_eval=True))
    federated = json.loads((run / "federated.json").read_text())
    # Execute
    summary = build_deployment_report(run)
    # Assert
    assert summary["test"]["auc"] == federated["best"]["auc"] and summary["test"]["round"] == 1
    md = (run / "report.md").read_text()
    assert "server-eval=true" in md and "| selected (round 1) |" in md and "AUC 95% CI" in md


# ------------------------------------------------------------------------------ what the report reads
def test_the_metrics_keys_the_report_reads_are_those_the_coordinator_writes() -> None:
    # Prepare / Execute: one round's line as the strategy writes it
    line = RoundRecord(round=1).line(0.0)
    # Assert
    read = {"round", "sites_sampled", "sites_answered", "sites_failed", "contributors", "refused", "failed",
            "dropped", "halted_stage", "val", "val_sites", "test", "privacy"}
    assert read <= set(line)


@pytest.mark.parametrize(("damage", "named", "fix"), [
    ("missing-folder", "nowhere", "out-dir"),
    ("no-run-config", "run_config.json", "not a coordinator's run folder"),
    ("unfinished", "federated.json", "resume=true"),
    ("corrupt-metrics", "metrics.jsonl", "restore the run folder"),
    ("corrupt-federated", "federated.json", "restore the run folder"),
    ("simulation", "summary.json", "medsilo simulate"),
])
def test_a_missing_or_damaged_run_folder_is_one_error_naming_the_file_and_the_fix(
        tmp_path, damage: str, named: str, fix: str) -> None:
    # Prepare
    run = _run(tmp_path, Plan(rounds=1))
    target = tmp_path / "nowhere" if damage == "missing-folder" else run
    if damage == "no-run-config":
        (run / "run_config.json").unlink()
    elif damage == "unfinished":
        (run / "federated.json").unlink()
    elif damage == "corrupt-metrics":
        (run / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "val"\n{"round": 2}\n')
    elif damage == "corrupt-federated":
        (run / "federated.json").write_text("{not json")
    elif damage == "simulation":
        (run / "summary.json").write_text(json.dumps({"dataset": "breastmnist", "sites": 3}))
    # Execute
    with pytest.raises(RunFolderError) as caught:
        build_deployment_report(target)
    # Assert
    assert named in str(caught.value) and fix in str(caught.value)
    assert not (run / "report.md").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_the_deployment_report_renders_in_headless_chromium_with_its_images(tmp_path) -> None:
    # Prepare: the report
    run = _run(tmp_path, Plan(rounds=1))
    build_deployment_report(run)
    # Execute: rendered, with a probe that records each image's decoded width
    widths, dom = rendered_image_widths(run / "report.html", tmp_path)
    # Assert
    assert len(widths) == 4 and all(w > 100 for w in widths), widths
    assert "medsilo deployment run: breastmnist" in dom
