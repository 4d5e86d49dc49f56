"""The hospital's SuperNode: started from the site's startup kit with TLS, its node key and its own policy.

``medsilo client start --kit kits/<hospital> --data <site data>`` checks the kit (every problem at once:
missing files, a private key readable by others, a key that does not match its public half), checks the
coordinator's certificate before Flower does (so an expired certificate, a wrong CA or a host name
missing from the certificate is reported as such), then runs Flower's ``flower-supernode`` with the
kit's CA, node key and a node config carrying the site name, the data location and the site's policy
(privacy budget, secure aggregation and DP required). It reports when the node is ready and turns
Flower's exit codes into one sentence with the fix, and records the node's state (connected, stopped, exited and
why) in ``state/node-status.json`` for ``medsilo status`` (:mod:`client.status`).

The coordinator's app bundle never runs here: the node's ``PATH`` resolves Flower's ``flwr-clientapp`` to a
launcher of :mod:`client.runner`, which checks the bundle and runs the installed medsilo's ClientApp. Flower's
processes get an allow-listed environment (no secrets the node does not need) and create owner-only files.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import crypto
from common.errors import ConfigError, MedsiloError, Problems
from common.flower_env import FLOWER_ENV
from common.io import OWNER_ONLY_UMASK, atomic_write_text, private_dir, read_toml
from common.processes import pump, stop_tree
from common.site_policy import SitePolicy, load_policy

log = logging.getLogger("medsilo")

READY_MARK = "SuperNode ID:"

#: Environment variables the node's processes keep (plus those starting with :data:`ENV_PREFIXES`).
ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MEDSILO_DATA",
    "PYTHONUNBUFFERED",
})
#: Prefixes of kept variables: locale, Flower's settings, and the PACS connection the node's data reader uses.
ENV_PREFIXES = ("LC_", "FLWR_", "MEDSILO_PACS_")

#: The launcher's name: what Flower's SuperExec starts for every message.
CLIENTAPP_COMMAND = "flwr-clientapp"


class NodeError(MedsiloError):
    """The SuperNode could not join the federation."""


@dataclass(frozen=True)
class SiteKit:
    """A hospital's startup kit, validated."""

    root: Path
    federation: str
    site: str
    superlink: str
    policy: SitePolicy

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def key(self) -> Path:
        return self.root / "node.key"

    @property
    def public_key(self) -> Path:
        return self.root / "node.pub"

    @property
    def policy_path(self) -> Path:
        return self.root / "site-policy.toml"

    @property
    def state(self) -> Path:
        """The node's durable state: privacy ledger and audit log."""
        return self.root / "state"

    @property
    def host(self) -> str:
        return self.superlink.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.superlink.rsplit(":", 1)[1])


def load_kit(folder: str | Path, *, insecure: bool = False) -> SiteKit:
    """Read and check a hospital kit; raise :class:`ConfigError` listing every problem."""
    root = Path(folder).absolute()
    kit_file = root / "kit.toml"
    raw = read_toml(kit_file, missing="pass your hospital's folder from the startup kits").get("kit", {})
    if raw.get("role") != "site":
        raise ConfigError([f"{kit_file} is a {raw.get('role', 'unknown')!r} kit, not a hospital's; "
                           "use the folder named after your hospital"])
    missing = [k for k in ("federation", "site", "superlink") if not isinstance(raw.get(k), str)]
    if missing:
        raise ConfigError([f"{kit_file} lacks {', '.join(missing)}; restore it from the provisioned kit"])
    p = Problems()
    policy = SitePolicy()
    try:
        policy = load_policy(root / "site-policy.toml")
    except ConfigError as exc:
        for problem in exc.problems:
            p.add(problem)
    kit = SiteKit(root=root, federation=raw["federation"], site=raw["site"], superlink=raw["superlink"],
                  policy=policy)
    if not insecure:
        for check in (lambda: crypto.check_node_private_key(kit.key, kit.public_key),
                      lambda: crypto.check_valid_now(kit.ca)):
            try:
                check()
            except MedsiloError as exc:
                p.add(str(exc))
    p.raise_if_any()
    return kit


