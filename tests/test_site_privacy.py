"""Site privacy guardrails: the site policy, the durable ε ledger, and hash-chained audit logs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from client.data import site_file
from client.dp import accounting as privacy
from client.dp.ledger import data_source
from client.site import SiteClient
from common import audit
from common.cli import main as cli
from common.config import RunConfig
from common.datasets import dataset_info
from common.errors import ConfigError, NothingAggregated
from common.models import build_model
from common.site_policy import architecture_fingerprint, load_policy, template
from simulations.loopback import LoopbackGrid

ROOT = Path(__file__).resolve().parents[1]


def _site(root: Path, partition: int = 0, n: int = 90) -> None:
    rng = np.random.default_rng(partition)
    labels = rng.integers(0, 2, n + 30)
    images = (rng.integers(0, 120, (n + 30, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:], val_labels=labels[n:])
    site_file(root, partition).write_bytes(buf.getvalue())


def _policy(root: Path, **overrides: str) -> None:
    text = template(epsilon_per_run=4.0, epsilon_lifetime=6.0, delta=1e-5)
    for key, value in overrides.items():
        name = key.replace("_", "-")
        lines = [f"{name} = {value}" if line.split("=")[0].strip() == name else line for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    (root / "site-policy.toml").write_text(text)


def _client(root: Path, run_id: int = 1, **overrides) -> SiteClient:
    values = {"dataset": "breastmnist", "model": "scatnet", "site_data_dir": str(root), "batch_size": 32, "rounds": 2,
              "epsilon": 4.0,
              "accountant": "rdp", **overrides}
    cfg = RunConfig(**values)
    ctx = Context(run_id=run_id, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=cfg.to_flower())
    return SiteClient(ctx)


def _initial(model: str = "auto") -> list[np.ndarray]:
    return [v.numpy() for v in build_model(model, dataset_info("breastmnist"), seed=0).state_dict().values()]


def _ledger(root: Path, partition: int = 0) -> Path:
    """The simulated site's ledger: one file per data source the node reads (its site file), not per dataset."""
    source = data_source({"partition-id": partition}, {"site-data-dir": str(root)})
    assert source.label == str(site_file(root, partition).resolve())
    return root / f"site-{partition:02d}-state" / f"ledger-{source.key}.jsonl"


def _rows(ledger: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _reserves(ledger: Path, mechanism: str = "dp-sgd") -> list[tuple[int, int]]:
    """(run, round) of every reservation of ``mechanism`` ("dp-sgd", "count", "validation"), in ledger order."""
    return [(r["run"], r["round"]) for r in _rows(ledger, "reserve") if r["mechanism"] == mechanism]


def _epsilon(*history: privacy.HistoryEntry) -> float:
    """ε at δ=1e-5 (the tests' runs and policy) of a history, with the RDP accountant the tests' runs use."""
    return privacy.epsilon_spent(history=list(history), delta=1e-5, accountant="rdp")


# ------------------------------------------------------------------------------ policy
@pytest.mark.parametrize(
    ("policy", "run", "fit_config", "expected"),
    [
        ({"datasets": '["pneumoniamnist"]'}, {}, {}, "dataset 'breastmnist' is not allowed"),
        ({"models": '["resnet18"]'}, {}, {}, "model 'scatnet' is not allowed"),
        ({"model_hashes": '["0123456789abcdef"]'}, {}, {}, "architecture fingerprint"),
        ({}, {"dp": False}, {}, "requires record-level DP"),
        ({}, {}, {"secure-aggregation": 0}, "requires secure aggregation"),
        ({"max_rounds": "1"}, {}, {}, "rounds=2 exceeds max-rounds=1"),
        ({"max_local_epochs": "1"}, {"local_epochs": 2}, {}, "local-epochs=2 exceeds"),
        ({}, {"epsilon": 5.0}, {}, "epsilon=5.0 exceeds epsilon-per-run=4.0"),
        ({}, {"delta": 1e-4}, {}, "delta=0.0001 exceeds"),
        ({"max_grad_norm": "0.5"}, {}, {}, "max-grad-norm=1.0 exceeds"),
    ],
)
def test_each_policy_violation_is_refused_before_training(tmp_path, policy, run, fit_config, expected) -> None:
    # Prepare: a site whose policy forbids something the run asks for.
    _site(tmp_path)
    _policy(tmp_path, **policy)
    client = _client(tmp_path, **run)
    # Execute
    update, n, metrics = client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1, **fit_config})
    # Assert: refused with the reason, nothing trained, nothing spent (the ledger was never written).
    assert metrics["refused"] is True and n == 0 and expected in metrics["reason"], metrics.get("reason")
    assert all(not u.any() for u in update) and metrics["steps"] == 0
    assert client.ledger.history() == [] and not client.ledger.path.exists()


