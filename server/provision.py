"""Provisioning: the federation's CA, the SuperLink's TLS identity and one startup kit per hospital.

Layout written by ``medsilo provision federation.toml --out kits/``::

    kits/
      federation.json            # sites, key fingerprints, revocations (the coordinator's record)
      ca/ca.crt  ca/ca.key       # the federation CA; keep ca.key offline (0600)
      coordinator/               # copy to the coordinator machine
        kit.toml  ca.crt  server.crt  server.key  nodes/<site>.pub  revoked/<site>.pub  COMMANDS.md
        medsilo-superlink.service
      <site>/                    # send to that hospital over a trusted channel
        kit.toml  ca.crt  node.key  node.pub  site-policy.toml  COMMANDS.md  medsilo-node.service

Nothing is overwritten: a kit set is assembled in a hidden folder and renamed into place, private keys are
written 0600, and adding or revoking a site changes only that site's files and the federation record.
:func:`renew_server_certificate` replaces only ``coordinator/server.crt`` (same key, same hosts, signed by the
same CA). The systemd units come from :mod:`server.services`, the COMMANDS.md texts from :mod:`server.kit_guide`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import crypto
from common.errors import ConfigError, MedsiloError, Problems
from common.io import atomic_write_json, atomic_write_text
from common.site_policy import template as policy_template
from server import services
from server.federation import FederationSpec, SiteSpec, check_site_name, format_address
from server.kit_guide import coordinator_commands, site_commands

STATE = "federation.json"


class ProvisionError(MedsiloError):
    """The kits folder cannot be changed as asked (nothing was written)."""


@dataclass(frozen=True)
class Kits:
    """Paths inside a provisioned kits folder."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    def site(self, name: str) -> Path:
        return self.root / name

    def read_state(self) -> dict[str, Any]:
        if not self.state.is_file():
            raise ProvisionError(
                f"{self.root} is not a provisioned kits folder (no {STATE}); run `medsilo provision FEDERATION.toml "
                f"--out {self.root}` first"
            )
        data: dict[str, Any] = json.loads(self.state.read_text(encoding="utf-8"))
        return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml(tables: dict[str, dict[str, Any]], header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------- kit contents
def _server_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    """The SuperLink certificate's names: the coordinator's hosts, then loopback."""
    # Loopback too: the SuperLink's own SuperExec and the coordinator's `flwr` reach it on 127.0.0.1.
    return list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))


def _site_kit(folder: Path, *, spec_name: str, address: str, site: SiteSpec, ca_pem: bytes,
              medsilo: Path) -> crypto.NodeKeyPair:
    keys = crypto.create_node_keys(comment=f"{site.name}@{spec_name}")
    folder.mkdir(parents=True)
    crypto.write_public(folder / "ca.crt", ca_pem)
    crypto.write_private(folder / "node.key", keys.private_openssh)
    crypto.write_public(folder / "node.pub", keys.public_openssh)
    atomic_write_text(folder / "kit.toml", _toml(
        {"kit": {"role": "site", "federation": spec_name, "site": site.name, "superlink": address,
                 "ca": "ca.crt", "node-key": "node.key", "node-public-key": "node.pub",
                 "fingerprint": keys.fingerprint}},
        header=f"medsilo startup kit for hospital '{site.name}' in federation '{spec_name}'.\n"
               "Keep node.key secret (mode 0600): it is this hospital's identity in the federation.",
    ))
    atomic_write_text(folder / "site-policy.toml", policy_template(
        epsilon_per_run=site.epsilon, epsilon_lifetime=site.lifetime, delta=site.delta))
    atomic_write_text(folder / "COMMANDS.md", site_commands(
        site=site.name, federation=spec_name, address=address, fingerprint=keys.fingerprint, medsilo=medsilo),
        mode=0o644)
    atomic_write_text(folder / services.NODE_UNIT, services.node_unit(
        federation=spec_name, site=site.name, medsilo=medsilo), mode=0o644)
    return keys


