"""Checkpoint and resume: a coordinator killed mid-run continues with nothing lost and no ε spent twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client.dp.rng import OS_ENTROPY, REPRODUCIBLE
from common.errors import DataError
from server.resume import ResumeState
from simulations.experiment import partial_dir
from tests.test_site_privacy import _client, _epsilon, _initial, _ledger, _policy, _reserves, _rows, _site

ROOT = Path(__file__).resolve().parents[1]


def _source_ledger(state: Path) -> Path:
    """The one ledger in a site's state folder (one data source per simulated site)."""
    files = sorted(state.glob("ledger-*.jsonl"))
    assert len(files) == 1 and files[0].name.startswith("ledger-src-"), files
    return files[0]


# ------------------------------------------------------------------------------ the sites' ledgers
def test_a_reserved_but_never_completed_round_is_not_charged_twice(tmp_path) -> None:
    # Prepare: a site trains round 1, then reserves round 2 (as the node does before touching its data) and dies.
    _site(tmp_path)
    _policy(tmp_path)
    params = _initial()
    crashed = _client(tmp_path)
    crashed.fit(params, {"server-round": 1, "secure-aggregation": 1})
    plan = crashed.ledger.plan(1)
    assert plan is not None
    assert crashed.budget.charge_round(1, 2, plan).reused is False  # then killed: nothing left the site
    ledger = _ledger(tmp_path)
    # Execute: the restarted node is asked for round 2 again.
    _, n, m = _client(tmp_path).fit(params, {"server-round": 2, "secure-aggregation": 1})
    # Assert: the open reservation covers the retry (claimed, not reserved again); ε is that of the count release
    # and two rounds, not three.
    assert n == plan.records_estimate and not m["refused"] and m["steps"] == plan.steps_per_round
    assert _reserves(ledger) == [(1, 1), (1, 2)] and _reserves(ledger, "count") == [(1, 0)]
    assert [(r["mechanism"], r["run"], r["round"]) for r in _rows(ledger, "claim")] == [("dp-sgd", 1, 2)]
    two_rounds = _epsilon(plan.count_entry, plan.training_entry, plan.training_entry)
    assert m["epsilon"] == pytest.approx(two_rounds) and m["epsilon"] <= 4.0
    assert m["epsilon"] < _epsilon(plan.count_entry, *[plan.training_entry] * 3)


def test_a_completed_round_asked_again_replays_the_same_update_and_a_new_model_is_charged(tmp_path) -> None:
    # Prepare
    _site(tmp_path)
    _policy(tmp_path)
    params = _initial()
    ledger = _ledger(tmp_path)
    first_update, n1, m1 = _client(tmp_path).fit(params, {"server-round": 1, "secure-aggregation": 1})
    rows_after_first = _rows(ledger)
    # Execute: the coordinator restarts and sends round 1 with the same model, then with another model.
    again, n2, m2 = _client(tmp_path).fit(params, {"server-round": 1, "secure-aggregation": 1})
    rows_after_replay = _rows(ledger)
    other = [p + 0.01 for p in params]
    third, _, m3 = _client(tmp_path).fit(other, {"server-round": 1, "secure-aggregation": 1})
    # Assert: the replay is the kept update, bit for bit (under OS entropy a retraining would differ), and free;
    # a different model is a new release and counted.
    assert all(np.array_equal(a, b) for a, b in zip(first_update, again, strict=True)) and n1 == n2
    assert m2["epsilon"] == m1["epsilon"] and m2["noise-multiplier"] == m1["noise-multiplier"]
    assert m2["steps"] == m1["steps"] > 0 and m2["refused"] is False
    assert rows_after_replay == rows_after_first  # nothing reserved, claimed or bound anew
    assert _reserves(ledger) == [(1, 1), (1, 1)] and m3["epsilon"] > m1["epsilon"]
    assert _reserves(ledger, "count") == [(1, 0)]  # one plan, one count release for the run
    assert not all(np.array_equal(a, b) for a, b in zip(first_update, third, strict=True))


