"""End to end: the real ServerApp and ClientApp on Flower's Ray simulation engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_file_modes import shared_paths

ROOT = Path(__file__).resolve().parents[1]


#: Set in the environment of the simulations these tests start: Ray's processes inherit it, so a test finds the
#: Ray processes of its own runs and not those of anything else running on the machine.
TAG = "MEDSILO_TEST_RUN"


def _tagged_env(tag: str) -> dict[str, str]:
    return {**os.environ, TAG: tag}


def _ray_processes(tag: str) -> list[str]:
    """Live Ray services (raylet, gcs_server) whose environment carries ``TAG=tag``."""
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if "pgrep" in line or "<defunct>" in line:  # a zombie (e.g. of a killed simulation) no longer runs
            continue
        try:
            environ = Path(f"/proc/{line.split()[0]}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if f"{TAG}={tag}".encode() in environ:
            found.append(line)
    return found


@pytest.mark.slow
def test_three_site_dp_federation_on_breastmnist(tmp_path) -> None:
    # Prepare
    out = tmp_path / "run"
    # Execute: the CLI in its own process, as a researcher runs it.
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--dataset", "breastmnist", "--sites", "3",
         "--rounds", "2", "--local-epochs", "2", "--epsilon", "4", "--delta", "1e-5", "--compare", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=_tagged_env(str(tmp_path)),
    )
    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "breastmnist" and summary["sites"] == 3 and summary["rounds"] == 2
    # which official file was read: its MD5 computed here, and the release the catalog lists for that MD5
    from common.datasets import dataset_info, locate, md5sum
    read = md5sum(locate(dataset_info("breastmnist"), download=False))
    assert summary["dataset_md5"] == read and summary["dataset_release"] in ("v2", "v3", "v2/v3")
    privacy = summary["privacy"]
    assert len(privacy) == 3
    for site in privacy:
        assert 0 < site["epsilon"] <= 4.0 and site["delta"] == 1e-5 and site["accountant"] == "prv"
    fed = summary["federated"]
    assert fed["auc"] > 0.6, fed  # above chance on the official test split
    lo, hi = fed["auc_ci"]
    assert lo <= fed["auc"] <= hi
    for key in ("auc", "balanced_accuracy", "auc_ci", "sensitivity", "specificity"):
        assert key in summary["pooled"]
        assert all(key in site for site in summary["local"])
    assert len(summary["local"]) == 3
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    answered = [(r["round"], r["sites_answered"], r["failures"], r["refused"], r["dropped"]) for r in rounds[1:]]
    assert all(a[1] == 3 for a in answered), (answered, result.stderr[-3000:])
    for name in ("report.md", "plots/auc.png", "plots/epsilon.png", "model-best.safetensors",
                 "model-final.safetensors", "sites.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / ".run.partial").exists()
    # The finished run holds the sites' state folders but none of their feature caches (derived patient data).
    assert (out / "sites" / "site-00-state").is_dir() and not list(out.rglob("feature-cache"))
    # The simulation stopped the Ray cluster it started.
    assert _ray_processes(str(tmp_path)) == []


@pytest.mark.slow
def test_hospital_journey_from_dicom_archives(tmp_path) -> None:
    # Prepare: hospitals holding DICOM archives (per-site equipment, synthetic PHI), as `simulate --dicom` makes them
    out = tmp_path / "run"
    # Execute: archive -> each node ingests its archive -> federation; then the hospital's pre-flight on one archive
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--dataset", "breastmnist", "--sites", "2",
         "--rounds", "2", "--epsilon", "8", "--dicom", "--augment", "--no-compare", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, umask=0o022,  # the usual umask of a researcher
        env=_tagged_env(str(tmp_path)),
    )
    # The sites' archives, their state (ledgers, audit logs, caches) and the run's outputs are owner-only
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "sites").glob("site-*-state/audit.jsonl")) and list((out / "sites").glob("site-00/dicom"))
    assert shared_paths(out) == []
    check = subprocess.run(
        [sys.executable, "-m", "common.cli", "site", "check", "--data", str(out / "sites" / "site-01"),
         "--labels", str(out / "sites" / "site-01" / "labels.csv"), "--dataset", "breastmnist",
         "--state-dir", str(out / "sites" / "site-01-state"), "--json", str(tmp_path / "check.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    # Assert: the federation trained on what the nodes ingested; the check reuses the node's cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["federated"]["auc"] > 0.6
    assert all(0 < p["epsilon"] <= 8.0 for p in summary["privacy"])
    assert not list((out / "sites").glob("site-*.npz"))  # the nodes had DICOM only
    assert check.returncode == 0, check.stdout[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ready"] and report["rejected"] == [] and len(report["ingested"]) > 10
    assert "site-1: DICOM archive of" in result.stderr + result.stdout
    assert _ray_processes(str(tmp_path)) == []


@pytest.mark.slow
def test_a_run_that_fails_stops_ray_and_restores_the_environment(tmp_path, monkeypatch) -> None:
    # Prepare: a run that fails after Ray has started and before Flower's backend exists to stop it.
    import importlib

    import ray

    from common.config import RunConfig
    from common.flower_env import FLOWER_ENV
    from simulations.runner import run_federation

    def fail(**_: object) -> None:
        assert ray.is_initialized()
        raise RuntimeError("the ServerApp failed")

    # The module, not the function of the same name that flwr.simulation exports.
    monkeypatch.setattr(importlib.import_module("flwr.simulation.run_simulation"), "_run_simulation", fail)
    monkeypatch.setenv("PYTHONPATH", "/inherited")
    monkeypatch.setenv(TAG, str(tmp_path))  # Ray's services inherit this process's environment
    for key in [*FLOWER_ENV, "FLWR_HOME", "RAY_COLOR_PREFIX"]:  # run_federation sets them; restored after the test
        monkeypatch.delenv(key, raising=False)
    config = RunConfig(dataset="breastmnist", out_dir=str(tmp_path / "out"), site_data_dir=str(tmp_path / "sites"))
    # Execute
    with pytest.raises(RuntimeError, match="the ServerApp failed"):
        run_federation(config, num_sites=2, work_dir=tmp_path, cpus=1)
    # Assert
    assert not ray.is_initialized()
    assert _ray_processes(str(tmp_path)) == []
    assert os.environ["PYTHONPATH"] == "/inherited"
