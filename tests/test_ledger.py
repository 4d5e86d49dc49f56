"""The site's privacy ledger: keyed by the hospital's data source, atomic across processes, refusing bad files."""

from __future__ import annotations

import json
import multiprocessing as mp
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from client.dp import accounting as privacy
from client.dp.accounting import PrivacyPlan
from client.dp.ledger import LEDGER_FORMAT, DataSource, Ledger, LedgerError, data_source, ledgers_in
from common import audit
from common.errors import DataError
from common.io import locked

#: One DP-SGD round: ε ≈ 4.04 alone, ≈ 5.37 twice, ≈ 6.46 three times (δ=1e-5, RDP).
ENTRY = (1.0, 0.05, 100)
ONE_FITS = 4.5
TWO_FIT = 6.0
SPAWN = mp.get_context("spawn")


def _charge(ledger: Ledger, *, run: int, lifetime: float | None, server_round: int = 1,
            mechanism: str = "dp-sgd", entry: tuple[float, float, int] = ENTRY) -> Any:
    return ledger.charge(run=run, server_round=server_round, mechanism=mechanism, entry=entry, epsilon=100.0,
                         delta=1e-5, lifetime_epsilon=lifetime, lifetime_delta=1e-5, accountant="rdp")


def _source(tmp_path: Path, name: str = "site.npz") -> DataSource:
    return data_source({"data-path": str(tmp_path / name)}, {})


def _reserves(path: Path) -> list[dict[str, Any]]:
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["kind"] == "reserve"]


# ------------------------------------------------------------------ workers of the multi-process tests
def _charge_worker(folder: str, source: DataSource, run: int, barrier: Any, out: Any) -> None:
    privacy.epsilon_spent(history=[ENTRY], delta=1e-5, accountant="rdp")  # import Opacus before the start line
    ledger = Ledger(Path(folder), source)
    barrier.wait()
    out.put(_charge(ledger, run=run, lifetime=ONE_FITS).granted)


def _audit_worker(path: str, name: str, barrier: Any) -> None:
    barrier.wait()
    for i in range(50):
        audit.append(path, {"event": name, "i": i})


def _hold_lock(folder: str, held: Any, release: Any) -> None:
    with locked(Path(folder) / "ledger.lock", timeout=5):
        held.set()
        release.wait(60)


def _reserve_and_exit(folder: str, source: DataSource) -> None:
    assert _charge(Ledger(Path(folder), source), run=1, lifetime=None).granted


# ------------------------------------------------------------------ the coordinator cannot open fresh budgets
def test_renaming_the_dataset_keeps_one_ledger_and_one_lifetime_budget(tmp_path) -> None:
    # Prepare: one node config, three run configs whose dataset names the coordinator chose
    node = {"data-path": str(tmp_path / "site.npz")}
    folder = tmp_path / "state"
    runs = [{"dataset": name} for name in ("breastmnist", "pneumoniamnist", "organamnist")]

    # Execute: one round of a new run under each name
    charges = [_charge(Ledger(folder, data_source(node, cfg)), run=i, lifetime=TWO_FIT) for i, cfg in enumerate(runs)]

    # Assert: one file (owner-only, in an owner-only folder); the third run is refused, the lifetime stays in budget
    files = list(folder.glob("ledger-*.jsonl"))
    assert len(files) == 1 and len(_reserves(files[0])) == 2
    assert [c.granted for c in charges] == [True, True, False]
    assert "lifetime" in str(charges[2].reason) and f"ε={TWO_FIT:g}" in str(charges[2].reason)
    assert charges[2].epsilon_lifetime == pytest.approx(charges[1].epsilon_lifetime)
    assert charges[1].epsilon_lifetime <= TWO_FIT
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    header = json.loads(files[0].read_text().splitlines()[0])
    assert header["kind"] == "header" and header["format"] == LEDGER_FORMAT and header["source"] in files[0].name