def test_a_round_whose_sum_this_site_helped_unmask_is_never_replayed(tmp_path) -> None:
    # Prepare: round 1 trained and kept; then the site handed over unmasking shares for a sum holding it
    from client.secagg_guard import unmasked_marker

    _site(tmp_path)
    _policy(tmp_path)
    params = _initial()
    first, _, m1 = _client(tmp_path).fit(params, {"server-round": 1, "secure-aggregation": 1})
    client = _client(tmp_path)
    marker = unmasked_marker(client.state_folder, run=1, server_round=1)
    marker.parent.mkdir(parents=True)
    marker.touch()
    # Execute: the coordinator asks for round 1 again with the same model (to unmask a second, smaller sum)
    again, _, m2 = client.fit(params, {"server-round": 1, "secure-aggregation": 1})
    # Assert: not the kept update; a new release, charged (here within the run's budget) or refused
    assert not all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert m2["refused"] or (_reserves(_ledger(tmp_path)) == [(1, 1), (1, 1)] and m2["epsilon"] > m1["epsilon"])


def test_the_coordinators_run_key_names_the_run_in_the_ledger(tmp_path) -> None:
    # Prepare: a resumed deployment run has a new Flower run id; the coordinator sends the first run's key.
    _site(tmp_path)
    _policy(tmp_path)
    _client(tmp_path, run_id=7).fit(_initial(), {"server-round": 1, "secure-aggregation": 1, "run-key": 3})
    # Execute
    _, _, m = _client(tmp_path, run_id=8).fit(_initial(), {"server-round": 2, "secure-aggregation": 1, "run-key": 3})
    # Assert: both rounds count against run 3's budget and plan (no fresh per-run ε, no second count release for
    # the restarted run); both Flower runs are bound to run key 3.
    ledger = _ledger(tmp_path)
    assert _reserves(ledger) == [(3, 1), (3, 2)] and _reserves(ledger, "count") == [(3, 0)]
    assert [(r["flower_run"], r["run"]) for r in _rows(ledger, "bind")] == [(7, 3), (8, 3)]
    assert {r["run"] for r in _rows(ledger, "plan")} == {3}
    assert 3.5 < m["epsilon"] <= 4.0 and m["refused"] is False


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
# state folder. Without SecAgg+: its quantization rounds stochastically, so a secure run is not bit-reproducible.
ARGS = ["simulate", "--dataset", "breastmnist", "--sites", "2", "--rounds", "2", "--local-epochs", "1",
        "--strategy", "fedadam", "--scaffold", "--no-compare", "--cpus", "2", "--no-secagg"]


def _simulate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", *ARGS, "--out", str(out), *extra],
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


def _state(run: Path, site: int) -> Path:
    return run / "sites" / f"site-{site:02d}-state"


def _dp_sgd_reserved(state: Path, server_round: int) -> bool:
    """Whether a site's ledger holds its DP-SGD reservation of ``server_round`` (complete lines only)."""
    for path in state.glob("ledger-*.jsonl"):
        for line in path.read_text().splitlines(keepends=True):
            row = json.loads(line) if line.endswith("\n") else {}
            if row.get("kind") == "reserve" and row.get("mechanism") == "dp-sgd" and row.get("round") == server_round:
                return True
    return False


def _kill_in_round_2_and_resume(run: Path, *flags: str, dp: bool) -> tuple[int, subprocess.CompletedProcess]:
    """Start a run, SIGKILL it whole (coordinator, Ray, sites) once round 2 has begun, resume it.

    Returns the checkpointed round at the kill and the resumed process.
    """
    work = partial_dir(run)
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", *ARGS, *flags, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def round_2_started() -> bool:  # DP sites reserve a round in their ledger before training it
        if dp:
            return all(_dp_sgd_reserved(_state(work, i), 2) for i in range(2))
        return _checkpoint_round(work) == 1

    try:
        while not round_2_started():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when the run ended on its own
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    checkpoint_round = ResumeState.load(work).round
    return checkpoint_round, _simulate(run, *flags, "--resume")


