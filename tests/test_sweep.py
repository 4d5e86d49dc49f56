"""``medsilo sweep``: the grid's validation, the interval math, and a tiny real sweep in one Ray session."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_simulation import TAG, _ray_processes

from common.errors import ConfigError
from simulations.sweep import SETTINGS_FILE, SweepSettings, parse_grid, plan, run_name, settings_record
from simulations.sweep_table import t_interval

ROOT = Path(__file__).resolve().parents[1]


def _settings(out: Path, **kw: object) -> SweepSettings:
    values: dict = dict(dataset="breastmnist", sites=2, partitions=["iid"], epsilons=["8", "none"], seeds=["0", "1"],
                        out=out, options={"rounds": 1, "local_epochs": 1}, compare=False)
    values.update(kw)
    return SweepSettings(**values)


def test_grid_parser_reports_every_problem_at_once() -> None:
    # Prepare
    bad = dict(dataset="nomnist", epsilons=["abc", "-1", "8", "8.0", "none", "None", "inf"],
               seeds=["0", "x", "0", "-2"], partitions=["dirichlet:0", "iid", "IID", "zipf"])
    # Execute
    with pytest.raises(ConfigError) as caught:
        parse_grid(**bad)  # type: ignore[arg-type]
    # Assert: one error, each problem named with its value
    problems = caught.value.problems
    for needle in ("'nomnist'", "'abc'", "'-1'", "'8.0': given twice", "'None': given twice", "'inf'", "'x'",
                   "--seeds '0': given twice", "'-2'", "'dirichlet:0'", "'IID': given twice", "'zipf'"):
        assert any(needle in p for p in problems), (needle, problems)
    assert len(problems) == 12


def test_grid_is_canonical_whatever_the_order() -> None:
    # Execute
    grid = parse_grid(dataset="breastmnist", epsilons=["none", "8", "1"], seeds=["2", "0"],
                      partitions=["iid", "dirichlet:0.5"])
    # Assert
    assert grid.epsilons == (1.0, 8.0, None) and grid.seeds == (0, 2)
    assert [str(p) for p in grid.partitions] == ["dirichlet:0.5", "iid"]
    assert run_name(grid.partitions[0], None, 2) == "dirichlet-0.5_no-dp_seed-2"


def test_bad_grid_on_the_command_line_exits_2_before_anything_is_written(tmp_path) -> None:
    # Prepare
    out = tmp_path / "sweep"
    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "sweep", "--dataset", "breastmnist", "--epsilon", "abc", "-1", "4", "4",
         "--seeds", "0", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "4 problem(s)" in result.stderr
    for needle in ("--epsilon 'abc'", "--epsilon '-1'", "--epsilon '4': given twice", "--seeds '0': given twice"):
        assert needle in result.stderr, needle
    assert not out.exists()


@pytest.mark.parametrize("values", [[0.61, 0.74], [0.7, 0.72, 0.69], [0.5, 0.9, 0.8, 0.65, 0.7]])
def test_t_interval_matches_scipy(values: list[float]) -> None:
    # Prepare: scipy's own interval around the mean, with the standard error of the mean
    from scipy import stats

    n = len(values)
    expected = stats.t.interval(0.95, n - 1, loc=sum(values) / n, scale=stats.sem(values))
    # Execute
    got = t_interval(values)
    # Assert
    assert got["n"] == n and got["mean"] == pytest.approx(sum(values) / n)
    assert got["sd"] == pytest.approx(stats.tstd(values))
    assert got["ci"] == pytest.approx(list(expected), rel=1e-9)


def test_t_interval_textbook_value_and_single_seed() -> None:
    # Execute
    two = t_interval([0.0, 1.0])
    one = t_interval([0.8])
    # Assert: t(0.975, 1) = 12.706; sd = 1/sqrt(2); half-width 12.706 * 0.5
    assert two["ci"] == pytest.approx([0.5 - 12.7062 * 0.5, 0.5 + 12.7062 * 0.5], abs=1e-3)
    assert one == {"n": 1, "mean": 0.8, "sd": None, "ci": None}


def test_a_folder_of_another_sweep_or_of_something_else_is_refused(tmp_path) -> None:
    # Prepare: a sweep folder made with seeds 0 1, and a folder that is no sweep's
    other = _settings(tmp_path / "a", seeds=["0", "1"])
    (tmp_path / "a").mkdir()
    grid = parse_grid(dataset="breastmnist", epsilons=other.epsilons, seeds=other.seeds, partitions=other.partitions)
    (tmp_path / "a" / SETTINGS_FILE).write_text(json.dumps(settings_record(other, grid)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    # Execute
    with pytest.raises(ConfigError) as changed:
        plan(_settings(tmp_path / "a", seeds=["0", "1", "2"], options={"rounds": 2, "local_epochs": 1}))
    with pytest.raises(ConfigError) as foreign:
        plan(_settings(tmp_path / "b"))
    # Assert
    message = str(changed.value)
    assert "other settings" in message and "seeds: [0, 1] there, [0, 1, 2] here" in message
    assert "rounds: 1 there, 2 here" in message
    assert "not a sweep folder" in str(foreign.value)


@pytest.mark.slow
def test_tiny_sweep_reuses_one_ray_and_resumes(tmp_path, monkeypatch) -> None:
    # Prepare: spies on ray.init (Flower's backend and the runner call it through the module) and on each run
    import ray

    import simulations.sweep as sweep
    from common.cli import main
    from common.flower_env import FLOWER_ENV

    monkeypatch.setenv(TAG, str(tmp_path))  # Ray's services inherit it: this test's Ray processes are findable
    for key in [*FLOWER_ENV, "FLWR_HOME", "RAY_COLOR_PREFIX"]:  # the runs set them; restored after the test
        monkeypatch.delenv(key, raising=False)
    inits: list[dict] = []
    real_init = ray.init

    def counting_init(*args: Any, **kwargs: Any) -> Any:
        inits.append(kwargs)
        return real_init(*args, **kwargs)

    sessions: list[str] = []
    real_run = sweep.run_simulation

    def recording_run(sim, data):  # type: ignore[no-untyped-def]
        sessions.append(ray.get_runtime_context().gcs_address)
        return real_run(sim, data)

    monkeypatch.setattr(ray, "init", counting_init)
    monkeypatch.setattr(sweep, "run_simulation", recording_run)
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "breastmnist", "--sites", "2", "--partition", "iid", "--epsilon", "8", "none",
            "--seeds", "0", "1", "--rounds", "1", "--local-epochs", "1", "--no-compare", "--out", str(out)]
    # Execute
    code = main(argv)
    # Assert: four runs in one Ray session, stopped at the end
    assert code == 0
    assert len(inits) == 1 and len(sessions) == 4 and len(set(sessions)) == 1, (inits, sessions)
    assert not ray.is_initialized() and _ray_processes(str(tmp_path)) == []
    table = json.loads((out / "sweep.json").read_text())
    assert [(c["partition"], c["epsilon"]) for c in table["cells"]] == [("iid", 8.0), ("iid", None)]
    for cell in table["cells"]:
        aucs = []
        for run in cell["runs"]:
            summary = json.loads((out / "runs" / run["run"] / "summary.json").read_text())
            assert summary["seed"] == run["seed"] and summary["dp"] == (cell["epsilon"] is not None)
            assert run["values"]["federated"]["auc"] == summary["federated"]["auc"]
            aucs.append(summary["federated"]["auc"])
        stat = cell["stats"]["federated"]["auc"]
        mean = sum(aucs) / 2
        half = 12.7062 * math.sqrt(sum((a - mean) ** 2 for a in aucs)) / math.sqrt(2)  # sd/√2 with n-1 = 1
        assert stat["mean"] == pytest.approx(mean) and stat["ci"] == pytest.approx([mean - half, mean + half],
                                                                                     abs=1e-4)
    for name in ("sweep.md", "sweep.png", SETTINGS_FILE):
        assert (out / name).is_file(), name
    assert "| iid | no DP | 2 |" in (out / "sweep.md").read_text()
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert len(finished) == 4
    # Execute: the same command again
    again = main(argv)
    # Assert: nothing redone, no Ray started, the same table
    assert again == 0
    assert len(inits) == 1 and len(sessions) == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")} == finished
    assert json.loads((out / "sweep.json").read_text())["cells"] == table["cells"]