def _coordinator_kit(folder: Path, spec: FederationSpec, ca_pem: bytes, server: crypto.Issued, medsilo: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "nodes").mkdir()
    (folder / "revoked").mkdir()
    crypto.write_public(folder / "ca.crt", ca_pem)
    crypto.write_public(folder / "server.crt", server.certificate_pem)
    crypto.write_private(folder / "server.key", server.private_key_pem)
    atomic_write_text(folder / "kit.toml", _toml(
        {"kit": {"role": "coordinator", "federation": spec.name, "hosts": list(spec.hosts), "port": spec.port,
                 "bind": spec.bind, "ca": "ca.crt", "certificate": "server.crt", "key": "server.key",
                 "database": "state/superlink.db", "nodes": "nodes", "revoked": "revoked"}},
        header=f"medsilo coordinator kit for federation '{spec.name}'. Keep server.key secret (0600).",
    ))
    atomic_write_text(folder / "COMMANDS.md", coordinator_commands(
        federation=spec.name, address=spec.address, bind=format_address(spec.bind, spec.port), medsilo=medsilo),
        mode=0o644)
    atomic_write_text(folder / services.SUPERLINK_UNIT, services.superlink_unit(federation=spec.name,
                                                                                medsilo=medsilo), mode=0o644)


def provision(spec: FederationSpec, out: str | Path) -> Kits:
    """Create the CA, the SuperLink certificate and every kit; the folder appears complete or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(
            f"{out} already exists and is not empty; medsilo never overwrites kits. Choose another --out, or use "
            f"--add-site / --revoke-site to change the federation provisioned there."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    medsilo = services.medsilo_executable()
    try:
        ca = crypto.create_ca(federation=spec.name, days=3650)
        server = crypto.issue_server_certificate(ca=ca, hosts=_server_hosts(spec.hosts), federation=spec.name,
                                                 days=spec.cert_days)
        (tmp / "ca").mkdir()
        crypto.write_public(tmp / "ca" / "ca.crt", ca.certificate_pem)
        crypto.write_private(tmp / "ca" / "ca.key", ca.private_key_pem)
        _coordinator_kit(tmp / "coordinator", spec, ca.certificate_pem, server, medsilo)
        sites = []
        for site in spec.sites:
            keys = _site_kit(tmp / site.name, spec_name=spec.name, address=spec.address, site=site,
                             ca_pem=ca.certificate_pem, medsilo=medsilo)
            crypto.write_public(tmp / "coordinator" / "nodes" / f"{site.name}.pub", keys.public_openssh)
            sites.append(_site_record(site, keys.fingerprint))
        atomic_write_json(tmp / STATE, {
            "federation": spec.name, "hosts": list(spec.hosts), "port": spec.port, "bind": spec.bind,
            "address": spec.address, "created": _now(), "sites": sites,
        })
        os.chmod(tmp, 0o700)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Kits(out)


def _site_record(site: SiteSpec, fingerprint: str) -> dict[str, Any]:
    return {"name": site.name, "fingerprint": fingerprint, "status": "active", "added": _now(),
            "epsilon": site.epsilon, "epsilon_lifetime": site.lifetime, "delta": site.delta, "contact": site.contact}


def add_site(kits_root: str | Path, site: SiteSpec) -> Path:
    """Create one more hospital's kit and authorise its key; returns the new kit folder."""
    kits = Kits(Path(kits_root))
    state = kits.read_state()
    p = Problems()
    check_site_name(site.name, p, "--add-site")
    known = {s["name"]: s for s in state["sites"]}
    if site.name in known:
        status = known[site.name]["status"]
        p.add(f"--add-site: site '{site.name}' is already in the federation ({status}); "
              + ("choose a new name for a re-joining hospital" if status == "revoked" else "its kit exists already"))
    if kits.site(site.name).exists():
        p.add(f"--add-site: {kits.site(site.name)} already exists; move it away or choose another name")
    p.raise_if_any()
    ca_pem = (kits.root / "ca" / "ca.crt").read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix=f".{site.name}.", suffix=".partial", dir=kits.root))
    try:
        keys = _site_kit(tmp / "kit", spec_name=state["federation"], address=state["address"], site=site,
                         ca_pem=ca_pem, medsilo=services.medsilo_executable())
        crypto.write_public(kits.coordinator / "nodes" / f"{site.name}.pub", keys.public_openssh)
        os.replace(tmp / "kit", kits.site(site.name))
    except BaseException:
        (kits.coordinator / "nodes" / f"{site.name}.pub").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    state["sites"].append(_site_record(site, keys.fingerprint))
    atomic_write_json(kits.state, state)
    return kits.site(site.name)