def _releases(ledger: Path) -> list[tuple[str, int, float, float, int]]:
    """Every reservation (mechanism, round, σ, q, steps), in ledger order, without the run key."""
    return [(r["mechanism"], r["round"], r["sigma"], r["q"], r["steps"]) for r in _rows(ledger, "reserve")]


def _each_release_charged_once(ledger: Path) -> None:
    """The run's count, its two DP-SGD rounds and the final model's validation, each reserved once, one run key."""
    assert [(m, rnd) for m, rnd, *_ in _releases(ledger)] == [("count", 0), ("dp-sgd", 1), ("dp-sgd", 2),
                                                               ("validation", 2)]
    assert len({r["run"] for r in _rows(ledger, "reserve")}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_a_simulation_killed_mid_run_resumes_to_the_same_result(tmp_path, dp: bool) -> None:
    # Prepare: the uninterrupted run of the same seed, with the research mode's seeded DP randomness (noise,
    # sampling, augmentation) so that a retrained round is bit-identical (under OS entropy it never is).
    flags = ["--reproducible", *([] if dp else ["--no-dp"])]
    full, run = tmp_path / "full", tmp_path / "run"
    assert (done := _simulate(full, *flags)).returncode == 0, done.stderr[-3000:]
    # Execute: SIGKILL the whole simulation once round 2 has begun (DP: while it trains), then resume it.
    checkpoint_round, resumed = _kill_in_round_2_and_resume(run, *flags, dp=dp)
    # Assert: same weights (bit for bit), same metrics and results, each release charged once at every site.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_round == 1  # killed after round 1's checkpoint (DP: while round 2 trained)
    for name in ("model-final.safetensors", "model-best.safetensors", "test_scores.npy"):
        assert (run / name).read_bytes() == (full / name).read_bytes(), name
    assert _metrics(run) == _metrics(full)
    fed, fed_full = (json.loads((r / "federated.json").read_text()) for r in (run, full))
    assert fed == fed_full
    assert all(json.loads((r / "summary.json").read_text())["randomness"] == REPRODUCIBLE for r in (run, full))
    for i in range(2):
        if dp:
            ledger = _source_ledger(_state(run, i))
            _each_release_charged_once(ledger)
            assert _releases(ledger) == _releases(_source_ledger(_state(full, i)))  # the same plan and rounds
        else:
            assert not list(_state(run, i).glob("ledger-*.jsonl"))
    assert "resumed" in (run / "audit.jsonl").read_text()


@pytest.mark.slow
def test_a_simulation_killed_mid_run_under_os_entropy_resumes_and_charges_each_round_once(tmp_path) -> None:
    # Prepare: the default randomness, as a hospital node draws it: a retrained round is not bit-identical.
    run = tmp_path / "run"
    # Execute: SIGKILL the whole simulation while round 2 trains at both sites, then resume it.
    checkpoint_round, resumed = _kill_in_round_2_and_resume(run, dp=True)
    # Assert: the run finishes both rounds from round 1's checkpoint; each site's round 2 reservation, left open
    # by the killed process, covers the retried round (claimed, not reserved again): every release charged once.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_round == 1
    assert [row["round"] for row in _metrics(run)] == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text())["randomness"] == OS_ENTROPY
    fed = json.loads((run / "federated.json").read_text())
    assert len(fed["privacy"]) == 2
    assert all(p["randomness"] == OS_ENTROPY and 0 < p["epsilon"] <= 8.0 for p in fed["privacy"])
    for i in range(2):
        ledger = _source_ledger(_state(run, i))
        _each_release_charged_once(ledger)
        assert [(r["mechanism"], r["round"]) for r in _rows(ledger, "claim")] in ([], [("dp-sgd", 2)])
    assert "resumed" in (run / "audit.jsonl").read_text()


