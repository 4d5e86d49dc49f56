"""systemd units for the coordinator's SuperLink and a hospital's node, written into every kit by provisioning.

``medsilo provision`` puts ``medsilo-superlink.service`` in the coordinator kit and ``medsilo-node.service`` in
each hospital kit. Both assume the kit is installed at ``/var/lib/medsilo/<kit name>`` (:func:`installed_kit_dir`)
and run ``medsilo server start`` / ``medsilo client start`` as the unprivileged system account ``medsilo``:

* the kit is read-only to the service (``ReadOnlyPaths=``); only what the command writes is writable, declared as
  ``StateDirectory=`` so that systemd creates those folders owned by ``medsilo``, mode 0700: the kit's
  ``state/`` (SuperLink database and site registry, or the node's privacy ledger, audit log and DICOM cache)
  and ``flwr/`` (Flower's home), and on the coordinator the runs' output folders;
* the rest of the system is read-only (``ProtectSystem=strict``), home folders hidden (``ProtectHome=yes``),
  ``/tmp`` private, no privilege gain, files created owner-only (``UMask=0077``);
* ``systemctl stop`` sends SIGTERM to every process of the service (``KillMode=control-group``); medsilo's own
  handler stops Flower's children too (:mod:`common.processes`) and what is still alive after
  ``TimeoutStopSec=`` is killed; ``Restart=on-failure`` brings a crashed service back.

The functions here are pure: they return unit text and write nothing.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path, PurePosixPath

#: The system account both units run as (created by the hospital's IT, see the kits' COMMANDS.md).
SERVICE_USER = "medsilo"
#: Where a kit is installed on its machine: ``/var/lib/medsilo/<kit name>`` (systemd's state directory root).
INSTALL_ROOT = PurePosixPath("/var/lib/medsilo")
#: The coordinator's runs' output folders (``flwr run ... -c "out-dir='/var/lib/medsilo/runs/NAME'"``).
RUNS_DIR = INSTALL_ROOT / "runs"
SUPERLINK_UNIT = "medsilo-superlink.service"
NODE_UNIT = "medsilo-node.service"
#: The ``--data`` of the node unit until the hospital names its DICOM folder (the node refuses to start with it).
DATA_PLACEHOLDER = "/REPLACE/WITH/YOUR/DICOM-FOLDER"
#: The node's default ``--runtime-port`` (``medsilo client start``).
RUNTIME_PORT = 9094
#: Seconds systemd waits after SIGTERM before SIGKILL (medsilo gives Flower up to 20 s, then kills what is left).
STOP_TIMEOUT_S = 60
#: Optional environment files (root-owned, 0600): DICOMweb credentials, MEDSILO_DATA.
NODE_ENV_FILE = "/etc/medsilo/medsilo-node.env"
SUPERLINK_ENV_FILE = "/etc/medsilo/medsilo-superlink.env"

_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_UNQUOTED_ARG = re.compile(r"^[A-Za-z0-9._/:=@+,-]+$")


def medsilo_executable() -> Path:
    """The ``medsilo`` command of this installation: the console script beside the running interpreter.

    Falls back to ``medsilo`` on ``PATH``, then to the console script's expected place beside the interpreter
    (the unit then names a missing file: ``systemd-analyze verify`` says so). The path is absolute and not
    resolved: a virtual environment's ``bin/medsilo`` stays that, not the interpreter it links to.
    """
    beside = Path(sys.executable).absolute().parent / "medsilo"
    if beside.is_file():
        return beside
    found = shutil.which("medsilo")
    return Path(found).absolute() if found else beside


def installed_kit_dir(kit_name: str) -> PurePosixPath:
    """Where the kit ``kit_name`` (``coordinator`` or a site name) is installed on its machine."""
    return INSTALL_ROOT / kit_name


def _plain(path: PurePosixPath) -> str:
    text = str(path)
    if not _PLAIN_PATH.match(text):
        raise ValueError(f"{text!r}: a unit path must be absolute and made of letters, digits and ._/- only")
    return text


def exec_argument(arg: str) -> str:
    """``arg`` as one word of an ``ExecStart=`` line: specifiers (``%``) and ``$`` escaped, quoted when needed."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if _UNQUOTED_ARG.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exec_start(words: list[str]) -> str:
    return " ".join(exec_argument(w) for w in words)


def _state_directories(kit_dir: PurePosixPath, extra: tuple[PurePosixPath, ...] = ()) -> str:
    """``StateDirectory=`` names (relative to /var/lib) for the kit's writable folders."""
    folders = [kit_dir / "state", kit_dir / "flwr", *extra]
    names = []
    for folder in folders:
        relative = folder.relative_to(PurePosixPath("/var/lib"))  # ValueError: not under systemd's state root
        names.append(_plain(PurePosixPath("/") / relative)[1:])
    return " ".join(names)


_COMMON_HEADER = """\
# Runs as the unprivileged system account '{user}' (User=/Group=), not DynamicUser=: the kit's private key must
# be owned by the account that reads it (mode 0600), your data folder is shared with it through an ordinary
# group, and files and logs name one stable account. Create it once:
#   sudo useradd --system --home-dir {root} --no-create-home --shell /usr/sbin/nologin {user}
# The kit is read-only to the service. systemd creates the folders it writes (StateDirectory=: the kit's
# state/ and flwr/{extra}), owned by '{user}', mode 0700; their names follow the kit's place, so keep the kit at
#   {kit}
# ExecStart= starts the medsilo command that wrote this kit; if medsilo is installed elsewhere on this machine
# (`command -v medsilo` shows where), replace ExecStart='s first word with that path.
"""

_HARDENING = """\
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
UMask=0077
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
"""

