"""``medsilo status``: the coordinator's sites, connections, runs and certificate; a hospital node's state and ε.

The SuperLink and SuperNode of the last test are real processes, bound to 127.0.0.1 and stopped by the test.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deployment import _free_port

from client.dp import accounting as privacy
from client.dp.ledger import Ledger, data_source
from client.node import NodeError, SuperNode
from client.node import load_kit as load_site_kit
from client.status import STATUS_FILE, node_status, read_state
from common import crypto
from server.federation import parse_federation
from server.provision import provision, revoke_site
from server.status import coordinator_status
from server.superlink import SuperLink, sync
from server.superlink import load_kit as load_coordinator_kit

SITES = ("alpha", "beta")


def _kits(root: Path, *, cert_days: int = 365) -> Path:
    spec = parse_federation({
        "federation": {"name": "status"},
        "coordinator": {"hosts": ["127.0.0.1"], "port": _free_port(), "bind": "127.0.0.1", "cert_days": cert_days},
        "sites": [{"name": s, "epsilon": 3.0} for s in SITES],
    })
    return provision(spec, root / "kits").root


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    return _kits(tmp_path)


@pytest.fixture
def idle_node_process() -> Iterator[subprocess.Popen[str]]:
    """A live process whose command line names ``client.supernode``, as a running node's does."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "client.supernode"],
                               stdin=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------ coordinator
def test_a_stopped_superlink_is_reported_with_the_sites_and_the_certificate_expiry(kits: Path) -> None:
    # Prepare: one site revoked; nothing listens on the kit's port
    revoke_site(kits, "beta")
    coordinator = kits / "coordinator"

    # Execute
    status = coordinator_status(coordinator)

    # Assert
    lines = status.lines()
    assert not status.running and any(line.startswith("superlink: not running") for line in lines)
    assert [(s.name, s.key, s.state) for s in status.sites] == [("alpha", "authorised", "not registered"),
                                                                ("beta", "revoked", "not registered")]
    alpha_key = (coordinator / "nodes" / "alpha.pub").read_bytes()
    assert status.sites[0].fingerprint == crypto.public_key_fingerprint(alpha_key)
    assert status.certificate_not_after == crypto.certificate_not_after(coordinator / "server.crt")
    assert any(line.startswith("certificate: valid until") for line in lines)
    assert status.runs is None and "not running" in str(status.runs_error)
    assert not any("certificate expires" in w for w in status.warnings)
    as_json = json.loads(status.to_json())
    assert as_json["role"] == "coordinator" and as_json["running"] is False
    assert [s["name"] for s in as_json["sites"]] == ["alpha", "beta"] and as_json["certificate_not_after"]


def test_a_certificate_that_expires_within_30_days_is_a_warning(tmp_path: Path) -> None:
    # Prepare
    kits = _kits(tmp_path, cert_days=10)

    # Execute
    status = coordinator_status(kits / "coordinator")

    # Assert
    assert status.certificate_days_left is not None and status.certificate_days_left < 30
    assert any("certificate expires in" in line and line.startswith("WARNING") for line in status.lines())


def test_a_site_kit_is_not_read_as_a_coordinator(kits: Path) -> None:
    # Prepare / Execute / Assert: the role is the kit's, and the message says which folder to use
    with pytest.raises(Exception, match="not the coordinator's"):
        coordinator_status(kits / "alpha")