def test_a_noise_multiplier_below_the_policy_minimum_is_refused_before_training(tmp_path) -> None:
    # Prepare: σ is calibrated from the run's plan, which rests on the DP release of the record count, so this
    # rule can only be checked once that release is made (and charged): the refusal comes at plan time.
    _site(tmp_path)
    _policy(tmp_path, min_noise_multiplier="5.0")
    client = _client(tmp_path)
    # Execute
    update, n, metrics = client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # Assert: refused with the rule and the plan's σ; nothing trained; only the count release is spent.
    plan = client.ledger.plan(1)
    assert plan is not None and plan.noise_multiplier < 5.0
    assert metrics["refused"] is True and n == 0 and metrics["steps"] == 0
    assert "below min-noise-multiplier=5.0" in metrics["reason"] and f"{plan.noise_multiplier:.3f}" in metrics["reason"]
    assert all(not u.any() for u in update)
    assert _reserves(_ledger(tmp_path)) == [] and _reserves(_ledger(tmp_path), "count") == [(1, 0)]
    assert client.ledger.history() == [plan.count_entry]


@pytest.mark.parametrize("when", ["round-2", "validate-first"])
def test_a_noise_multiplier_below_the_policy_minimum_stays_refused_for_the_whole_run(tmp_path, when) -> None:
    # Prepare: a run whose plan the policy refused ("round-2": at round 1's request); "validate-first": the
    # request that first plans the run also asks for a validation (whose refusal is caught as validation-refused).
    _site(tmp_path)
    _policy(tmp_path, min_noise_multiplier="5.0")
    client = _client(tmp_path)
    if when == "round-2":
        client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
        fit_config = {"server-round": 2, "secure-aggregation": 1}
    else:
        fit_config = {"server-round": 1, "secure-aggregation": 1, "validate-round": 0}
    # Execute
    update, n, metrics = client.fit(_initial(), fit_config)
    # Assert: still refused, nothing trained under the too-small σ.
    assert metrics["refused"] is True and n == 0 and "below min-noise-multiplier=5.0" in metrics["reason"]
    assert all(not u.any() for u in update)
    assert _reserves(_ledger(tmp_path)) == []


def test_policy_allowing_the_run_lets_it_train_and_fingerprints_match(tmp_path) -> None:
    fingerprint = architecture_fingerprint([tuple(v.shape) for v in _initial()])
    _site(tmp_path)
    _policy(tmp_path, models='["scatnet"]', model_hashes=f'["{fingerprint}"]', datasets='["breastmnist"]')
    client = _client(tmp_path)
    _, n, metrics = client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # The FedAvg weight is the DP estimate of the 90 records the run's plan rests on, never the exact count.
    plan = client.ledger.plan(1)
    assert metrics["refused"] is False and metrics["steps"] == plan.steps_per_round > 0
    assert n == plan.records_estimate >= 1


def test_bad_policy_files_are_reported_together(tmp_path) -> None:
    (tmp_path / "p.toml").write_text("[privacy]\nepsilon-per-run = 9.0\nepsilon-lifetime = 3.0\nfoo = 1\n"
                                     "[training]\nmodels = 'cnn'\n")
    with pytest.raises(ConfigError) as err:
        load_policy(tmp_path / "p.toml")
    assert len(err.value.problems) == 3