def test_a_second_run_key_inside_one_flower_run_is_refused(tmp_path) -> None:
    # Prepare
    ledger = Ledger(tmp_path, _source(tmp_path))

    # Execute
    first, again, rotated, resumed = (ledger.bind_run(7, 1), ledger.bind_run(7, 1), ledger.bind_run(7, 2),
                                      ledger.bind_run(8, 1))

    # Assert: only the rotation inside Flower run 7 is refused; a resumed run (new Flower run, same key) is not
    assert first is None and again is None and resumed is None
    assert rotated is not None and "run-key 2" in rotated and "Flower run 7" in rotated
    assert ledger.bind_run(7, 1) is None


# ------------------------------------------------------------------ atomic across processes
def test_two_processes_charging_at_once_cannot_both_pass_the_lifetime_budget(tmp_path) -> None:
    # Prepare: two processes, one lifetime budget that holds one round, not two
    source = _source(tmp_path)
    barrier, out = SPAWN.Barrier(2), SPAWN.Queue()
    workers = [SPAWN.Process(target=_charge_worker, args=(str(tmp_path), source, run, barrier, out))
               for run in (1, 2)]

    # Execute: both check-and-reserve at the same moment
    for w in workers:
        w.start()
    granted = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)

    # Assert: exactly one granted, exactly one reservation on file
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(granted) == [False, True]
    assert len(_reserves(Ledger(tmp_path, source).path)) == 1


def test_two_processes_appending_to_one_audit_log_keep_the_chain(tmp_path) -> None:
    # Prepare
    log = tmp_path / "audit.jsonl"
    barrier = SPAWN.Barrier(2)
    workers = [SPAWN.Process(target=_audit_worker, args=(str(log), name, barrier)) for name in ("a", "b")]

    # Execute
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)

    # Assert: the chain verifies and the sequence numbers are 0..99, each once
    assert [w.exitcode for w in workers] == [0, 0]
    result = audit.verify(log)
    assert result.ok, result.problems
    assert [json.loads(line)["seq"] for line in log.read_text().splitlines()] == list(range(100))


def test_an_open_reservation_left_by_a_process_that_exited_is_reused(tmp_path) -> None:
    # Prepare: a process reserved round 1 of run 1 and exited before completing it
    source = _source(tmp_path)
    child = SPAWN.Process(target=_reserve_and_exit, args=(str(tmp_path), source))
    child.start()
    child.join(timeout=120)
    ledger = Ledger(tmp_path, source)

    # Execute: the retry, then the same call again after it too ended without completing
    retried, again = _charge(ledger, run=1, lifetime=None), _charge(ledger, run=1, lifetime=None)

    # Assert: one reservation counts both attempts, once
    one = privacy.epsilon_spent(history=[ENTRY], delta=1e-5, accountant="rdp")
    assert child.exitcode == 0 and ledger.round_state(1, 1) == "reserved"
    assert retried.granted and retried.reused and again.reused
    assert retried.epsilon_run == pytest.approx(one) and len(_reserves(ledger.path)) == 1


def test_an_open_reservation_held_by_a_live_call_is_charged_again(tmp_path) -> None:
    # Prepare: another thread of this process reserved round 1 and is still working on it
    ledger = Ledger(tmp_path, _source(tmp_path))
    reserved, finish = threading.Event(), threading.Event()
    results: list[Any] = []

    def holder() -> None:
        results.append(_charge(ledger, run=1, lifetime=None))
        reserved.set()
        finish.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert reserved.wait(120)

        # Execute: the same release asked for while the holder's release may still leave the site
        second = _charge(ledger, run=1, lifetime=None)
    finally:
        finish.set()
        thread.join(timeout=60)

    # Assert: charged again, both counted
    two = privacy.epsilon_spent(history=[ENTRY, ENTRY], delta=1e-5, accountant="rdp")
    assert results[0].granted and not results[0].reused and second.granted and not second.reused
    assert second.epsilon_run == pytest.approx(two) and len(_reserves(ledger.path)) == 2


