"""Bad input for ``medsilo sweep``: one clear error listing every problem, before Ray starts or anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations import sweep
from simulations.sweep import MAX_SEED, SweepSettings, parse_grid, plan, run_sweep


def _settings(out: Path, **kw: object) -> SweepSettings:
    values: dict = dict(dataset="breastmnist", sites=2, partitions=["iid"], epsilons=["8", "none"], seeds=["0"],
                        out=out, options={"rounds": 1, "local_epochs": 1}, compare=False)
    values.update(kw)
    return SweepSettings(**values)


def test_grid_and_run_settings_are_reported_together(tmp_path) -> None:
    # Prepare: bad values in every part of the grid, and two bad shared settings
    settings = _settings(tmp_path / "out", epsilons=["eight", "8"], seeds=["0", "1.5"], partitions=["zipf"],
                         options={"rounds": 0, "local_epochs": 1, "model": "nosuch"})
    # Execute
    with pytest.raises(ConfigError) as caught:
        plan(settings)
    # Assert: one error naming each value
    problems = caught.value.problems
    for needle in ("--epsilon 'eight'", "--seeds '1.5'", "--partition 'zipf'", "rounds=0", "model='nosuch'"):
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    assert len(problems) == 5


def test_seeds_are_kept_to_32_bits() -> None:
    # Execute
    grid = parse_grid(dataset="breastmnist", epsilons=["8"], seeds=["0", str(MAX_SEED)], partitions=["iid"])
    with pytest.raises(ConfigError) as caught:
        parse_grid(dataset="breastmnist", epsilons=["8"], seeds=[str(MAX_SEED + 1)], partitions=["iid"])
    # Assert
    assert grid.seeds == (0, 2**32 - 1)
    assert caught.value.problems == [f"--seeds '{MAX_SEED + 1}': a seed must be in 0..{MAX_SEED}; "
                                     "use seeds such as 0 1 2"]


def test_an_epsilon_no_site_could_plan_is_refused_up_front(tmp_path) -> None:
    from client.dp import release
    from client.dp.accounting import plan_run
    from common.config import RunConfig

    # Prepare: ε=0.05 per site, whose record-count and validation releases alone spend more than that
    settings = _settings(tmp_path / "out", epsilons=["0.05", "8", "none"])
    # Execute
    with pytest.raises(ConfigError) as caught:
        plan(settings)
    # Assert: only that cell, named; and a site's own planning (independent of the sweep's check) refuses it too
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("--epsilon 0.05: too small for a run")
    config = RunConfig(**sweep.config_values(settings, 0.05, 0))
    with pytest.raises(ValueError):
        plan_run(epsilon=0.05, delta=config.delta, accountant=config.accountant, batch_size=config.batch_size,
                 rounds=config.rounds, local_epochs=config.local_epochs, records_estimate=273,
                 count_noise=release.count_noise_for(epsilon=0.05),
                 validation_noise=config.validation_noise or release.default_validation_noise(epsilon=0.05),
                 validation_releases=config.validation_releases)


def test_a_bad_grid_never_starts_ray_or_writes_the_folder(tmp_path, monkeypatch) -> None:
    # Prepare: Ray's start recorded instead of done
    started: list[object] = []
    monkeypatch.setattr(sweep, "shared_ray", lambda *a, **k: started.append(a))
    out = tmp_path / "out"
    # Execute
    with pytest.raises(ConfigError) as caught:
        run_sweep(_settings(out, epsilons=["-4", "none"], seeds=["x"]))
    # Assert
    assert len(caught.value.problems) == 2
    assert started == [] and not out.exists()


def test_simulate_refuses_an_epsilon_its_fixed_releases_alone_spend_before_anything_runs(tmp_path: Path) -> None:
    # Prepare: ε=0.05, which a site's record-count and validation releases alone exceed
    from simulations.experiment import build_simulation, research_config_values

    out = tmp_path / "run"
    # Execute
    with pytest.raises(ConfigError) as info:
        build_simulation(sites=2, partition="iid", scanner_shift=0.0, out=str(out), compare=False, overwrite=False,
                         config_values=research_config_values("breastmnist", dp=True, epsilon=0.05, model="auto",
                                                              settings={"dataset": "breastmnist", "seed": 0}))
    # Assert: one error naming the value and the fix, and no run folder
    assert "--epsilon 0.05: too small for a run" in str(info.value) and "use ε above" in str(info.value)
    assert not out.exists()