# ------------------------------------------------------------------------------ ledger
def test_a_second_run_starts_from_the_spent_budget_and_stops_at_the_lifetime(tmp_path) -> None:
    # Prepare: lifetime budget 5.0 over runs of ε=4 each. A run's plan keeps part of its ε for the final model's
    # validation, so two rounds spend ≈ 3.8; a second run's first round brings the lifetime to ≈ 4.7, its second
    # to ≈ 5.4 (RDP composition, whatever the DP record count makes of the plans).
    _site(tmp_path)
    _policy(tmp_path, epsilon_lifetime="5.0")
    first = _client(tmp_path, run_id=1)
    params = _initial()
    # Execute: run 1 spends its ε=4 in two rounds; run 2 asks for another ε=4.
    for rnd in (1, 2):
        _, _, m1 = first.fit(params, {"server-round": rnd, "secure-aggregation": 1})
    second = _client(tmp_path, run_id=2)
    rounds2 = []
    for rnd in (1, 2):
        _, n2, m2 = second.fit(params, {"server-round": rnd, "secure-aggregation": 1})
        rounds2.append(m2)
    # Assert: run 2 starts from run 1's spending and is stopped by the lifetime budget, never past it.
    assert 3.5 < m1["epsilon"] <= 4.0 and m1["epsilon-lifetime"] == pytest.approx(m1["epsilon"])
    trained = [r for r in rounds2 if not r["refused"]]
    assert [r["refused"] for r in rounds2] == [False, True]
    assert trained[0]["epsilon"] < m1["epsilon"] < trained[0]["epsilon-lifetime"] <= 5.0
    assert "lifetime" in rounds2[-1]["reason"] and n2 == 0 and rounds2[-1]["steps"] == 0
    assert second.ledger.spent(delta=1e-5, accountant="rdp") <= 5.0
    # One ledger for the site's records: run 2 began with its own count release; its refused round reserved nothing.
    assert _reserves(_ledger(tmp_path), "count") == [(1, 0), (2, 0)]
    assert _reserves(_ledger(tmp_path)) == [(1, 1), (1, 2), (2, 1)]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_site_privacy import _client, _initial