def test_the_first_plan_recorded_wins_and_old_plans_still_read(tmp_path) -> None:
    # Prepare
    ledger = Ledger(tmp_path, _source(tmp_path))
    first = PrivacyPlan(1.1, 0.05, 20, 200, records_estimate=400, count_noise=3.0)

    # Execute
    got = ledger.plan_or_record(1, lambda: first)
    second = ledger.plan_or_record(1, lambda: pytest.fail("the plan of run 1 is already recorded"))
    with open(ledger.path, "a") as handle:  # a plan written before the newer fields existed
        old = {"noise_multiplier": 0.9, "sample_rate": 0.1, "steps_per_round": 10, "planned_steps": 50}
        handle.write(json.dumps({"kind": "plan", "run": 2, "plan": old}) + "\n")

    # Assert
    assert got == second == first == ledger.plan(1)
    assert ledger.plan(2) == PrivacyPlan(0.9, 0.1, 10, 50) and ledger.plan(3) is None


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("content", "message"), [
    ("{\"kind\": \"reserve\", \"run\": 1, \"round\": 1, \"si", "line 2, the last, is incomplete"),
    ("not json\n{\"kind\": \"complete\"}\n", "line 2 is not a valid entry"),
    ("{\"kind\": \"reserve\", \"run\": 1}\n", "line 2 is not a valid entry"),
])
def test_a_damaged_ledger_is_refused_and_left_as_it_is(tmp_path, content: str, message: str) -> None:
    # Prepare
    ledger = Ledger(tmp_path, _source(tmp_path))
    header = {"kind": "header", "format": LEDGER_FORMAT, "source": ledger.source.key, "label": ledger.source.label}
    ledger.path.write_text(json.dumps(header) + "\n" + content)
    before = ledger.path.read_bytes()

    # Execute / Assert
    with pytest.raises(LedgerError, match=message) as caught:
        _charge(ledger, run=1, lifetime=None)
    assert str(ledger.path) in str(caught.value) and ledger.path.read_bytes() == before


def test_a_ledger_of_a_newer_format_asks_for_an_upgrade(tmp_path) -> None:
    # Prepare
    ledger = Ledger(tmp_path, _source(tmp_path))
    ledger.path.write_text(json.dumps({"kind": "header", "format": LEDGER_FORMAT + 1, "source": ledger.source.key})
                           + "\n")
    before = ledger.path.read_bytes()

    # Execute / Assert
    with pytest.raises(LedgerError, match=f"format {LEDGER_FORMAT + 1}.*upgrade medsilo"):
        _charge(ledger, run=1, lifetime=None)
    with pytest.raises(LedgerError, match="upgrade medsilo"):
        ledger.history()
    assert ledger.path.read_bytes() == before


def test_a_lock_held_past_the_timeout_refuses(tmp_path) -> None:
    # Prepare: a reservation on file, and another process holding the folder's lock
    source = _source(tmp_path)
    assert _charge(Ledger(tmp_path, source), run=1, lifetime=None).granted
    before = Ledger(tmp_path, source).path.read_bytes()
    held, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    holder.start()
    try:
        assert held.wait(120)

        # Execute / Assert
        with pytest.raises(LedgerError, match=r"locked by another process for more than 0.5 s"):
            _charge(Ledger(tmp_path, source, lock_timeout=0.5), run=1, server_round=2, lifetime=None)
    finally:
        release.set()
        holder.join(timeout=60)
    assert Ledger(tmp_path, source).path.read_bytes() == before


