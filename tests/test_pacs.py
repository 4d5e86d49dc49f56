"""The hospital journey on DICOM: a real Orthanc PACS over DICOMweb, and proof that no PHI leaves a node."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from pydicom.data import get_testdata_file

from client.app import app as client_app
from common.config import RunConfig
from common.datasets import load
from common.site_policy import template
from simulations.archive import write_archive
from simulations.loopback import LoopbackGrid

ROOT = Path(__file__).resolve().parents[1]


def _archive(folder: Path, site: int, n: int, offset: int = 0):
    data = load("breastmnist")
    sl = slice(offset, offset + n)
    return write_archive(folder, data.train.images[sl], data.train.labels[sl], data.info, site=site, seed=11)


def _orthanc_probe(tmp_path: Path, labels: Path | str, dataset: str) -> dict:
    """Run tests/orthanc_probe.py on ``tmp_path/site/dicom`` in a private network namespace; its JSON report."""
    out = tmp_path / "result.json"
    cmd = (f"ip link set lo up && exec {sys.executable} tests/orthanc_probe.py {tmp_path / 'site' / 'dicom'} "
           f"{labels} {tmp_path / 'work'} {dataset} {out}")
    proc = subprocess.run(["unshare", "--net", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Debian package orthanc missing; .ci/run installs it")
def test_orthanc_dicomweb_source_ingests_like_a_folder(tmp_path: Path) -> None:
    # Prepare: an archive (JPEG 2000 site) plus a Structured Report, uploaded to a real Orthanc
    _archive(tmp_path / "site", site=1, n=16)
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "site" / "dicom" / "sr.dcm")
    # Execute: Orthanc and the client run in a private network namespace: only its loopback exists
    report = _orthanc_probe(tmp_path, tmp_path / "site" / "labels.csv", "breastmnist")
    # Assert: all 17 stored; 16 images ingested in their original syntax, the SR rejected; cached the second time
    assert report["uploaded"] == 17 and report["ready"]
    assert report["summary"]["ingested_files"] == 16 and len(report["rejected"]) == 1
    assert "Comprehensive SR Storage" in report["rejected"][0]["reason"]
    assert list(report["summary"]["transfer_syntaxes"]) == ["JPEG 2000 Image Compression (Lossless Only)"]
    assert report["labels"] == {"malignant": sum(1 for e in report["ingested"] if e["label"] == "0"),
                                "normal, benign": sum(1 for e in report["ingested"] if e["label"] == "1")}
    assert report["decoded_second_time"] == 0


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Debian package orthanc missing; .ci/run installs it")
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "msd" / "Task04_Hippocampus").is_dir(),
                    reason="MSD Task04_Hippocampus not in ../shared/data/msd")
def test_orthanc_dicomweb_serves_segmentation_series_with_their_dicom_seg(tmp_path: Path) -> None:
    # Prepare: three patients' MR series with their DICOM-SEG masks, uploaded to a real Orthanc
    data = load("msd-hippocampus")
    masks = data.train.labels[:3]
    write_archive(tmp_path / "site", data.train.images[:3], masks, data.info, site=2, seed=11)
    # Execute: the node's segmentation source reads the PACS over QIDO-RS / WADO-RS, in a private namespace
    report = _orthanc_probe(tmp_path, "-", "msd-hippocampus")
    # Assert: 3 x (32 slices + 1 SEG) stored; three cases with exactly the masks' voxels; fetched only once
    assert report["uploaded"] == 99 and report["cases"] == 3 and report["ready"]
    assert report["voxels"] == int((masks > 0).sum())
    assert report["fetched_second_time"] == 0


def _blob(message) -> tuple[bytes, list]:
    """Everything a message carries: array bytes, config and metric values."""
    parts, values = [], []
    content = message.content if message.has_content() else None
    if content is None:
        return repr(message.error).encode(), []
    for record in content.array_records.values():
        parts.extend(arr.data for _, arr in record.items())
    for record in list(content.config_records.values()) + list(content.metric_records.values()):
        parts.append(repr(dict(record)).encode())
        values.extend(record.values())
    return b"".join(parts), values


@pytest.mark.slow
def test_no_phi_uid_path_or_per_image_value_leaves_a_node(tmp_path: Path, caplog, capfd) -> None:
    # Prepare: two hospitals' DICOM archives full of synthetic PHI; nodes configured as deployed nodes are
    from server.app import main

    caplog.set_level(logging.DEBUG)
    sites = [_archive(tmp_path / f"hospital-{i}", site=i, n=40 + 20 * i, offset=100 * i) for i in range(2)]
    policy = tmp_path / "site-policy.toml"  # two hospitals: each accepts a secure sum of two
    policy.write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5).replace("min-cohort = 3",
                                                                                               "min-cohort = 2"))
    nodes = {10 + i: {"site-name": f"hospital-{i}", "data-path": str(tmp_path / f"hospital-{i}"),
                      "state-dir": str(tmp_path / f"state-{i}"), "policy-path": str(policy)} for i in range(2)}
    cfg = RunConfig(dataset="breastmnist", batch_size=16, rounds=1, local_epochs=1, server_eval=True,
                    out_dir=str(tmp_path / "run"), min_sites=2, epsilon=8.0, accountant="rdp", max_site_records=100)
    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    # Execute: one DP + SecAgg+ round and the final evaluation
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: the secrets: PHI values, every UID of the manifests, file paths
    secrets = {v for s in sites for v in s.phi}
    for s in sites:
        lines = (s.folder / "labels.csv").read_text().splitlines()[1:]
        secrets |= {line.split(",")[0] for line in lines}
        secrets |= {str(p) for p in s.folder.rglob("*.dcm")} | {str(s.folder)}
    assert len(secrets) > 200
    replies = [m for m in grid.received if m.metadata.dst_node_id == 1]
    assert len(replies) >= 2 * 5 and all(m.has_content() for m in replies)
    shared = b"".join(_blob(m)[0] for m in replies)
    logs = "\n".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
    artifacts = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    for secret in secrets:
        token = secret.encode()
        assert token not in shared, "a node message carries an identifier"
        assert secret not in logs, "a log line carries an identifier"
        assert token not in artifacts, "a coordinator artifact carries an identifier"
    # ... and metrics are aggregates: no value sent up is a per-record list
    for m in replies:
        for value in _blob(m)[1]:
            assert not isinstance(value, list) or len(value) < 20
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test"]["auc"] > 0.0 and np.isfinite(rows[-1]["test"]["auc"])
    assert not any((tmp_path / "run").rglob("*.dcm"))