from pathlib import Path
client = _client(Path({site!r}), local_epochs=100)
client.fit(_initial(), {{"server-round": 1, "secure-aggregation": 1}})
print("finished")
"""


def test_a_node_killed_mid_round_keeps_its_ledger_and_its_budget(tmp_path) -> None:
    # Prepare: a long round (200 local epochs) in its own process.
    _site(tmp_path)
    _policy(tmp_path, max_local_epochs="500")
    ledger_path = _ledger(tmp_path)

    def training() -> bool:  # the round's DP-SGD reservation is on file: the node is about to train or training
        lines = ledger_path.read_text().splitlines(keepends=True) if ledger_path.is_file() else []
        return any('"kind": "reserve"' in line and '"dp-sgd"' in line for line in lines if line.endswith("\n"))

    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), site=str(tmp_path))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Execute: SIGKILL as soon as the round is reserved (training has started).
    deadline = time.time() + 120
    while time.time() < deadline and not training():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.02)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # Assert: the reservation survived and counts; a restarted node continues from it.
    releases = [(r["kind"], r["mechanism"], r["round"]) for r in _rows(ledger_path)
                if r["kind"] in ("reserve", "complete")]
    assert releases == [("reserve", "count", 0), ("complete", "count", 0), ("reserve", "dp-sgd", 1)]  # no "complete"
    restarted = _client(tmp_path, local_epochs=100)
    plan = restarted.ledger.plan(1)
    assert plan is not None
    spent = restarted.ledger.spent(delta=1e-5, accountant="rdp", run=1)
    assert spent == pytest.approx(_epsilon(plan.count_entry, plan.training_entry))  # the killed round counts
    assert spent > _epsilon(plan.count_entry)
    _, n, m = restarted.fit(_initial(), {"server-round": 2, "secure-aggregation": 1})
    # The plan was for 2 rounds of ε=4 in total: round 2 still fits the run, and ε accounts both rounds.
    assert n == plan.records_estimate and m["epsilon"] > spent and m["epsilon"] <= 4.0 and m["epsilon-lifetime"] <= 6.0
    assert m["epsilon"] == pytest.approx(_epsilon(plan.count_entry, plan.training_entry, plan.training_entry))
    assert _reserves(ledger_path) == [(1, 1), (1, 2)] and _reserves(ledger_path, "count") == [(1, 0)]


# ------------------------------------------------------------------------------ audit
def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    for i in range(n):
        audit.append(path, {"side": "site", "round": str(i), "bytes": 100 + i, "payload_sha256": "ab" * 32})
    return path


def test_intact_audit_log_verifies(tmp_path, capsys) -> None:
    path = _log(tmp_path)
    assert audit.verify(path).ok and audit.verify(path).entries == 5
    assert cli(["audit", "verify", str(path)]) == 0 and "OK, 5 entries" in capsys.readouterr().out


@pytest.mark.parametrize("tamper", ["flip-byte", "delete-line", "swap-lines", "cut-tail"])
def test_audit_verify_detects_tampering(tmp_path, capsys, tamper) -> None:
    # Prepare
    path = _log(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "flip-byte":
        raw = bytearray(path.read_bytes())
        raw[len(lines[0]) + 30] ^= 0x01
        path.write_bytes(bytes(raw))
    elif tamper == "delete-line":
        path.write_bytes(b"".join(lines[:2] + lines[3:]))
    elif tamper == "swap-lines":
        path.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    else:
        path.write_bytes(b"".join(lines[:-1]))
    # Execute
    result = audit.verify(path)
    code = cli(["audit", "verify", str(path)])
    # Assert
    assert not result.ok and code == 1 and "TAMPERED" in capsys.readouterr().out


def test_every_message_leaving_a_site_is_audited_and_the_coordinator_logs_the_sum(tmp_path) -> None:
    # Prepare: two sites, one SecAgg+ DP round through the real ClientApp and ServerApp.
    from server.app import main

    for i in range(2):
        _site(tmp_path, i, n=60 + 30 * i)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=1, local_epochs=1,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=2,
                    epsilon=4.0, accountant="rdp", max_site_records=250)
    grid = LoopbackGrid(client_app, {10 + i: {"partition-id": i} for i in range(2)}, cfg.to_flower())
    # Execute
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: one site entry per reply, chained and verifiable; the coordinator saw one aggregate digest.
    for i in range(2):
        log = tmp_path / f"site-{i:02d}-state" / "audit.jsonl"
        assert audit.verify(log).ok
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        sent = [m for m in grid.received if m.metadata.dst_node_id == 1 and m.metadata.src_node_id == 10 + i]
        assert len(entries) == len(sent) == 5  # 4 SecAgg+ stages + the final evaluation
        masked = [e for e in entries if e.get("stage") == "masked-update"]
        assert len(masked) == 1 and len(masked[0]["payload_sha256"]) == 64 and 0 < masked[0]["epsilon"] <= 4.0
        assert all(e["bytes"] > 0 for e in entries)
    coord = tmp_path / "run" / "audit.jsonl"
    assert audit.verify(coord).ok
    aggregated = [json.loads(line) for line in coord.read_text().splitlines() if '"aggregated"' in line]
    assert len(aggregated) == 1 and len(aggregated[0]["update_sha256"]) == 1  # only the sum was ever seen
    assert {r["site"] for r in aggregated[0]["received"]} == {"site-0", "site-1"}


# ------------------------------------------------------------------------------ simulation
@pytest.mark.slow
def test_simulation_honours_the_site_policy(tmp_path) -> None:
    # Prepare: the default policy (secure aggregation required) that also allows only one local epoch.
    policy = tmp_path / "policy.toml"
    policy.write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5).replace(
        "max-local-epochs = 10", "max-local-epochs = 1"))
    runs = {}
    # Execute: a run without SecAgg+, and a SecAgg+ run asking for two local epochs.
    for name, extra in (("plain", ["--no-secagg"]), ("secagg", [])):
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "common.cli", "simulate", "--dataset", "breastmnist", "--sites", "2",
             "--rounds", "1", "--local-epochs", "2", "--no-compare", "--site-policy", str(policy), "--out", str(out),
             *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        # Every round refused: the run fails (exit 3) with the reasons, and writes no model as if it were a result.
        assert result.returncode == 3, result.stderr[-3000:]
        assert "no round was aggregated" in result.stderr and "site-0, site-1 refused: " in result.stderr
        assert "\x1b[" not in result.stderr + result.stdout  # Flower's colour codes: a terminal's only
        assert not list(out.glob("model-*.safetensors")) and (out / "report.md").is_file()
        assert json.loads((out / "summary.json").read_text())["aggregated_rounds"] == 0
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # Assert: unmasked training refused by both simulated hospitals; under SecAgg+ the epoch rule refuses.
    plain = runs["plain"]["refused"]
    assert runs["plain"]["sites_answered"] == 0 and len(plain) == 2
    assert all("requires secure aggregation" in r["reason"] for r in plain)
    refused = runs["secagg"]["refused"]
    assert len(refused) == 2 and all("max-local-epochs=1" in r["reason"] for r in refused)


def test_site_ledger_command_shows_spent_and_remaining(tmp_path, capsys) -> None:
    # Prepare: one trained round on a site with a policy.
    _site(tmp_path)
    _policy(tmp_path)
    client = _client(tmp_path)
    client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    spent = client.ledger.spent(delta=1e-5, accountant="prv")  # the command's default accountant, the policy's δ
    # Execute: the state folder's parent holds site-policy.toml (as in a kit and beside simulated sites).
    code = cli(["site", "ledger", "--state-dir", str(tmp_path / "site-00-state")])
    # Assert: one row for the site's data source (its key and the site file it names), its releases, ε spent of
    # the lifetime budget and what remains.
    out = capsys.readouterr().out
    source = client.ledger.source
    assert code == 0 and source.key in out and str(site_file(tmp_path, 0).resolve()) in out
    assert "releases count 1, dp-sgd 1" in out and f"lifetime ε {spent:.3f}" in out and "run 1: ε" in out
    assert "lifetime budget 6" in out and f"remaining {6.0 - spent:.3f}" in out


def test_deployed_node_applies_its_policy_file_and_state_dir(tmp_path) -> None:
    # Prepare: node configs as `medsilo client start` writes them (policy-path, state-dir, data-path).
    from server.app import main

    for i in range(2):
        _site(tmp_path, i)
    _policy(tmp_path, max_rounds="1")
    nodes = {10 + i: {"site-name": f"hospital-{i}", "data-path": str(site_file(tmp_path, i)),
                      "policy-path": str(tmp_path / "site-policy.toml"), "state-dir": str(tmp_path / f"state-{i}")}
             for i in range(2)}
    cfg = RunConfig(dataset="breastmnist", batch_size=32, rounds=2, local_epochs=1, server_eval=False,
                    out_dir=str(tmp_path / "run"), min_sites=2, epsilon=4.0, accountant="rdp", max_site_records=250)
    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    # Execute: the run asks for 2 rounds; the hospitals' policy allows 1. Nothing is aggregated: the run fails.
    with pytest.raises(NothingAggregated, match=r"hospital-0, hospital-1 refused: .*exceeds max-rounds=1"):
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: every round refused by both hospitals with the rule, in the coordinator's metrics; nothing spent.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert sorted(r["site"] for r in row["refused"]) == ["hospital-0", "hospital-1"]
        assert all("rounds=2 exceeds max-rounds=1" in r["reason"] for r in row["refused"])
    # Nothing is released: a run the policy refuses to train in is one the site does not validate for either, so
    # neither the record count nor a validation is spent on it (no ledger at all).
    for i in range(2):
        assert not list((tmp_path / f"state-{i}").glob("ledger-*.jsonl"))
        assert audit.verify(tmp_path / f"state-{i}" / "audit.jsonl").ok


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ({"dp": False}, "requires record-level DP"),
        ({"epsilon": 5.0}, "epsilon=5.0 exceeds epsilon-per-run=4.0"),
        ({"delta": 1e-4}, "delta=0.0001 exceeds"),
    ],
)
def test_a_validation_request_breaking_a_privacy_rule_releases_nothing(tmp_path, run, expected) -> None:
    # Prepare: a site whose policy forbids the run's privacy settings.
    _site(tmp_path)
    _policy(tmp_path)
    client = _client(tmp_path, **run)
    # Execute: the coordinator asks only for the validation statistic of a model.
    _, n, metrics = client.evaluate(_initial(), {"server-round": 2, "validate-round": 2})
    # Assert: refused with the rule; no statistic (exact or noisy) leaves the site, nothing is spent.
    assert metrics["refused"] is True and expected in metrics["reason"] and n == 0, metrics
    assert metrics["validation"] == "" and client.ledger.history() == []


def test_allow_unmasked_updates_lifts_only_the_masking_rule(tmp_path) -> None:
    # Prepare: the template policy (masking required) and a node started with --allow-unmasked-updates.
    _site(tmp_path)
    _policy(tmp_path, max_rounds="1")
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=2, epsilon=4.0,
                    accountant="rdp")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "allow-unmasked-updates": "true"},
                  state=RecordDict(), run_config=cfg.to_flower())
    # Execute: an unmasked round that also breaks max-rounds.
    _, _, metrics = SiteClient(ctx).fit(_initial(), {"server-round": 1, "secure-aggregation": 0})
    # Assert: the other rule still refuses; the masking rule does not.
    assert "rounds=2 exceeds max-rounds=1" in metrics["reason"] and "secure aggregation" not in metrics["reason"]
