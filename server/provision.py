"""Provisioning: the federation's CA, the SuperLink's TLS identity and one startup kit per hospital.

Layout written by ``medsilo provision federation.toml --out kits/``::

    kits/
      federation.json            # sites, key fingerprints, revocations (the coordinator's record)
      ca/ca.crt  ca/ca.key       # the federation CA; keep ca.key offline (0600)
      coordinator/               # copy to the coordinator machine
        kit.toml  ca.crt  server.crt  server.key  nodes/<site>.pub  revoked/<site>.pub  COMMANDS.md
      <site>/                    # send to that hospital over a trusted channel
        kit.toml  ca.crt  node.key  node.pub  site-policy.toml  COMMANDS.md

Nothing is overwritten: a kit set is assembled in a hidden folder and renamed into place, private keys are
written 0600, and adding or revoking a site changes only that site's files and the federation record.
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
from server.federation import FederationSpec, SiteSpec, check_site_name, format_address

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
def _site_kit(folder: Path, *, spec_name: str, address: str, site: SiteSpec, ca_pem: bytes) -> crypto.NodeKeyPair:
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
    atomic_write_text(folder / "COMMANDS.md", _SITE_COMMANDS.format(site=site.name, federation=spec_name,
                                                                    address=address, fingerprint=keys.fingerprint))
    return keys


def _coordinator_kit(folder: Path, spec: FederationSpec, ca_pem: bytes, server: crypto.Issued) -> None:
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
    atomic_write_text(folder / "COMMANDS.md", _COORDINATOR_COMMANDS.format(
        federation=spec.name, address=spec.address, bind=format_address(spec.bind, spec.port)))


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
    try:
        ca = crypto.create_ca(federation=spec.name, days=3650)
        # Loopback too: the SuperLink's own SuperExec and the coordinator's `flwr` reach it on 127.0.0.1.
        san = list(dict.fromkeys([*spec.hosts, "localhost", "127.0.0.1"]))
        server = crypto.issue_server_certificate(ca=ca, hosts=san, federation=spec.name, days=spec.cert_days)
        (tmp / "ca").mkdir()
        crypto.write_public(tmp / "ca" / "ca.crt", ca.certificate_pem)
        crypto.write_private(tmp / "ca" / "ca.key", ca.private_key_pem)
        _coordinator_kit(tmp / "coordinator", spec, ca.certificate_pem, server)
        sites = []
        for site in spec.sites:
            keys = _site_kit(tmp / site.name, spec_name=spec.name, address=spec.address, site=site,
                             ca_pem=ca.certificate_pem)
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
                         ca_pem=ca_pem)
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


_SITE_COMMANDS = """\
# Hospital '{site}' in federation '{federation}'

Coordinator address: `{address}`. Your node key fingerprint (tell the coordinator if asked): `{fingerprint}`.

1. Install medsilo on the machine that can read your images (`make setup` in a medsilo checkout).
2. Review `site-policy.toml`: your lifetime privacy budget; you alone set it.
3. Start this hospital's node (TLS, node authentication and secure aggregation are on):

       medsilo client start --kit {kit} --data /path/to/your/data

   `--data` is a site file (`.npz`, as written by `medsilo simulate`) or, once DICOM ingestion is
   configured, your DICOM folder. Stop the node with Ctrl-C.
""".replace("{kit}", "THIS-FOLDER")

_COORDINATOR_COMMANDS = """\
# Coordinator of federation '{federation}'

Hospitals dial `{address}`; the SuperLink listens on `{bind}`.

1. Start the SuperLink (TLS, SuperNode authentication, durable state in state/superlink.db):

       medsilo server start --kit THIS-FOLDER

2. Launch a run from a medsilo checkout (the connection is written by `medsilo server start`):

       FLWR_HOME=THIS-FOLDER/flwr flwr run . {federation} --stream

3. Add or revoke a hospital on the machine that holds the kits folder:

       medsilo provision --add-site NAME --out KITS
       medsilo provision --revoke-site NAME --out KITS

   then restart (or `medsilo server sync --kit THIS-FOLDER`) so the SuperLink sees the change.
"""
