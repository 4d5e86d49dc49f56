"""The coordinator's SuperLink: started from a coordinator kit with TLS, node authentication and durable state.

``medsilo server start --kit kits/coordinator`` checks the kit (every problem at once), starts Flower's
``flower-superlink`` on the kit's port with the federation's certificate, ``--enable-supernode-auth`` and
an SQLite state database, waits until its HTTPS health endpoint answers, registers every hospital key
in ``nodes/`` and unregisters every key in ``revoked/`` (:func:`sync`), writes the ``flwr`` connection
used to launch runs, and supervises the process until Ctrl-C. The coordinator's state is owner-only: the
``state/`` folder is ``0700`` and the SuperLink (with the SuperExec and ServerApps it starts) runs under
umask ``077``, so ``superlink.db`` and the runs' outputs are ``0600``.

Flower 1.42 serves the Fleet, Control and ServerAppIo APIs on this one HTTPS port. Its open-source
Control API has no user authentication: whoever can reach the port can submit runs. Expose the port only
to the hospitals' addresses (see README, "Security model and its limits").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import crypto
from common.errors import ConfigError, MedsiloError, Problems
from common.flower_env import FLOWER_ENV
from common.io import (
    OWNER_ONLY_UMASK,
    PRIVATE,
    atomic_write_json,
    atomic_write_text,
    make_owner_only,
    private_dir,
    read_toml,
)
from common.processes import pump, stop_tree

log = logging.getLogger("medsilo")

#: Where the registered node IDs live inside the coordinator kit.
REGISTRY = "state/registry.json"


class SuperLinkError(MedsiloError):
    """The SuperLink could not be started or managed."""


@dataclass(frozen=True)
class CoordinatorKit:
    """A coordinator kit folder, validated."""

    root: Path
    federation: str
    hosts: tuple[str, ...]
    port: int
    bind: str

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def certificate(self) -> Path:
        return self.root / "server.crt"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def database(self) -> Path:
        return self.root / "state" / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def local_address(self) -> str:
        """Where tools on the coordinator machine reach the SuperLink (loopback, in the certificate)."""
        return f"127.0.0.1:{self.port}"


def load_kit(folder: str | Path, *, check_tls: bool = True) -> CoordinatorKit:
    """Read and check a coordinator kit; raise :class:`ConfigError` listing every problem."""
    root = Path(folder).absolute()
    p = Problems()
    kit_file = root / "kit.toml"
    raw = read_toml(kit_file, missing="pass the coordinator folder written by `medsilo provision`").get("kit", {})
    if raw.get("role") != "coordinator":
        raise ConfigError([f"{kit_file} is a {raw.get('role', 'unknown')!r} kit, not the coordinator's; "
                           "use kits/coordinator"])
    try:
        kit = CoordinatorKit(root=root, federation=str(raw["federation"]), hosts=tuple(raw["hosts"]),
                             port=int(raw["port"]), bind=str(raw["bind"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError([f"{kit_file} lacks federation, hosts, port or bind; restore it from the provisioned "
                           "kit"]) from None
    if check_tls:
        for check in (
            lambda: crypto.check_private_key_file(kit.key),
            lambda: crypto.check_issued_by(kit.certificate, kit.ca),
            lambda: crypto.check_valid_now(kit.certificate),
            lambda: crypto.check_key_matches_certificate(kit.key, kit.certificate),
            *[lambda host=host: crypto.check_certificate_names(kit.certificate, host) for host in kit.hosts],
        ):
            try:
                check()
            except MedsiloError as exc:
                p.add(str(exc))
    for name in ("nodes", "revoked"):
        p.check((root / name).is_dir(), f"{root / name} is missing; restore it from the provisioned kit")
    p.raise_if_any()
    return kit


def flower_env(kit: CoordinatorKit) -> dict[str, str]:
    """Environment for Flower processes and ``flwr`` commands of this coordinator.

    No dataset path is added: the coordinator needs no data (the sites validate). A coordinator that adds the
    optional central test set (``server-eval=true``) names its folder in ``MEDSILO_DATA`` itself.
    """
    bin_dir = str(Path(sys.executable).parent)  # Flower starts its helpers (flower-superexec) from PATH
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(kit.flwr_home.absolute()),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           # The ServerApp names hospitals by their kit names and signs the run's audit log with the kit's key.
           "MEDSILO_SITE_REGISTRY": str((kit.root / REGISTRY).absolute())}
    if kit.key.is_file():
        env["MEDSILO_AUDIT_KEY"] = str(kit.key.absolute())
    return env


def write_connection(kit: CoordinatorKit, *, insecure: bool = False) -> Path:
    """Write ``flwr/config.toml`` with a connection named after the federation (used by ``flwr run``)."""
    lines = ["[superlink]", f'default = "{kit.federation}"', "", f"[superlink.{kit.federation}]",
             f'address = "{kit.local_address}"']
    lines += ["insecure = true"] if insecure else [f'root-certificates = "{kit.ca.absolute()}"']
    path = kit.flwr_home / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def superlink_command(kit: CoordinatorKit, *, insecure: bool = False) -> list[str]:
    """The ``flower-superlink`` command line for ``kit``."""
    # Flower's flower-superlink entry point, launched through server.tls13 (TLS 1.3 only).
    cmd = [sys.executable, "-m", "server.tls13", "--host", kit.bind, "--port", str(kit.port),
           "--database", str(kit.database), "--disable-runtime-dependency-installation"]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(kit.ca), "--ssl-certfile", str(kit.certificate),
            "--ssl-keyfile", str(kit.key), "--enable-supernode-auth"]


def wait_ready(kit: CoordinatorKit, *, process: subprocess.Popen[Any] | None = None, timeout: float = 60.0,
               insecure: bool = False) -> float:
    """Poll the SuperLink's health endpoint over verified TLS; return the seconds it took."""
    started = time.monotonic()
    scheme = "http" if insecure else "https"
    context = None if insecure else ssl.create_default_context(cafile=str(kit.ca))
    url = f"{scheme}://{kit.local_address}/health"
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise SuperLinkError(f"flower-superlink exited with code {process.returncode} during start-up; "
                                 f"see its log above (is port {kit.port} already in use?)")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise SuperLinkError(f"the SuperLink did not answer on {url} within {timeout:.0f} s")


