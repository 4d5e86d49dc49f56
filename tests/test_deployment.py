"""Deployment on loopback: a provisioned federation, a TLS SuperLink with node authentication, real SuperNodes.

Every process is started by these tests, bound to 127.0.0.1 and stopped by them.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from client.node import NodeError, SuperNode, check_coordinator_certificate
from client.node import load_kit as load_site_kit
from common import crypto, recipes
from common.checkpoint import initial_model, load_checkpoint
from common.config import RunConfig
from common.datasets import dataset_info, load, to_tensor_layout
from common.io import read_jsonl
from common.models import build_model
from common.training import predict_proba
from server.federation import SiteSpec, parse_federation
from server.provision import add_site, provision, revoke_site
from server.superlink import SuperLink, flower_env, sync
from server.superlink import load_kit as load_coordinator_kit
from simulations.archive import write_archives
from simulations.partition import PartitionSpec, scanner_profiles
from simulations.runner import make_sites, write_sites

ROOT = Path(__file__).resolve().parents[1]
SITES = ("h0", "h1", "h2")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Federation:
    """Kits, site data and a running SuperLink for one test module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        spec = parse_federation({
            "federation": {"name": "loopback"},
            "coordinator": {"hosts": ["127.0.0.1"], "port": self.port, "bind": "127.0.0.1"},
            "sites": [{"name": s, "epsilon": 8.0} for s in SITES],
        })
        self.kits = provision(spec, root / "kits").root
        data = load("breastmnist")
        parts = make_sites(data, len(SITES), PartitionSpec("iid"), seed=0)
        profiles = scanner_profiles(len(SITES), strength=0.0, seed=0)
        write_sites(data, parts, profiles, root / "sites", seed=0)
        self.data = {s: root / "sites" / f"site-{i:02d}.npz" for i, s in enumerate(SITES)}
        # The same records as each hospital's DICOM archive (a folder with labels.csv), as a PACS export holds them
        write_sites(data, parts, profiles, root / "dicom", seed=0)
        write_archives(root / "dicom", len(SITES), data.info, seed=0)
        self.dicom = {s: root / "dicom" / f"site-{i:02d}" for i, s in enumerate(SITES)}
        self.coordinator = load_coordinator_kit(self.kits / "coordinator")
        self.link = SuperLink(self.coordinator, log_file=root / "superlink.log")
        self.nodes: list[SuperNode] = []
        self.no_data = root / "coordinator-data"  # the coordinator's data folder: empty

    def start_link(self) -> None:
        """Start the SuperLink as a coordinator without patient data: its only data folder is empty."""
        self.no_data.mkdir(exist_ok=True)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MEDSILO_DATA", str(self.no_data))
            self.link.start()

    def node(self, site: str, kit: Path | None = None, data: Path | None = None) -> SuperNode:
        log = open(self.root / f"{site}.log", "a")  # noqa: SIM115 - closed with the module
        node = SuperNode(load_site_kit(kit or self.kits / site), data or self.data.get(site, self.data["h0"]),
                         runtime_port=_free_port(), echo=log)
        self.nodes.append(node)
        return node

    def run(self, config: str, *, timeout: float = 900, app: Path = ROOT) -> subprocess.Popen[str]:
        flwr = str(Path(sys.executable).parent / "flwr")
        return subprocess.Popen([flwr, "run", str(app), "loopback", "--stream", "-c", config],
                                env=flower_env(self.coordinator), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def launch(self, config: str, *, app: Path = ROOT) -> subprocess.Popen[str]:
        """``medsilo server run``: Flower's ``flwr run`` and ``flwr log``, then the run's status as the exit code."""
        return subprocess.Popen([sys.executable, "-m", "common.cli", "server", "run", "--kit",
                                 str(self.kits / "coordinator"), "--app", str(app), "-c", config],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.link.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    fed.start_link()
    assert sync(fed.coordinator)["registered"] == list(SITES)
    try:
        yield fed
    finally:
        fed.stop()


def _run_config(out: Path, rounds: int, **extra: object) -> str:
    values = {"dataset": "'breastmnist'", "rounds": rounds, "local-epochs": 2, "epsilon": 4.0, "min-sites": 3,
              "out-dir": f"'{out}'", "max-site-records": 1000, "round-timeout": 60.0, **extra}
    return " ".join(f"{k}={v}" for k, v in values.items())


def _finish(proc: subprocess.Popen[str], nodes: list[SuperNode], timeout: float = 900) -> str:
    """The output of ``flwr run``; its nodes are stopped (and a hung ``flwr run`` killed) even when it fails.

    Nodes left running would keep their sessions, and the next test's nodes (same keys) would be refused:
    one failure would fail every later test of the module.
    """
    try:
        output, _ = proc.communicate(timeout=timeout)
        return output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for n in nodes:
            n.stop()


# ------------------------------------------------------------------------------ links
def test_superlink_speaks_verified_tls13_only(federation: Federation) -> None:
    context = ssl.create_default_context(cafile=str(federation.coordinator.ca))
    with socket.create_connection(("127.0.0.1", federation.port), timeout=5) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.3"
    # A client that offers at most TLS 1.2 is refused.
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", federation.port), timeout=5) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1"):
        pass
    # Plain HTTP gets nothing.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{federation.port}/health", timeout=5)


def test_node_trusting_another_ca_cannot_connect(federation: Federation, tmp_path: Path) -> None:
    # Prepare: h0's kit, but with the CA of another federation.
    kit = tmp_path / "h0"
    shutil.copytree(federation.kits / "h0", kit)
    (kit / "ca.crt").write_bytes(crypto.create_ca(federation="other").certificate_pem)
    # Execute / Assert: medsilo's own check and Flower's SuperNode both refuse.
    with pytest.raises(NodeError, match=r"not signed by your kit's ca\.crt"):
        check_coordinator_certificate(load_site_kit(kit))
    with pytest.raises(NodeError, match="TLS verification of the coordinator failed"):
        federation.node("h0", kit).start(timeout=60)


def test_unregistered_and_revoked_nodes_are_refused(federation: Federation) -> None:
    # Prepare: a hospital added to the kits but not yet synced to the SuperLink.
    add_site(federation.kits, SiteSpec(name="late"))
    with pytest.raises(NodeError, match="refused this node's key"):
        federation.node("late").start(timeout=60)
    # A connected hospital whose key is then revoked is disconnected and cannot come back.
    extra = add_site(federation.kits, SiteSpec(name="leaver"))
    assert "leaver" in sync(federation.coordinator)["registered"]
    node = federation.node("leaver", extra).start(timeout=60)
    revoke_site(federation.kits, "leaver")
    assert sync(federation.coordinator)["unregistered"] == ["leaver"]
    with pytest.raises(NodeError, match=r"ended this node's session|refused this node's key"):
        node.wait()
    with pytest.raises(NodeError, match="refused this node's key"):
        federation.node("leaver", extra).start(timeout=60)


# ------------------------------------------------------------------------------ runs
def _test_auc(model: torch.nn.Module, dataset: str) -> float:
    """A model's AUC on the official test split, computed here: the coordinator has no test split."""
    data = load(dataset)
    with torch.no_grad():
        scores = predict_proba(model, to_tensor_layout(data.test.images, data.info), data.info.task)
    return float(roc_auc_score(data.test.labels.ravel(), scores))


def _checkpoint_model(path: Path, config: RunConfig) -> torch.nn.Module:
    state, _ = load_checkpoint(path)
    model = build_model(config.model, dataset_info(config.dataset))
    model.load_state_dict(state)
    return model


def test_a_coordinator_without_data_runs_dp_secagg_on_dicom_sites_and_selects_by_their_validation(
        federation: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: three hospitals join a coordinator whose only data folder is empty.
    from common.cli import main as cli

    # Each hospital's data is its DICOM folder: the node decodes it in worker processes inside its ClientApp.
    nodes = [federation.node(s, data=federation.dicom[s]).start(timeout=60) for s in SITES]
    assert all(n.node_id for n in nodes)
    out = federation.root / "run-e2e"
    assert cli(["status", "--kit", str(federation.kits / "coordinator")]) == 0
    coordinator_view = capsys.readouterr().out
    assert cli(["status", "--kit", str(federation.kits / "h0")]) == 0
    node_view = capsys.readouterr().out

    # Execute: two rounds of DP-SGD + SecAgg+, launched with `medsilo server run` (Flower's `flwr run`, then the
    # run's status); the sites validate both global models.
    proc = federation.launch(_run_config(out, rounds=2, **{"validation-releases": 2}))
    output = _finish(proc, nodes)
    report_code = cli(["report", str(out)])
    report_out = capsys.readouterr().out

    # Assert: the run completed without any data at the coordinator.
    assert proc.returncode == 0, output[-4000:]
    assert "Secure aggregation completed" in output and "finished:completed" in output
    assert federation.no_data.is_dir() and not any(federation.no_data.iterdir())
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(not r["test"] for r in rows)  # no central test set: nothing was scored at the coordinator
    assert rows[-1]["sites_answered"] == 3 and not rows[-1]["refused"]
    assert all(math.isfinite(rows[r]["val"]["auc"]) for r in (1, 2))
    assert {s["site"] for s in rows[2]["val_sites"]} == set(SITES)
    assert all(0 < p["epsilon"] <= 4.0 for p in rows[-1]["privacy"])
    fed = json.loads((out / "federated.json").read_text())
    assert {p["site"] for p in fed["privacy"]} == set(SITES)
    best = max((1, 2), key=lambda r: rows[r]["val"]["auc"])
    assert fed["best_round"] == best  # model selection by the sites' federated validation
    # The trained model is better than the one the run started from, measured here on the official test split.
    config = recipes.from_flower(json.loads((out / "run_config.json").read_text()))
    trained = _checkpoint_model(out / "model-final.safetensors", config)
    assert _test_auc(trained, config.dataset) > _test_auc(initial_model(config, dataset_info(config.dataset)),
                                                          config.dataset)
    # Both sides' status, seen while the nodes were connected.
    assert all(site in coordinator_view for site in SITES) and "connected" in coordinator_view
    assert "joined" in node_view
    # The deployment run's report, from the run folder alone.
    assert report_code == 0, report_out
    summary = json.loads((out / "summary.json").read_text())
    assert all((out / name).is_file() for name in ("report.md", "report.html"))
    assert summary["best_round"] == best
    # The coordinator signed its audit log with its kit's key; each hospital signed its own with its node key.
    assert cli(["audit", "verify", str(out / "audit.jsonl"), "--key",
                str(federation.kits / "coordinator" / "server.crt")]) == 0
    for site in SITES:
        assert cli(["audit", "verify", str(federation.kits / site / "state" / "audit.jsonl"), "--key",
                    str(federation.kits / site / "node.pub")]) == 0


def test_a_hospital_killed_mid_round_does_not_fail_the_round(federation: Federation) -> None:
    # Prepare
    nodes = {s: federation.node(s).start(timeout=60) for s in SITES}
    out = federation.root / "run-dropout"
    victim = nodes["h2"]

    def kill_when_training_starts() -> None:
        # SecAgg+ stages reach a node as train messages: setup, share keys, then the one that trains.
        deadline = time.time() + 600
        while time.time() < deadline:
            if sum("Receiving: train message" in line for line in list(victim.output)) >= 3:
                victim.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_training_starts, daemon=True)
    killer.start()
    # Execute
    # A sum of two must be acceptable to everyone: the coordinator's min-sites and each hospital's min-cohort both
    # count contributors, the sites whose masked updates make up the sum (the template's floor is 3).
    policies = [federation.kits / s / "site-policy.toml" for s in SITES]
    for path in policies:
        path.write_text(path.read_text().replace("min-cohort = 3", "min-cohort = 2"))
    try:
        proc = federation.run(_run_config(out, rounds=1, **{"round-timeout": 45.0, "min-sites": 2}))
        output = _finish(proc, list(nodes.values()))
    finally:
        for path in policies:
            path.write_text(path.read_text().replace("min-cohort = 2", "min-cohort = 3"))
    killer.join(5)
    # Assert: the round completed with the two survivors' masked sum.
    assert victim.process is not None and victim.process.returncode is not None
    assert proc.returncode == 0, output[-4000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["round"] == 1 and rows[-1]["sites_answered"] == 2, rows[-1]
    assert math.isfinite(rows[-1]["val"]["auc"])  # the sites validated the aggregated model
    # The site that got the training request and died is named, by its kit name, as one that may have trained
    # (and charged its ledger), not silently left out; the coordinator says it has no ε report from it.
    dropped = rows[-1]["dropped"]
    assert ("h2", "masked-vector") in [(d["site"], d["stage"]) for d in dropped], dropped
    assert "may have trained" in dropped[0]["note"]
    fed = json.loads((out / "federated.json").read_text())
    assert "h2" in {d["site"] for d in fed["never_reported"]} | {p["site"] for p in fed["privacy"] if p["stale"]}


def test_segmentation_federation_runs_patient_level_dp_under_secagg(federation: Federation) -> None:
    # Prepare: the three hospitals hold MRI series with their hippocampus masks as DICOM-SEG (a PACS export
    # per hospital, each with its own scanner and transfer syntax) instead of X-rays.
    data = load("msd-hippocampus")
    parts = make_sites(data, len(SITES), PartitionSpec("iid"), seed=0)
    write_sites(data, parts, scanner_profiles(len(SITES), strength=0.0, seed=0), federation.root / "seg", seed=0)
    write_archives(federation.root / "seg", len(SITES), data.info, seed=0)
    nodes = [federation.node(s, data=federation.root / "seg" / f"site-{i:02d}").start(timeout=60)
             for i, s in enumerate(SITES)]
    out = federation.root / "run-seg"
    # Execute: two rounds of patient-level DP-SGD, masked with SecAgg+, through `flwr run`.
    # Each message starts a ClientApp process that loads the site (the first one decodes ~1,400 DICOM files per
    # hospital, later ones read the node's cache) and trains a U-Net: three hospitals and the coordinator share two
    # cores here, so a SecAgg+ stage gets 180 s before a hospital counts as dropped (60 s failed once in CI).
    proc = federation.run(_run_config(out, rounds=2, dataset="'msd-hippocampus'", epsilon=8.0, **{
        "batch-size": 8, "dp-lr": 0.01, "round-timeout": 180.0, "validation-releases": 2}))
    output = _finish(proc, nodes)
    # Assert
    assert proc.returncode == 0, output[-4000:]
    assert output.count("Secure aggregation completed") == 2, output[-6000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["sites_answered"] == 3 and not r["refused"] for r in rows[1:])
    assert {s["site"] for s in rows[2]["val_sites"]} == set(SITES)
    assert all("dice_mean" in s for s in rows[2]["val_sites"])
    # The masked sums moved the model (no training loss is released; after two DP rounds from scratch the sites'
    # Dice can be 0 in both rounds, so the weights are compared, not the validation release).
    config = recipes.from_flower(json.loads((out / "run_config.json").read_text()))
    start = initial_model(config, dataset_info(config.dataset)).state_dict()
    final = _checkpoint_model(out / "model-final.safetensors", config).state_dict()
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], final[k])]
    assert len(moved) > len(start) // 2, moved
    privacy = rows[-1]["privacy"]
    assert {p["site"] for p in privacy} == set(SITES)
    assert all(p["privacy_unit"] == "patient" and 0 < p["epsilon"] <= 8.0 for p in privacy), privacy
    assert not list((federation.root / "seg").glob("*.npz"))  # the hospitals had their DICOM exports only