def revoke_site(kits_root: str | Path, name: str) -> None:
    """Withdraw a hospital's key: moved from ``coordinator/nodes`` to ``coordinator/revoked``."""
    kits = Kits(Path(kits_root))
    state = kits.read_state()
    record = next((s for s in state["sites"] if s["name"] == name), None)
    if record is None:
        raise ConfigError([f"--revoke-site: no site named {name!r}; known sites: "
                           f"{', '.join(s['name'] for s in state['sites']) or 'none'}"])
    if record["status"] == "revoked":
        raise ConfigError([f"--revoke-site: site '{name}' was already revoked on {record.get('revoked')}"])
    src = kits.coordinator / "nodes" / f"{name}.pub"
    dst = kits.coordinator / "revoked" / f"{name}.pub"
    if src.exists():
        os.replace(src, dst)
    record["status"] = "revoked"
    record["revoked"] = _now()
    atomic_write_json(kits.state, state)


#: The longest validity a renewed SuperLink certificate may have (as ``[coordinator].cert_days``).
MAX_CERT_DAYS = 825


def renew_server_certificate(kits_root: str | Path, *, days: int = 365, spec: FederationSpec | None = None) -> Path:
    """Re-issue the SuperLink's TLS certificate from the federation CA kept in ``kits_root/ca``.

    The new ``coordinator/server.crt`` has the same subject, host names and key as the current one, a new serial
    number and a validity of ``days`` days from now (at most until the CA expires); it replaces the old one
    atomically. Nothing else changes: not ``server.key``, not a node key, not the federation record or the
    SuperLink's site registry. Hospitals keep their ``ca.crt``; the coordinator restarts its SuperLink.

    Parameters
    ----------
    kits_root
        A kits folder written by :func:`provision`, with the CA key back in ``ca/ca.key``.
    days
        Validity of the new certificate, 1 to :data:`MAX_CERT_DAYS`.
    spec
        The federation file, when given: it must name the provisioned federation and its hosts.

    Returns
    -------
    Path
        The renewed ``coordinator/server.crt``.

    Raises
    ------
    ProvisionError
        Not a kits folder, the CA key or a kit file is missing, or ``spec`` names another federation or other hosts.
    ConfigError
        ``days`` is out of range.
    common.crypto.CertificateProblem, common.crypto.KeyFileProblem
        The CA key does not belong to the CA, the certificate was not issued by it, the CA has expired, or a key
        file is readable by others.

    """
    kits = Kits(Path(kits_root))
    state = kits.read_state()
    if not 1 <= days <= MAX_CERT_DAYS:
        raise ConfigError([f"--renew: days = {days!r}; use 1..{MAX_CERT_DAYS} days (browsers' and CAs' limit)"])
    if spec is not None:
        if spec.name != state["federation"]:
            raise ProvisionError(f"{kits.root} holds federation '{state['federation']}', not '{spec.name}'; give "
                                 "the federation file it was provisioned from, or the kits folder of that federation")
        if list(spec.hosts) != list(state["hosts"]):
            raise ProvisionError(
                f"the federation file lists hosts {', '.join(spec.hosts)} but {kits.root} was provisioned for "
                f"{', '.join(state['hosts'])}; renewal keeps the certificate's host names: restore "
                "[coordinator].hosts to those")
    ca_crt, ca_key = kits.root / "ca" / "ca.crt", kits.root / "ca" / "ca.key"
    server_crt, server_key = kits.coordinator / "server.crt", kits.coordinator / "server.key"
    if not ca_key.is_file():
        raise ProvisionError(
            f"{ca_key} is missing: renewing the SuperLink's certificate needs the federation CA's private key. Copy "
            f"it back from its offline copy to {ca_key} (chmod 600), run this again, then take it offline again. "
            "Nothing was changed.")
    for path in (ca_crt, server_crt, server_key):
        if not path.is_file():
            raise ProvisionError(f"{path} is missing; restore it from the kits folder's backup (nothing was changed)")
    crypto.check_private_key_file(ca_key)
    crypto.check_key_matches_certificate(server_key, server_crt)  # the renewed certificate keeps this key
    renewed = crypto.reissue_certificate(
        server_crt.read_bytes(), ca=crypto.Issued(ca_crt.read_bytes(), ca_key.read_bytes()), days=days)
    crypto.write_public(server_crt, renewed, overwrite=True)
    return server_crt