def flwr_command() -> str:
    """The ``flwr`` command beside this interpreter (else on ``PATH``)."""
    exe = shutil.which("flwr", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise SuperLinkError("the flwr command is not installed in this environment (`make setup`)")
    return exe


def flwr_json(kit: CoordinatorKit, *args: str) -> dict[str, Any]:
    """Run ``flwr ARGS FEDERATION --format json`` for this kit; its JSON answer (``success`` false on failure)."""
    exe = flwr_command()
    result = subprocess.run([exe, *args, kit.federation, "--format", "json"], env=flower_env(kit),
                            capture_output=True, text=True, timeout=120, umask=OWNER_ONLY_UMASK)
    try:
        out: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        out = {"success": False, "error-message": (result.stdout + result.stderr).strip()[-500:]}
    if result.returncode != 0 and out.get("success", False):
        out["success"] = False
    return out


def read_registry(kit: CoordinatorKit) -> dict[str, dict[str, Any]]:
    """Registered hospitals: site name -> ``{"node_id", "fingerprint", "status"}``."""
    path = kit.root / REGISTRY
    data: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    return data


def sync(kit: CoordinatorKit) -> dict[str, list[str]]:
    """Register new hospital keys and unregister revoked ones on the running SuperLink.

    Returns the site names ``registered``, ``unregistered`` and ``unchanged``. Flower refuses to register
    a key again once it was unregistered, so a revoked hospital needs a new kit (``--add-site``).
    """
    registry = read_registry(kit)
    changes: dict[str, list[str]] = {"registered": [], "unregistered": [], "unchanged": []}
    problems = Problems()
    for pub in sorted((kit.root / "nodes").glob("*.pub")):
        site = pub.stem
        fingerprint = crypto.public_key_fingerprint(crypto.load_node_public_key(pub))
        entry = registry.get(site)
        if entry and entry.get("fingerprint") == fingerprint and entry.get("status") == "registered":
            changes["unchanged"].append(site)
            continue
        out = flwr_json(kit, "supernode", "register", str(pub))
        if not out.get("success"):
            problems.add(f"registering {site} (key {fingerprint}) failed: {out.get('error-message', out)}")
            continue
        registry[site] = {"node_id": int(out["node-id"]), "fingerprint": fingerprint, "status": "registered"}
        changes["registered"].append(site)
        atomic_write_json(kit.root / REGISTRY, registry)
    for pub in sorted((kit.root / "revoked").glob("*.pub")):
        site = pub.stem
        entry = registry.get(site)
        if not entry or entry.get("status") != "registered":
            continue
        out = flwr_json(kit, "supernode", "unregister", str(entry["node_id"]))
        if not out.get("success"):
            problems.add(f"unregistering {site} (node {entry['node_id']}) failed: {out.get('error-message', out)}")
            continue
        entry["status"] = "revoked"
        changes["unregistered"].append(site)
        atomic_write_json(kit.root / REGISTRY, registry)
    problems.raise_if_any()
    return changes


def _open_log(path: Path) -> Any:
    """``path`` opened for appending, created owner-only (it holds the SuperLink's log of runs and nodes)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE), "a", encoding="utf-8")


class SuperLink:
    """A running ``flower-superlink`` for a kit (context manager: stopped on exit)."""

    def __init__(self, kit: CoordinatorKit, *, insecure: bool = False, log_file: Path | None = None) -> None:
        self.kit = kit
        self.insecure = insecure
        self.log_file = log_file
        self.process: subprocess.Popen[Any] | None = None
        self.startup_s = 0.0

    def start(self, *, timeout: float = 60.0) -> SuperLink:
        kit = self.kit
        if self.insecure:
            log.warning("!" * 78)
            log.warning("INSECURE MODE: no TLS and no node authentication. Updates, metrics and run commands")
            log.warning("travel in clear text and ANY machine can join as a hospital. Never use with real data.")
            log.warning("!" * 78)
        # The coordinator's state (runs, nodes, replies in superlink.db) is owner-only: its folder 0700, and the
        # SuperLink (with the SuperExec and ServerApps it starts) creates every file 0600 under umask 077.
        private_dir(kit.database.parent)
        for existing in kit.database.parent.glob(kit.database.name + "*"):  # -wal, -shm, -journal
            make_owner_only(existing)
        private_dir(kit.flwr_home)
        write_connection(kit, insecure=self.insecure)
        sink = _open_log(self.log_file) if self.log_file else sys.stdout
        self._log_handle = sink if self.log_file else None
        self.process = subprocess.Popen(
            superlink_command(kit, insecure=self.insecure), env=flower_env(kit), cwd=kit.root,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            umask=OWNER_ONLY_UMASK,
        )
        assert self.process.stdout is not None
        self._pump = pump(self.process.stdout, sink)  # plain lines unless the sink is a terminal
        try:
            self.startup_s = wait_ready(kit, process=self.process, timeout=timeout, insecure=self.insecure)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, timeout: float = 20.0) -> None:
        """SIGTERM the SuperLink (it stops its own SuperExec child); SIGKILL the group if it hangs."""
        if self.process is not None:
            stop_tree(self.process, timeout=timeout)
        if getattr(self, "_pump", None) is not None:
            self._pump.join(timeout=5)  # the last lines reach the log before it closes
        if getattr(self, "_log_handle", None):
            self._log_handle.close()  # type: ignore[union-attr]
            self._log_handle = None

    def __enter__(self) -> SuperLink:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