# ------------------------------------------------------------------------------ under SecAgg+
class _CoordinatorCrash(BaseException):
    """Stands for the coordinator dying (not an Exception: nothing on the way may catch it)."""


def _secure_run_crashed_at_round_2_unmasking(tmp_path: Path):
    """Three sites, SecAgg+, two rounds; the coordinator dies in round 2 after every site trained and masked."""
    from flwr.app import Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app import app as client_app
    from common.config import RunConfig
    from server.app import main
    from simulations.loopback import LoopbackGrid
    from tests.test_secure_aggregation import SIZES, _write_sites

    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=2, local_epochs=1,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=2,
                    epsilon=4.0, accountant="rdp", max_site_records=250)
    nodes = {10 + i: {"partition-id": i} for i in range(len(SIZES))}

    def crash_at_round_2_unmasking(msg) -> None:
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.group_id == "2" and rec is not None and rec.get(Key.STAGE) == "unmask":
            raise _CoordinatorCrash

    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    grid.before_delivery = crash_at_round_2_unmasking
    with pytest.raises(_CoordinatorCrash):
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))

    def resume(node_ids: list[int]) -> None:
        """A new coordinator process (new Flower run id) resumes the run with these sites."""
        resumed_cfg = cfg.replace(resume=True)
        grid = LoopbackGrid(client_app, {n: nodes[n] for n in node_ids}, resumed_cfg.to_flower())
        main(grid, Context(run_id=2, node_id=1, node_config={}, state=RecordDict(),
                           run_config=resumed_cfg.to_flower()))

    return resume, sorted(nodes)


@pytest.mark.slow
def test_a_secure_run_resumed_after_its_sites_trained_replays_their_updates(tmp_path) -> None:
    # Prepare
    resume, nodes = _secure_run_crashed_at_round_2_unmasking(tmp_path)
    # Execute: the same three sites
    resume(nodes)
    # Assert: the run finished both rounds; every site paid for each round once, under the first run's key.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["sites_answered"] == 3
    for i in range(len(nodes)):
        ledger = _ledger(tmp_path, i)
        assert _reserves(ledger) == [(1, 1), (1, 2)] and _reserves(ledger, "count") == [(1, 0)]
        assert _reserves(ledger, "validation") == [(1, 2)]  # the final model, validated once after the resume
        # The loopback sites see one Flower run id: the resumed coordinator sent the first run's key, else refused.
        assert [(r["flower_run"], r["run"]) for r in _rows(ledger, "bind")] == [(1, 1)]
    federated = json.loads((tmp_path / "run" / "federated.json").read_text())
    assert all(p["rounds_trained"] == 2 and p["epsilon"] <= 4.0 for p in federated["privacy"])


@pytest.mark.slow
def test_a_kept_update_is_never_replayed_into_another_cohort(tmp_path) -> None:
    # Prepare: the round-2 sum of three sites was almost unmasked; a "restarted" coordinator now asks two of them
    # for round 2 again: their replayed updates would give it the sum of two, and the difference the third's update.
    resume, nodes = _secure_run_crashed_at_round_2_unmasking(tmp_path)
    # Execute
    resume(nodes[:2])
    # Assert: no replay; round 2 in another cohort is a new release, which the run's budget (planned for two
    # rounds, both spent) does not cover: both sites refused it, nothing was charged, no sum was unmasked.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and rows[-1]["sites_answered"] == 0
    assert sorted(r["site"] for r in rows[-1]["refused"]) == ["site-0", "site-1"]
    assert all("above its budget" in r["reason"] for r in rows[-1]["refused"])
    for i in range(3):
        assert _reserves(_ledger(tmp_path, i)) == [(1, 1), (1, 2)]
