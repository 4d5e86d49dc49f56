"""systemd units in the kits: the coordinator's medsilo-superlink.service and each hospital's medsilo-node.service.

The units are read back as systemd reads them (sections of ``Key=value`` lines), their ``ExecStart=`` is parsed by
medsilo's own command line, and ``systemd-analyze verify`` (Debian package ``systemd``; skipped without it) must
accept each one without a warning.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from common.cli import build_parser
from server import services
from server.federation import load_federation, parse_federation
from server.provision import add_site, provision

FEDERATION = """
[federation]
name = "test-fed"

[coordinator]
hosts = ["flower.example.org", "10.20.0.5"]
port = 19443

[[sites]]
name = "alpha"

[[sites]]
name = "beta"
"""


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    spec_file = tmp_path / "federation.toml"
    spec_file.write_text(FEDERATION)
    return provision(load_federation(spec_file), tmp_path / "kits").root


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, as systemd reads a unit file (comments and blank lines ignored)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


HARDENING = {
    "User": "medsilo", "Group": "medsilo", "ProtectSystem": "strict", "ProtectHome": "yes",
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "UMask": "0077", "KillMode": "control-group",
    "KillSignal": "SIGTERM", "Restart": "on-failure", "StateDirectoryMode": "0700",
}


def _check_service(unit: dict[str, dict[str, list[str]]], kit_dir: str, writable: set[str]) -> list[str]:
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert service[key] == [value], key
    assert int(service["TimeoutStopSec"][0]) >= 30
    assert service["ReadOnlyPaths"] == [kit_dir]
    assert set(service["StateDirectory"][0].split()) == writable
    assert service["WorkingDirectory"] == [f"{kit_dir}/state"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]
    words = shlex.split(service["ExecStart"][0])
    assert Path(words[0]).is_absolute() and words[0] == str(services.medsilo_executable())
    return words


def test_every_kit_carries_its_hardened_systemd_unit(kits: Path) -> None:
    # Prepare: a hospital added later gets the same unit
    add_site(kits, parse_federation({"federation": {"name": "x"}, "coordinator": {"hosts": ["a.b"]},
                                     "sites": [{"name": "gamma"}]}).sites[0])
    parser = build_parser()
    # Execute
    coordinator = _unit(kits / "coordinator" / services.SUPERLINK_UNIT)
    nodes = {site: _unit(kits / site / services.NODE_UNIT) for site in ("alpha", "beta", "gamma")}
    # Assert: the coordinator runs `medsilo server start` on its installed kit, writing only its state folders
    words = _check_service(coordinator, "/var/lib/medsilo/coordinator", {
        "medsilo/coordinator/state", "medsilo/coordinator/flwr", "medsilo/coordinator/medsilo-runs", "medsilo/runs"})
    args = parser.parse_args(words[1:])
    assert (args.command, args.server_command, args.kit) == ("server", "start", "/var/lib/medsilo/coordinator")
    assert not args.insecure
    # Assert: each hospital runs `medsilo client start` with its kit, a --data to fill in and the runtime port
    for site, unit in nodes.items():
        kit_dir = f"/var/lib/medsilo/{site}"
        words = _check_service(unit, kit_dir, {f"medsilo/{site}/state", f"medsilo/{site}/flwr"})
        args = parser.parse_args(words[1:])
        assert (args.command, args.client_command, args.kit) == ("client", "start", kit_dir)
        assert args.data == services.DATA_PLACEHOLDER and args.runtime_port == services.RUNTIME_PORT
        assert not args.insecure and not args.allow_unmasked_updates
        assert f"hospital '{site}'" in unit["Unit"]["Description"][0]
        # The hospital's guide explains the unit and what to fill in.
        guide = (kits / site / "COMMANDS.md").read_text()
        assert services.NODE_UNIT in guide and services.DATA_PLACEHOLDER in guide
    assert services.SUPERLINK_UNIT in (kits / "coordinator" / "COMMANDS.md").read_text()


def test_unit_text_quotes_what_systemd_would_expand() -> None:
    # Execute
    text = services.node_unit(federation="f", site="alpha", medsilo="/opt/med silo/bin/medsilo",
                              data="/data/50%/$HOME")
    # Assert: a space quotes the word; % and $ are escaped, so systemd passes them through unchanged
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith('ExecStart="/opt/med silo/bin/medsilo" client start')
    assert '"/data/50%%/$$HOME"' in exec_start
    with pytest.raises(ValueError, match="absolute"):
        services.superlink_unit(federation="f", medsilo="/usr/bin/medsilo", kit_dir=services.INSTALL_ROOT / "a b")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package: systemd)")
def test_systemd_analyze_verify_accepts_every_unit(kits: Path) -> None:
    # Prepare: the units as provisioned (ExecStart= names this installation's medsilo, which exists)
    units = [kits / "coordinator" / services.SUPERLINK_UNIT, kits / "alpha" / services.NODE_UNIT]
    assert services.medsilo_executable().is_file()
    for unit in units:
        # Execute: offline (no man pages, no generators); a missing `medsilo` account is not an error to verify
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
                                capture_output=True, text=True, timeout=120)
        # Assert: accepted, and no line about the unit (systemd only warns, exit 0, on an unknown or bad key)
        report = result.stdout + result.stderr
        assert result.returncode == 0, report
        assert unit.name not in report, report
