"""Checkpoint and resume: a coordinator killed mid-run continues with nothing lost and no ε spent twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.errors import DataError
from server.resume import ResumeState
from tests.test_site_privacy import _client, _initial, _policy, _site

ROOT = Path(__file__).resolve().parents[1]


def _reserves(ledger: Path) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    return [(r["run"], r["round"]) for r in rows if r["kind"] == "reserve"]


# ------------------------------------------------------------------------------ the sites' ledgers
def test_a_reserved_but_never_completed_round_is_not_charged_twice(tmp_path) -> None:
    # Prepare: one site trains rounds 1-2 without interruption; another dies while training round 2.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _site(tmp_path / name)
        _policy(tmp_path / name)
    params = _initial()
    steady = _client(tmp_path / "a")
    for rnd in (1, 2):
        _, _, expected = steady.fit(params, {"server-round": rnd, "secure-aggregation": 1})
    crashed = _client(tmp_path / "b")
    crashed.fit(params, {"server-round": 1, "secure-aggregation": 1})
    plan = crashed.ledger.plan(1)
    assert plan is not None
    crashed.ledger.reserve(1, 2, (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))  # then killed
    # Execute: the restarted node is asked for round 2 again.
    _, n, m = _client(tmp_path / "b").fit(params, {"server-round": 2, "secure-aggregation": 1})
    # Assert: the open reservation covers the retry; ε is that of two rounds, not three.
    assert n == 90 and not m["refused"]
    assert _reserves(tmp_path / "b" / "site-00-state" / "ledger-breastmnist.jsonl") == [(1, 1), (1, 2)]
    assert m["epsilon"] == pytest.approx(expected["epsilon"]) and m["epsilon"] <= 4.0


def test_a_completed_round_asked_again_replays_the_same_update_and_a_new_model_is_charged(tmp_path) -> None:
    # Prepare
    _site(tmp_path)
    _policy(tmp_path)
    params = _initial()
    ledger = tmp_path / "site-00-state" / "ledger-breastmnist.jsonl"
    first_update, n1, m1 = _client(tmp_path).fit(params, {"server-round": 1, "secure-aggregation": 1})
    # Execute: the coordinator restarts and sends round 1 with the same model, then with another model.
    again, n2, m2 = _client(tmp_path).fit(params, {"server-round": 1, "secure-aggregation": 1})
    reserves_after_replay = _reserves(ledger)
    other = [p + 0.01 for p in params]
    _, _, m3 = _client(tmp_path).fit(other, {"server-round": 1, "secure-aggregation": 1})
    # Assert: the replay is bit-identical and free; a different model is a new release and counted.
    assert all(np.array_equal(a, b) for a, b in zip(first_update, again, strict=True)) and n1 == n2
    assert m2["epsilon"] == m1["epsilon"] and m2["noise_multiplier"] == m1["noise_multiplier"]
    assert reserves_after_replay == [(1, 1)]
    assert _reserves(ledger) == [(1, 1), (1, 1)] and m3["epsilon"] > m1["epsilon"]


def test_the_coordinators_run_key_names_the_run_in_the_ledger(tmp_path) -> None:
    # Prepare: a resumed deployment run has a new Flower run id; the coordinator sends the first run's key.
    _site(tmp_path)
    _policy(tmp_path)
    _client(tmp_path, run_id=7).fit(_initial(), {"server-round": 1, "secure-aggregation": 1, "run-key": 3})
    # Execute
    _, _, m = _client(tmp_path, run_id=8).fit(_initial(), {"server-round": 2, "secure-aggregation": 1, "run-key": 3})
    # Assert: both rounds count against run 3's budget (no fresh per-run ε for the restarted run).
    assert _reserves(tmp_path / "site-00-state" / "ledger-breastmnist.jsonl") == [(3, 1), (3, 2)]
    assert 3.5 < m["epsilon"] <= 4.0


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path) -> None:
    # Execute / Assert
    from common.errors import DataError

    with pytest.raises(DataError, match="never finished a round"):
        ResumeState.load(tmp_path)


def test_resume_with_other_settings_is_refused_listing_each_difference(tmp_path) -> None:
    # Prepare: the interrupted run's settings.
    from common.config import RunConfig
    from common.errors import ConfigError
    from server.app import check_same_settings

    (tmp_path / "run_config.json").write_text(json.dumps(RunConfig().to_flower()))
    changed = RunConfig(rounds=20, epsilon=4.0).to_flower()
    # Execute / Assert
    check_same_settings(tmp_path, RunConfig().to_flower())  # the same settings pass
    with pytest.raises(ConfigError) as err:
        check_same_settings(tmp_path, changed)
    assert len(err.value.problems) == 2 and "rounds=20" in str(err.value) and "epsilon=4.0" in str(err.value)


# ------------------------------------------------------------------------------ end to end
# SCAFFOLD on (BreastMNIST's default, with DP-SGD and without): a site reads its control variate back from its
# state folder.
ARGS = ["simulate", "--dataset", "breastmnist", "--sites", "2", "--rounds", "2", "--local-epochs", "1",
        "--strategy", "fedadam", "--scaffold", "--no-compare", "--cpus", "2"]


def _simulate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *ARGS, "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # wall-clock fields
        row.pop("elapsed_s")
        row.pop("fit_s")
    return rows


def _checkpoint_round(work: Path) -> int | None:
    try:
        return ResumeState.load(work).round
    except DataError:  # no round finished yet
        return None


@pytest.mark.slow
@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_a_simulation_killed_mid_run_resumes_to_the_same_result(tmp_path, dp: bool) -> None:
    # Prepare: the uninterrupted run of the same seed.
    privacy = [] if dp else ["--no-dp"]
    full = tmp_path / "full"
    assert (done := _simulate(full, *privacy)).returncode == 0, done.stderr[-3000:]
    run, work = tmp_path / "run", tmp_path / ".run.partial"
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *ARGS, *privacy, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ledgers = [work / "sites" / f"site-{i:02d}-state" / "ledger-breastmnist.jsonl" for i in range(2)]

    def round_2_started() -> bool:  # DP sites reserve a round in their ledger before training it
        if dp:
            return all(p.is_file() and '"round": 2' in p.read_text() for p in ledgers)
        return _checkpoint_round(work) == 1

    # Execute: SIGKILL the whole simulation (coordinator, Ray, sites) once round 2 has begun, then resume it.
    while not round_2_started():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    checkpoint_round = ResumeState.load(work).round
    resumed = _simulate(run, *privacy, "--resume")
    # Assert: same weights (bit for bit), same metrics and results, each round charged once at every site.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_round == 1  # killed after round 1's checkpoint (DP: while round 2 trained)
    for name in ("model-final.safetensors", "model-best.safetensors", "test_scores.npy"):
        assert (run / name).read_bytes() == (full / name).read_bytes(), name
    assert _metrics(run) == _metrics(full)
    fed, fed_full = (json.loads((r / "federated.json").read_text()) for r in (run, full))
    assert fed == fed_full
    for i in range(2):
        ledger = run / "sites" / f"site-{i:02d}-state" / "ledger-breastmnist.jsonl"
        assert ([r for _, r in _reserves(ledger)] == [1, 2]) if dp else not ledger.exists()
    assert "resumed" in (run / "audit.jsonl").read_text()


# ------------------------------------------------------------------------------ under SecAgg+
class _CoordinatorCrash(BaseException):
    """Stands for the coordinator dying (not an Exception: nothing on the way may catch it)."""


@pytest.mark.slow
def test_a_secure_run_resumed_after_its_sites_trained_replays_their_updates(tmp_path) -> None:
    # Prepare: three sites, SecAgg+, two rounds; the coordinator dies in round 2 after every site has trained
    # and sent its masked update (at the unmasking stage).
    from flwr.app import Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app import app as client_app
    from common.config import RunConfig
    from server.app import main
    from simulations.loopback import LoopbackGrid
    from tests.test_secure_aggregation import SIZES, _write_sites

    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=2, local_epochs=1,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=3,
                    epsilon=4.0, accountant="rdp", max_site_records=200)
    nodes = {10 + i: {"partition-id": i} for i in range(len(SIZES))}

    def crash_at_round_2_unmasking(msg) -> None:
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.group_id == "2" and rec is not None and rec.get(Key.STAGE) == "unmask":
            raise _CoordinatorCrash

    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    grid.before_delivery = crash_at_round_2_unmasking
    with pytest.raises(_CoordinatorCrash):
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Execute: a new coordinator process (new Flower run id) resumes the run.
    resumed_cfg = cfg.replace(resume=True)
    grid = LoopbackGrid(client_app, nodes, resumed_cfg.to_flower())
    main(grid, Context(run_id=2, node_id=1, node_config={}, state=RecordDict(), run_config=resumed_cfg.to_flower()))
    # Assert: the run finished both rounds; every site paid for each round once, under the first run's key.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["sites_answered"] == 3
    for i in range(len(SIZES)):
        assert _reserves(tmp_path / f"site-{i:02d}-state" / "ledger-breastmnist.jsonl") == [(1, 1), (1, 2)]
    federated = json.loads((tmp_path / "run" / "federated.json").read_text())
    assert all(p["rounds_trained"] == 2 and p["epsilon"] <= 4.0 for p in federated["privacy"])
