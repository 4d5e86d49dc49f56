"""``medsilo server run``: how a launched run's ending becomes an exit status (the run itself: test_deployment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from server.launch import COMPLETED, RunOutcome, out_dir_of, submit


def test_the_out_dir_is_read_from_the_run_config_overrides_as_flower_parses_them() -> None:
    # Prepare: Flower's -c syntax, space-separated TOML assignments, quoted strings with spaces
    overrides = ["dataset='breastmnist' rounds=3", "out-dir='/var/lib/medsilo/runs/run one' min-sites=2"]
    # Execute / Assert
    assert out_dir_of(overrides) == Path("/var/lib/medsilo/runs/run one")
    assert out_dir_of(["dataset='breastmnist'"]) is None


@pytest.mark.parametrize(("status", "reasons", "ok"), [
    (COMPLETED, (), True),
    (COMPLETED, ("refused: site policy: dp=false",), False),  # Flower completed it, yet nothing was aggregated
    ("finished:failed", (), False),
    ("finished:stopped", (), False),
])
def test_only_a_completed_run_with_an_aggregated_round_is_a_success(status: str, reasons: tuple[str, ...],
                                                                       ok: bool) -> None:
    # Prepare
    outcome = RunOutcome(run_id=7, status=status, details="", out_dir=Path("/runs/r1"), why_not_aggregated=reasons)
    # Execute
    lines = outcome.lines()
    # Assert
    assert outcome.ok is ok
    assert lines[0].startswith(f"run 7: {status}") and "/runs/r1" in lines[0]
    assert all(any(reason in line for line in lines) for reason in reasons)


def test_an_app_folder_without_pyproject_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    # Execute / Assert: no SuperLink is contacted (the kit is never used)
    with pytest.raises(ConfigError, match=r"no pyproject\.toml"):
        submit(None, tmp_path, [])  # type: ignore[arg-type]