def check_coordinator_certificate(kit: SiteKit, *, timeout: float = 5.0) -> str | None:
    """TLS 1.3 handshake with the coordinator, verified against the kit's CA.

    Returns ``None`` when verified, or a warning when the coordinator is not reachable yet (the node
    keeps retrying). Raises :class:`NodeError` when the coordinator's certificate cannot be trusted.
    """
    context = ssl.create_default_context(cafile=str(kit.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with socket.create_connection((kit.host, kit.port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=kit.host):
            return None
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "expired" in reason:
            fix = "the coordinator must renew its certificate (re-provision with the same CA)"
        elif "Hostname mismatch" in reason or "IP address mismatch" in reason:
            fix = f"'{kit.host}' is not in the coordinator's certificate; use an address from its kit or re-provision"
        else:
            fix = "the coordinator's certificate is not signed by your kit's ca.crt: check that both kits come from " \
                  "the same `medsilo provision`"
        raise NodeError(f"cannot trust the coordinator at {kit.superlink}: {reason}; {fix}") from None
    except ssl.SSLError as exc:
        raise NodeError(f"TLS with the coordinator at {kit.superlink} failed ({exc.reason}); it must offer TLS 1.3 "
                        "with the federation's certificate (is it running in --insecure mode?)") from None
    except OSError as exc:
        return f"the coordinator at {kit.superlink} is not reachable yet ({exc.strerror or exc}); the node will retry"


def write_launcher(folder: Path) -> Path:
    """Fill ``folder``, the node's whole ``PATH``: the commands Flower's SuperNode and SuperExec may start.

    ``flwr-clientapp`` runs :mod:`client.runner` with this interpreter in isolated mode (``-I``);
    ``flower-superexec`` is Flower's own; every other task command Flower knows (``flwr-agentapp``,
    ``flwr-serverapp``, ...) is a stub that refuses: those would unpack and import the coordinator's bundle.
    Returns the ``flwr-clientapp`` launcher.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    private_dir(folder)
    bin_dir = Path(sys.executable).parent
    superexec = shutil.which("flower-superexec", path=str(bin_dir))
    if superexec is None:
        raise NodeError("flower-superexec not found beside this interpreter; install medsilo into this environment "
                        "(`make setup`)")
    # The guard matters: a ClientApp that starts worker processes with multiprocessing's spawn (DICOM decoding,
    # DP-SGD workers) has each of them import this script as ``__mp_main__``; unguarded, every worker would run a
    # second ClientApp for the same task, and its failure would end the real one's task.
    clientapp = (f"#!{sys.executable} -I\n"
                 "if __name__ == \"__main__\":\n    from client.runner import main\n\n    main()\n")
    scripts = {CLIENTAPP_COMMAND: clientapp,
               "flower-superexec": f"#!/bin/sh\nexec {shlex.quote(superexec)} \"$@\"\n"}
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values()) - {CLIENTAPP_COMMAND}):
        scripts[command] = (f"#!/bin/sh\necho 'medsilo node: refused to start {command}: this node runs only "
                            f"its installed medsilo ClientApp' >&2\nexit 1\n")
    for command, text in scripts.items():
        atomic_write_text(folder / command, text)
        os.chmod(folder / command, 0o700)
    return folder / CLIENTAPP_COMMAND


def node_environment(launcher_dir: Path, flwr_home: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed environment of the node's Flower processes; their ``PATH`` is the launcher folder alone."""
    source = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in source.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    env.update(FLOWER_ENV)
    env["PATH"] = str(launcher_dir)
    env["FLWR_HOME"] = source.get("FLWR_HOME", str(flwr_home.absolute()))
    return env


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _location(data: Path | str) -> str:
    text = str(data)
    return text if text.startswith(("http://", "https://")) else str(Path(text).absolute())


def node_config(kit: SiteKit, data: Path | str, *, allow_unmasked: bool = False, labels: Path | None = None,
                workers: int = 1, devices: str = "auto") -> str:
    """The ``--node-config`` string: site name, data (file, DICOM folder or DICOMweb URL), policy, state folder.

    ``workers`` and ``devices`` are the hospital's compute (``medsilo client start --workers N --devices
    cuda:0,cuda:1``): a DP-SGD round on ``workers`` processes over ``devices`` (``auto``: every GPU, else the CPU),
    see :mod:`client.dp.distributed`. A setting this machine cannot honour raises
    :class:`~common.errors.ConfigError` here, before the node starts.
    """
    compute: dict[str, str] = {}
    if workers != 1 or devices != "auto":
        from client.dp.distributed import DEVICES_KEY, WORKERS_KEY, site_compute

        site_compute({WORKERS_KEY: workers, DEVICES_KEY: devices}).backend()  # checks the devices exist
        compute = {WORKERS_KEY: str(int(workers)), DEVICES_KEY: _quote(devices)}
    pairs = {
        "site-name": _quote(kit.site),
        "data-path": _quote(_location(data)),
        **({"labels-path": _quote(str(labels.absolute()))} if labels is not None else {}),
        "policy-path": _quote(str(kit.policy_path.absolute())),
        "state-dir": _quote(str(kit.state.absolute())),
        # The node signs its audit log with its node key (`medsilo audit verify LOG --key node.pub`).
        **({"audit-key": _quote(str(kit.key.absolute()))} if kit.key.is_file() else {}),
        "allow-unmasked-updates": "true" if allow_unmasked else "false",
        **compute,
    }
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def supernode_command(kit: SiteKit, data: Path | str, *, runtime_port: int, insecure: bool = False,
                      allow_unmasked: bool = False, labels: Path | None = None, workers: int = 1,
                      devices: str = "auto") -> list[str]:
    """The ``flower-supernode`` command line: Flower's SuperNode through :mod:`client.supernode` (its idle poll)."""
    cmd = [sys.executable, "-I", "-m", "client.supernode", "--superlink", kit.superlink, "--host", "127.0.0.1",
           "--port", str(runtime_port),
           "--node-config", node_config(kit, data, allow_unmasked=allow_unmasked, labels=labels, workers=workers,
                                        devices=devices)]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(kit.ca), "--auth-supernode-private-key", str(kit.key)]


def explain_exit(output: str, returncode: int, kit: SiteKit) -> str:
    """One sentence with the fix for a SuperNode that stopped on its own."""
    if "2004" in output or "Failed to activate SuperNode" in output:
        fingerprint = crypto.public_key_fingerprint(kit.public_key.read_bytes())
        return (f"the coordinator refused this node's key ({fingerprint}): it is not registered or was revoked; "
                "ask the coordinator to run `medsilo server sync` (a revoked hospital needs a new kit)")
    if "CERTIFICATE_VERIFY_FAILED" in output or "SSL/TLS handshake" in output:
        return "TLS verification of the coordinator failed; check that ca.crt comes from the same federation"
    if "Unable to parse the private key" in output:
        return f"Flower could not read {kit.key}; copy node.key again from your kit"
    if returncode == 0:
        return "the coordinator ended this node's session (its key was probably revoked); ask the coordinator"
    tail = "\n".join(output.strip().splitlines()[-5:])
    return f"flower-supernode exited with code {returncode}:\n{tail}"


class SuperNode:
    """A running ``flower-supernode`` (context manager: stopped on exit)."""

    def __init__(self, kit: SiteKit, data: Path | str, *, runtime_port: int = 9094, insecure: bool = False,
                 allow_unmasked: bool = False, echo: IO[str] | None = None, labels: Path | None = None,
                 workers: int = 1, devices: str = "auto") -> None:
        self.kit = kit
        self.workers, self.devices = workers, devices
        self.data = data
        self.labels = labels
        self.runtime_port = runtime_port
        self.insecure = insecure
        self.allow_unmasked = allow_unmasked
        self.echo = echo
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.ready = threading.Event()
        self.node_id: int | None = None
        self.startup_s = 0.0
        self._stopping = False

    def start(self, *, timeout: float = 120.0) -> SuperNode:
        if self.insecure:
            log.warning("!" * 78)
            log.warning("INSECURE MODE: this hospital's node connects without TLS and without its node key;")
            log.warning("updates travel in clear text to whoever answers. Never use with patient data.")
            log.warning("!" * 78)
        if self.allow_unmasked:
            log.warning("this node will send UNMASKED model updates when the coordinator does not run secure "
                        "aggregation (--allow-unmasked-updates)")
        private_dir(self.kit.state)  # 0700, and tightens one an earlier version left 0755
        private_dir(self.kit.root / "flwr")
        launcher = write_launcher(self.kit.state / "bin")
        env = node_environment(launcher.parent, self.kit.root / "flwr")
        started = time.monotonic()
        self.process = subprocess.Popen(
            supernode_command(self.kit, self.data, runtime_port=self.runtime_port, insecure=self.insecure,
                              labels=self.labels, allow_unmasked=self.allow_unmasked, workers=self.workers,
                              devices=self.devices),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True, umask=OWNER_ONLY_UMASK,  # every file the node's processes write is owner-only
        )
        assert self.process.stdout is not None
        pump(self.process.stdout, self.echo, keep=self._read)  # plain text unless echoed to a terminal
        while not self.ready.wait(0.1):
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                reason = explain_exit("".join(self.output), self.process.returncode, self.kit)
                self._record("exited", detail=reason)
                raise NodeError(reason)
            if time.monotonic() - started > timeout:
                self.stop()
                raise NodeError(f"the node did not connect to {self.kit.superlink} within {timeout:.0f} s")
        self.startup_s = time.monotonic() - started
        return self

    def _read(self, line: str) -> None:
        """Keep the node's last lines (for :func:`explain_exit`) and watch for its ready mark."""
        self.output.append(line)
        del self.output[:-400]
        if READY_MARK in line:
            try:
                self.node_id = int(line.split(READY_MARK, 1)[1].strip().split()[0])
            except (ValueError, IndexError):
                self.node_id = None
            self._record("connected")
            self.ready.set()

    def _record(self, state: str, *, detail: str | None = None) -> None:
        """Record the node's state in its state folder for `medsilo status` (a failure to write is only logged)."""
        from client.status import record

        try:
            record(self.kit.state, state, superlink=self.kit.superlink,
                   pid=self.process.pid if self.process is not None else None, node_id=self.node_id, detail=detail)
        except OSError as exc:
            log.warning("could not record the node's state in %s (%s); `medsilo status` will not show it",
                        self.kit.state, exc.strerror or exc)

    def wait(self) -> int:
        """Block until the node stops; raise :class:`NodeError` when it stopped on its own."""
        assert self.process is not None
        code = self.process.wait()
        if not self._stopping:
            time.sleep(0.2)
            reason = explain_exit("".join(self.output), code, self.kit)
            self._record("exited", detail=reason)
            raise NodeError(reason)
        return code

    def stop(self, *, timeout: float = 15.0) -> None:
        """SIGTERM the node, its SuperExec and any ClientApp process it started."""
        self._stopping = True
        if self.process is not None:
            running = self.process.poll() is None  # one that ended on its own keeps its recorded reason
            stop_tree(self.process, timeout=timeout)
            if running:
                self._record("stopped")

    def kill(self) -> None:
        """Kill the node and everything it started at once (a crashed hospital, for dropout tests)."""
        self._stopping = True
        if self.process is not None:
            running = self.process.poll() is None
            stop_tree(self.process, timeout=5, kill=True)
            if running:
                self._record("stopped", detail="killed")

    def __enter__(self) -> SuperNode:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