# ------------------------------------------------------------------------------ hospital node
def test_node_status_totals_match_an_independent_sum_of_each_sources_ledger(kits: Path, tmp_path: Path) -> None:
    # Prepare: two data sources in the node's state folder, charged through the real ledger
    kit = load_site_kit(kits / "alpha")
    charges = {"a.npz": [(1.0, 0.05, 100), (1.2, 0.05, 100)], "b.npz": [(1.5, 0.02, 50)]}
    for name, entries in charges.items():
        ledger = Ledger(kit.state, data_source({"data-path": str(tmp_path / name)}, {}))
        for run, entry in enumerate(entries, start=1):
            assert ledger.charge(run=run, server_round=1, mechanism="dp-sgd", entry=entry, epsilon=100.0,
                                 delta=kit.policy.delta, lifetime_epsilon=None, lifetime_delta=kit.policy.delta,
                                 accountant="rdp").granted

    # Execute
    status = node_status(kits / "alpha", accountant="rdp", probe=False)

    # Assert: per source, ε equals the accountant over that file's reservations, read here line by line
    expected = {}
    for path in kit.state.glob("ledger-src-*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        history = [(r["sigma"], r["q"], r["steps"]) for r in rows if r["kind"] == "reserve"]
        expected[rows[0]["label"]] = privacy.epsilon_spent(history=history, delta=kit.policy.delta, accountant="rdp")
    found = {s.label: s for s in status.sources}
    assert set(found) == {str((tmp_path / name).resolve()) for name in charges}
    for label, eps in expected.items():
        assert found[label].epsilon_spent == pytest.approx(eps)
        assert found[label].epsilon_remaining == pytest.approx(max(0.0, kit.policy.epsilon_lifetime - eps))
        assert found[label].releases == {"dp-sgd": len(charges[Path(label).name])}
        assert any(line.startswith(f"source {found[label].source} {label}: ε spent {eps:.3f} of "
                                   f"{kit.policy.epsilon_lifetime:g}") for line in status.lines())
    assert status.node.state == "never started" and not status.node.joined
    assert json.loads(status.to_json())["policy"]["epsilon_lifetime"] == kit.policy.epsilon_lifetime


def test_the_node_records_connected_then_stopped_in_an_owner_only_status_file(
        kits: Path, tmp_path: Path, idle_node_process: subprocess.Popen[str]) -> None:
    # Prepare: a SuperNode whose process is a stand-in; its output reader sees Flower's ready line
    kit = load_site_kit(kits / "alpha")
    node = SuperNode(kit, tmp_path / "site.npz")
    node.process = idle_node_process  # type: ignore[assignment]

    # Execute
    node._read("INFO :      SuperNode ID: 4242\n")
    joined = node_status(kits / "alpha", probe=False)
    node.stop(timeout=5)
    stopped = node_status(kits / "alpha", probe=False)

    # Assert
    path = kit.state / STATUS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(kit.state.stat().st_mode) == 0o700
    assert joined.node.joined and joined.node.node_id == 4242 and joined.node.pid == idle_node_process.pid
    assert joined.node.superlink == kit.superlink and joined.runs_installed_code is True
    assert any(line.startswith(f"node: joined {kit.superlink} as node 4242") for line in joined.lines())
    assert stopped.node.state == "stopped" and not stopped.node.joined
    assert any(line.startswith("node: not joined: stopped since") for line in stopped.lines())


def test_a_node_that_exits_on_its_own_records_why(kits: Path, tmp_path: Path) -> None:
    # Prepare: a node process that ends with Flower's TLS failure
    kit = load_site_kit(kits / "alpha")
    node = SuperNode(kit, tmp_path / "site.npz")
    node.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"], text=True)  # type: ignore[assignment]
    node.output.append("CERTIFICATE_VERIFY_FAILED\n")

    # Execute
    with pytest.raises(NodeError, match="same federation") as err:
        node.wait()

    # Assert
    state = read_state(kit.state)
    assert state.state == "exited" and state.detail == str(err.value)


def test_a_node_recorded_connected_whose_process_is_gone_is_not_joined(
        kits: Path, tmp_path: Path, idle_node_process: subprocess.Popen[str]) -> None:
    # Prepare: the node recorded itself connected, then its process died without a word (SIGKILL)
    kit = load_site_kit(kits / "alpha")
    node = SuperNode(kit, tmp_path / "site.npz")
    node.process = idle_node_process  # type: ignore[assignment]
    node._read("SuperNode ID: 7\n")
    idle_node_process.kill()
    idle_node_process.wait()

    # Execute
    status = node_status(kits / "alpha", probe=False)

    # Assert
    assert status.node.state == "gone" and not status.node.joined and status.runs_installed_code is None
    assert any("is gone" in line for line in status.lines())


# ------------------------------------------------------------------------------ a real SuperLink
@pytest.mark.slow
def test_a_running_superlink_shows_a_connected_site_with_its_last_heartbeat(kits: Path, tmp_path: Path) -> None:
    # Prepare: the kit's SuperLink (TLS, node authentication) and alpha's SuperNode, both real
    coordinator = load_coordinator_kit(kits / "coordinator")
    link = SuperLink(coordinator, log_file=tmp_path / "superlink.log")
    log = (tmp_path / "alpha.log").open("a")
    node = SuperNode(load_site_kit(kits / "alpha"), tmp_path / "site.npz", runtime_port=_free_port(), echo=log)
    try:
        link.start()
        assert sync(coordinator)["registered"] == list(SITES)
        node.start()

        # Execute
        status = coordinator_status(kits / "coordinator")
        site = node_status(kits / "alpha")
    finally:
        node.stop()
        link.stop()
        log.close()
    after = coordinator_status(kits / "coordinator")

    # Assert
    assert status.running and any(line.startswith("superlink: running") for line in status.lines())
    alpha, beta = status.sites
    assert alpha.connected and alpha.node_id == node.node_id and alpha.last_seen is not None
    assert alpha.connected_since is not None and alpha.last_seen >= alpha.connected_since
    assert alpha.last_seen <= status.checked_at
    assert any(line.startswith(f"site alpha: connected, last seen {alpha.last_seen:%Y-%m-%d}")
               for line in status.lines())
    assert beta.state == "never connected" and beta.node_id is not None and not beta.connected
    assert status.runs == () and status.runs_error is None
    assert site.node.joined and site.node.node_id == node.node_id and site.coordinator is None
    # Once stopped, the SuperLink's database still tells when alpha was last seen; reading it left nothing readable
    assert not after.running and after.sites[0].state == "offline" and after.sites[0].last_seen is not None
    assert after.sites[0].last_seen >= alpha.connected_since and after.sites[1].state == "never connected"
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in coordinator.database.parent.glob("superlink.db*"))


def test_medsilo_status_picks_the_role_from_the_kit_and_refuses_a_folder_that_is_no_kit(
        kits: Path, tmp_path: Path) -> None:
    # Prepare
    def medsilo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "common.cli", "status", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    # Execute
    coordinator = medsilo("--kit", str(kits / "coordinator"), "--json")
    site = medsilo("--kit", str(kits / "alpha"), "--json")
    neither = medsilo("--kit", str(tmp_path))

    # Assert
    assert coordinator.returncode == 0, coordinator.stderr
    assert {s["name"] for s in json.loads(coordinator.stdout)["sites"]} == set(SITES)
    assert site.returncode == 0, site.stderr
    assert json.loads(site.stdout)["site"] == "alpha"
    assert neither.returncode == 2 and "kit.toml not found" in neither.stderr and "Traceback" not in neither.stderr
