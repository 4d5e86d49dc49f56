from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_defaults_equal_run_config_defaults() -> None:
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr == RunConfig().to_flower()


def test_round_trip_through_flower_run_config() -> None:
    cfg = RunConfig(dataset="breastmnist", rounds=3, dp=False, epsilon=2.0)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"dataset": "nomnist", "epsilon": -1.0, "delta": 1.5, "model": "vgg",
                               "strategy": "fedsgd", "rounds": 0})
    text = str(info.value)
    assert len(info.value.problems) == 6
    for needle in ("dataset='nomnist'", "epsilon=-1.0", "delta=1.5", "model='vgg'", "strategy='fedsgd'",
                   "rounds=0"):
        assert needle in text


def test_unknown_and_mistyped_keys_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"epsilonn": 3.0, "rounds": "many"})
    assert len(info.value.problems) == 2
    assert "unknown setting 'epsilonn'" in str(info.value)


def test_dp_off_skips_budget_checks() -> None:
    assert RunConfig(dp=False, epsilon=0.0).problems() == []