_STOPPING = """\
# `systemctl stop` sends SIGTERM to every process of the service; medsilo also stops each Flower process it
# started, and whatever is still running {timeout} s later is killed. A crash restarts the service.
KillMode=control-group
KillSignal=SIGTERM
TimeoutStopSec={timeout}
Restart=on-failure
RestartSec=30
"""


def superlink_unit(*, federation: str, medsilo: str | Path, kit_dir: PurePosixPath | None = None) -> str:
    """The ``medsilo-superlink.service`` text of a coordinator kit.

    Parameters
    ----------
    federation
        The federation's name (for the description).
    medsilo
        Absolute path of the ``medsilo`` command (:func:`medsilo_executable`).
    kit_dir
        Where the coordinator kit is installed (default :func:`installed_kit_dir` ``("coordinator")``).

    Returns
    -------
    str
        The unit file's text.

    """
    kit = kit_dir or installed_kit_dir("coordinator")
    default_runs = kit / "medsilo-runs"  # the ServerApp's out-dir when a run names none (relative to the kit)
    states = _state_directories(kit, (default_runs, RUNS_DIR))
    header = _COMMON_HEADER.format(user=SERVICE_USER, root=INSTALL_ROOT, kit=_plain(kit),
                                   extra=f", medsilo-runs/ and {RUNS_DIR}")
    return f"""\
# medsilo SuperLink of federation '{federation}': the coordinator (systemd unit written by `medsilo provision`).
# Install it as the kit's COMMANDS.md says: copy it to /etc/systemd/system/, then
#   sudo systemctl daemon-reload && sudo systemctl enable --now {SUPERLINK_UNIT.removesuffix(".service")}
{header}# Launch runs with out-dir='{RUNS_DIR}/NAME': only the folders above are writable, and a resumed run needs
# the same out-dir.
# A port below 1024 needs AmbientCapabilities=CAP_NET_BIND_SERVICE; the provisioned port does not.

[Unit]
Description=medsilo SuperLink of federation '{federation}' (coordinator)
Documentation=file://{_plain(kit)}/COMMANDS.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
ExecStart={_exec_start([str(medsilo), "server", "start", "--kit", _plain(kit)])}
WorkingDirectory={_plain(kit)}/state
# Optional: MEDSILO_DATA=<folder of the public test split>, only for runs with server-eval=true.
EnvironmentFile=-{SUPERLINK_ENV_FILE}
StateDirectory={states}
StateDirectoryMode=0700
CacheDirectory={SERVICE_USER}
CacheDirectoryMode=0700
Environment=XDG_CACHE_HOME=/var/cache/{SERVICE_USER}
ReadOnlyPaths={_plain(kit)}
{_HARDENING}PrivateDevices=yes
{_STOPPING.format(timeout=STOP_TIMEOUT_S)}
[Install]
WantedBy=multi-user.target
"""


def node_unit(*, federation: str, site: str, medsilo: str | Path, kit_dir: PurePosixPath | None = None,
              data: str = DATA_PLACEHOLDER, runtime_port: int = RUNTIME_PORT) -> str:
    """The ``medsilo-node.service`` text of a hospital kit.

    Parameters
    ----------
    federation, site
        The federation's and the hospital's names (for the description).
    medsilo
        Absolute path of the ``medsilo`` command (:func:`medsilo_executable`).
    kit_dir
        Where the hospital kit is installed (default :func:`installed_kit_dir` ``(site)``).
    data
        The node's ``--data``: :data:`DATA_PLACEHOLDER` until the hospital names its DICOM folder.
    runtime_port
        The node's ``--runtime-port`` (unique per node on one machine).

    Returns
    -------
    str
        The unit file's text.

    """
    kit = kit_dir or installed_kit_dir(site)
    header = _COMMON_HEADER.format(user=SERVICE_USER, root=INSTALL_ROOT, kit=_plain(kit), extra="")
    command = [str(medsilo), "client", "start", "--kit", _plain(kit), "--data", data,
               "--runtime-port", str(runtime_port)]
    return f"""\
# medsilo node of hospital '{site}' in federation '{federation}' (systemd unit written by `medsilo provision`).
# Install it as the kit's COMMANDS.md says: copy it to /etc/systemd/system/, replace the --data placeholder
# in ExecStart= with your DICOM folder (or a DICOMweb root URL, adding --labels FILE), then
#   sudo systemctl daemon-reload && sudo systemctl enable --now {NODE_UNIT.removesuffix(".service")}
{header}# The '{SERVICE_USER}' account must be able to read your DICOM folder: add it to the group that may
# (SupplementaryGroups= below) rather than opening the folder to everyone. ProtectHome=yes hides /home, /root
# and /run/user: data kept there needs ProtectHome=read-only.
# A second node on this machine needs its own kit, its own unit name and its own --runtime-port.
# No PrivateDevices=: training may use this machine's GPU.

[Unit]
Description=medsilo node of hospital '{site}' (federation '{federation}')
Documentation=file://{_plain(kit)}/COMMANDS.md
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
#SupplementaryGroups=pacs-export
ExecStart={_exec_start(command)}
WorkingDirectory={_plain(kit)}/state
# Optional: MEDSILO_PACS_* credentials for a DICOMweb --data (root-owned, mode 0600).
EnvironmentFile=-{NODE_ENV_FILE}
StateDirectory={_state_directories(kit)}
StateDirectoryMode=0700
CacheDirectory={SERVICE_USER}
CacheDirectoryMode=0700
Environment=XDG_CACHE_HOME=/var/cache/{SERVICE_USER}
ReadOnlyPaths={_plain(kit)}
{_HARDENING}{_STOPPING.format(timeout=STOP_TIMEOUT_S)}
[Install]
WantedBy=multi-user.target
"""
