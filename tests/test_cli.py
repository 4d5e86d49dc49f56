from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _medsilo(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_bad_input_lists_every_problem_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "run"
    result = _medsilo("simulate", "--dataset", "pneumoniamnist", "--partition", "dirichlet:0", "--epsilon", "0",
                      "--delta", "1", "--model", "vgg", "--strategy", "fedsgd", "--out", str(out))
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err
    for needle in ("dirichlet:0", "epsilon=0.0", "delta=1.0", "model='vgg'", "strategy='fedsgd'"):
        assert needle in err, needle
    assert "5 problem(s)" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_dataset_and_too_many_sites(tmp_path) -> None:
    result = _medsilo("simulate", "--dataset", "nomnist", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and "dataset='nomnist' is unknown" in result.stderr
    result = _medsilo("simulate", "--dataset", "breastmnist", "--sites", "100", "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and "use at most 54 sites" in result.stderr
    assert not list(tmp_path.iterdir())


def test_missing_dataset_file_says_where_to_put_it(tmp_path) -> None:
    result = _medsilo("simulate", "--dataset", "dermamnist", "--no-download", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "dermamnist.npz not found" in result.stderr and "MEDSILO_DATA" in result.stderr


def test_help_documents_the_flags() -> None:
    result = _medsilo("simulate", "--help")
    for flag in ("--partition", "--scanner-shift", "--epsilon", "--delta", "--no-dp", "--compare", "--strategy"):
        assert flag in result.stdout


def test_version_names_medsilo_and_the_libraries_a_change_record_needs() -> None:
    # Execute
    result = _medsilo("--version")
    # Assert: the installed versions, independently read from the packages' metadata
    from importlib.metadata import version

    assert result.returncode == 0
    assert result.stdout.strip() == (f"medsilo {version('medsilo')} (flwr {version('flwr')}, torch {version('torch')}, "
                                     f"opacus {version('opacus')})")


def test_every_roles_commands_reach_the_medsilo_command_through_its_entry_points() -> None:
    # Prepare: the commands each role's module registers, read from the modules themselves
    import argparse

    from client import cli as client_cli
    from server import cli as server_cli
    from simulations import cli as simulations_cli
    from simulations import pretrain as pretrain_cli

    expected = set()
    for module in (client_cli, server_cli, simulations_cli, pretrain_cli):
        parser = argparse.ArgumentParser()
        module.register(parser.add_subparsers())
        expected |= set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]

    # Execute: the installed console script's frame, which imports neither side by name
    result = _medsilo("--help")

    # Assert
    assert result.returncode == 0
    listed = result.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert expected | {"audit", "datasets", "status"} == set(listed)
    assert {"provision", "server", "client", "site", "simulate"} <= expected