def test_legacy_ledgers_count_toward_every_new_source(tmp_path) -> None:
    # Prepare: a ledger of the previous format, keyed by the dataset name, with one reserved round
    legacy = tmp_path / "ledger-breastmnist.jsonl"
    legacy.write_text("".join(json.dumps(row) + "\n" for row in [
        {"kind": "plan", "run": 1, "sigma": 1.0, "q": 0.05, "steps_per_round": 100, "planned_steps": 200},
        {"kind": "reserve", "run": 1, "round": 1, "sigma": 1.0, "q": 0.05, "steps": 100},
        {"kind": "complete", "run": 1, "round": 1, "steps": 100, "epsilon_run": 4.0, "epsilon_lifetime": 4.0},
    ]))
    before = legacy.read_bytes()
    ledger = Ledger(tmp_path, _source(tmp_path, "other.npz"))

    # Execute
    charge = _charge(ledger, run=5, lifetime=ONE_FITS)

    # Assert: the legacy round is this source's lifetime already; one more round would pass the budget
    one = privacy.epsilon_spent(history=[ENTRY], delta=1e-5, accountant="rdp")
    assert ledger.history() == [ENTRY] and ledger.spent(delta=1e-5, accountant="rdp") == pytest.approx(one)
    assert not charge.granted and "lifetime" in str(charge.reason)
    assert legacy.read_bytes() == before and ledgers_in(tmp_path) == ([], [legacy])


# ------------------------------------------------------------------ the data source
def test_a_url_source_never_shows_credentials(tmp_path) -> None:
    # Prepare
    url = "HTTPS://alice:s3cret@PACS.example.org:8443/dicom-web/?access_token=t0ken#frag"

    # Execute
    source = data_source({"data-path": url}, {"dataset": "breastmnist"})
    other_user = data_source({"data-path": "https://bob:pw@pacs.example.org:8443/dicom-web"}, {})

    # Assert
    assert source.label == "https://pacs.example.org:8443/dicom-web"
    assert not any(secret in source.label + source.key for secret in ("alice", "s3cret", "t0ken", "frag"))
    assert source.key == other_user.key and source.key.startswith("src-") and len(source.key) == 20


def test_the_hospitals_ledger_source_wins_and_a_missing_source_is_an_error(tmp_path) -> None:
    # Prepare
    site = tmp_path / "sites" / "site-03.npz"

    # Execute
    named = data_source({"ledger-source": "ct-archive", "data-path": str(site)}, {})
    by_path = data_source({"data-path": str(site)}, {"site-data-dir": "/elsewhere"})
    simulated = data_source({"partition-id": 3}, {"site-data-dir": str(tmp_path / "sites" / ".." / "sites")})

    # Assert
    assert named.label == "ct-archive" and named.key != by_path.key
    assert by_path == simulated and by_path.label == str(site)
    with pytest.raises(DataError, match="data-path"):
        data_source({"partition-id": 3}, {"dataset": "breastmnist"})


# ------------------------------------------------------------------ the command line
def test_site_ledger_lists_every_source_and_the_legacy_ledgers(tmp_path, capsys) -> None:
    # Prepare: two data sources and one legacy ledger in one state folder
    from common.cli import main

    for name in ("a.npz", "b.npz"):
        assert _charge(Ledger(tmp_path, _source(tmp_path, name)), run=1, lifetime=None).granted
    (tmp_path / "ledger-breastmnist.jsonl").write_text(
        json.dumps({"kind": "reserve", "run": 9, "round": 1, "sigma": 1.0, "q": 0.05, "steps": 100}) + "\n")

    # Execute
    code = main(["site", "ledger", "--state-dir", str(tmp_path), "--accountant", "rdp"])
    text = capsys.readouterr().out
    json_code = main(["site", "ledger", "--state-dir", str(tmp_path), "--accountant", "rdp", "--json"])
    report = json.loads(capsys.readouterr().out)
    empty = main(["site", "ledger", "--state-dir", str(tmp_path / "none")])
    error = capsys.readouterr().err

    # Assert
    assert code == json_code == 0 and empty == 2 and "no privacy ledger" in error
    assert str(tmp_path / "a.npz") in text and str(tmp_path / "b.npz") in text and "ledger-breastmnist.jsonl" in text
    assert sorted(s["label"] for s in report["sources"]) == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    two = privacy.epsilon_spent(history=[ENTRY, ENTRY], delta=1e-5, accountant="rdp")
    assert all(s["epsilon_lifetime"] == pytest.approx(two) for s in report["sources"])
    assert [o["file"] for o in report["legacy"]] == ["ledger-breastmnist.jsonl"]
