"""``medsilo status`` at a hospital: joined or not, the code it runs, the apps it accepts, ε spent and left.

The node records its state in its state folder (:data:`STATUS_FILE`, owner-only, written atomically by
:class:`client.node.SuperNode` through :func:`record`): ``connected`` when Flower's SuperNode printed its node ID
(the coordinator accepted its key), ``stopped`` or ``exited`` when it ends, with the time, the coordinator's
address, the node's process ID and a digest of the site code (``client/``, ``common/``) installed then.

:func:`node_status` reads, without changing anything: that file (a ``connected`` node whose process is gone is
reported as such), the site policy in force, the app digests the policy approves and the bundles the node refused,
whether the installed medsilo is the one the running node started with, and the privacy ledger of every data
source with its lifetime ε against the policy's lifetime budget (the same sums as ``medsilo site ledger``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.node import SiteKit, check_coordinator_certificate, load_kit
from common import crypto
from common.errors import MedsiloError
from common.io import atomic_write_json, private_dir
from common.site_policy import SitePolicy

#: The node's last recorded state, in its state folder.
STATUS_FILE = "node-status.json"

#: What a node's process command line holds (to tell it from another process that got the same ID).
NODE_COMMAND = b"client.supernode"


def site_code_digest(files: dict[str, bytes] | None = None) -> str:
    """``sha256:<hex>`` over the site code (bundle-relative path and bytes of each ``.py`` file, sorted)."""
    from client.app_approval import installed_site_code

    code = installed_site_code() if files is None else files
    digest = hashlib.sha256()
    for path in sorted(code):
        digest.update(path.encode("utf-8") + b"\0" + hashlib.sha256(code[path]).digest())
    return "sha256:" + digest.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def record(state_dir: Path, state: str, *, superlink: str, pid: int | None, node_id: int | None = None,
           detail: str | None = None) -> Path:
    """Write the node's state to ``state_dir/``:data:`STATUS_FILE` (atomically, ``0600`` in a ``0700`` folder).

    Parameters
    ----------
    state_dir
        The node's state folder.
    state
        ``"connected"`` (the coordinator accepted the node), ``"stopped"`` (stopped by its operator) or
        ``"exited"`` (it ended on its own).
    superlink, pid, node_id
        The coordinator's address, the ``flower-supernode`` process and the node ID the SuperLink gave it.
    detail
        Why it stopped, in one sentence (no patient data: Flower's exit, explained).

    """
    private_dir(state_dir)
    path = state_dir / STATUS_FILE
    atomic_write_json(path, {"state": state, "since": _now(), "superlink": superlink, "pid": pid,
                             "node_id": node_id, "python": sys.executable, "site_code": site_code_digest(),
                             "detail": detail})
    return path


def _node_alive(pid: int) -> bool:
    """Whether ``pid`` is a live medsilo node process (not another process that reused the ID)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        if Path("/proc/self").exists():
            return False
        try:  # no /proc: any live process with that ID
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return NODE_COMMAND in command and status != "Z"


@dataclass(frozen=True)
class NodeState:
    """Whether the node has joined: its recorded state, checked against its process."""

    #: ``"connected"``, ``"stopped"``, ``"exited"``, ``"gone"`` (recorded connected, its process is not running)
    #: or ``"never started"`` (no status file).
    state: str
    since: str | None = None
    superlink: str | None = None
    pid: int | None = None
    node_id: int | None = None
    detail: str | None = None
    #: The interpreter and site-code digest the node started with.
    python: str | None = None
    site_code: str | None = None

    @property
    def joined(self) -> bool:
        return self.state == "connected"


@dataclass(frozen=True)
class SourceBudget:
    """A data source's privacy ledger against the policy's lifetime budget."""

    source: str
    label: str
    runs: int
    releases: dict[str, int]
    epsilon_spent: float
    delta: float
    epsilon_budget: float
    per_run: dict[int, float] = field(default_factory=dict)

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_budget - self.epsilon_spent)


@dataclass(frozen=True)
class NodeStatus:
    """What :func:`node_status` found."""

    kit: Path
    site: str
    federation: str
    superlink: str
    state_dir: Path
    node: NodeState
    policy: SitePolicy
    #: The site code installed now, and whether the running node started with it (``None``: no running node).
    site_code: str
    runs_installed_code: bool | None
    accountant: str
    sources: tuple[SourceBudget, ...]
    #: Ledger files of the previous format (counted toward every source's lifetime ε): name -> ε.
    legacy: dict[str, float] = field(default_factory=dict)
    #: App bundles the node refused, kept in ``refused-apps/`` for review.
    refused_apps: tuple[str, ...] = ()
    #: ``None`` when the coordinator's certificate verified; else why not (unreachable, untrusted).
    coordinator: str | None = None
    certificate_not_after: dt.datetime | None = None
    problems: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """The status as plain text, one item a line."""
        n = self.node
        out = [f"hospital node '{self.site}' of federation '{self.federation}' ({self.kit})"]
        if n.state == "connected":
            out.append(f"node: joined {n.superlink} as node {n.node_id} since {n.since} (process {n.pid})")
        elif n.state == "gone":
            out.append(f"node: not running: recorded as joined since {n.since}, but its process {n.pid} is gone "
                       "(killed or crashed); start it with `medsilo client start --kit KIT --data DATA`")
        elif n.state == "never started":
            out.append(f"node: not joined: no node has run from {self.state_dir}")
        else:
            out.append(f"node: not joined: {n.state} since {n.since}" + (f" ({n.detail})" if n.detail else ""))
        out.append("coordinator: " + (f"{self.superlink} reachable, certificate verified" if self.coordinator is None
                                      else self.coordinator))
        if self.certificate_not_after is not None:
            out.append(f"federation CA: valid until {self.certificate_not_after:%Y-%m-%d}")
        if self.runs_installed_code is None:
            out.append(f"installed site code: {self.site_code}")
        elif self.runs_installed_code:
            out.append(f"installed site code: {self.site_code}, the code the running node started with")
        else:
            out.append(f"installed site code: {self.site_code}, NOT the code the running node started with "
                       f"({n.site_code} under {n.python}); restart the node")
        p = self.policy
        out.append(f"policy: ε per run {p.epsilon_per_run:g}, lifetime ε {p.epsilon_lifetime:g} (δ={p.delta:g}), "
                   f"DP {'required' if p.require_dp else 'optional'}, secure aggregation "
                   f"{'required' if p.require_secure_aggregation else 'optional'}, cohort >= {p.min_cohort}, "
                   f"rounds <= {p.max_rounds}, local epochs <= {p.max_local_epochs}")
        out.append(f"policy models: {', '.join(p.models) or 'any'}; datasets: {', '.join(p.datasets) or 'any'}")
        out.append("approved apps: " + (", ".join(p.approved_apps) or "none (only this node's own medsilo release)"))
        out += [f"refused app: {name} (review with `medsilo site approve`)" for name in self.refused_apps]
        if not self.sources and not self.legacy:
            out.append(f"privacy ledger: nothing released yet ({self.state_dir})")
        for s in self.sources:
            releases = ", ".join(f"{k} {v}" for k, v in sorted(s.releases.items())) or "none"
            out.append(f"source {s.source} {s.label}: ε spent {s.epsilon_spent:.3f} of {s.epsilon_budget:g}, "
                       f"remaining {s.epsilon_remaining:.3f} (δ={s.delta:g}, {self.accountant}; {s.runs} run(s), "
                       f"releases {releases})")
        out += [f"legacy ledger {name}: ε {eps:.3f} (counted toward every source)" for name, eps in self.legacy.items()]
        out += [f"WARNING: {problem}" for problem in self.problems]
        return out

    def as_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values."""
        out = json.loads(json.dumps(asdict(self), default=_plain))
        out["role"] = "site"
        out["node"]["joined"] = self.node.joined
        for source, raw in zip(self.sources, out["sources"], strict=True):
            raw["epsilon_remaining"] = source.epsilon_remaining
        return dict(out)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def read_state(state_dir: Path) -> NodeState:
    """The node's recorded state (:data:`STATUS_FILE`), with a ``connected`` node whose process is gone as ``gone``."""
    path = state_dir / STATUS_FILE
    if not path.is_file():
        return NodeState("never started")
    try:
        raw = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(NodeState)}
        found = NodeState(**{k: v for k, v in raw.items() if k in names})
    except (OSError, ValueError, TypeError):
        return NodeState("unknown", detail=f"{path} is unreadable; it is rewritten when the node next starts")
    if found.state == "connected" and not (isinstance(found.pid, int) and _node_alive(found.pid)):
        return dataclasses.replace(found, state="gone")
    return found


def _ledgers(kit: SiteKit, state_dir: Path, accountant: str) -> tuple[tuple[SourceBudget, ...], dict[str, float]]:
    """Every data source's ledger in ``state_dir``, summed as ``medsilo site ledger`` does (δ: the policy's)."""
    from client.dp.ledger import ledgers_in, legacy_summary

    if not state_dir.is_dir():
        return (), {}
    ledgers, legacy = ledgers_in(state_dir)
    policy = kit.policy
    sources = []
    for ledger in ledgers:
        s = ledger.summary(delta=policy.delta, accountant=accountant)
        sources.append(SourceBudget(source=s["source"], label=s["label"], runs=s["runs"], releases=s["releases"],
                                    epsilon_spent=s["epsilon_lifetime"], delta=s["delta"],
                                    epsilon_budget=policy.epsilon_lifetime, per_run=s["per_run"]))
    old = {path.name: legacy_summary(path, delta=policy.delta, accountant=accountant)["epsilon"] for path in legacy}
    return tuple(sources), old


def node_status(kit_dir: str | Path, state_dir: Path | None = None, *, accountant: str = "prv",
                probe: bool = True) -> NodeStatus:
    """A hospital node's status, read from its kit and state folder.

    Parameters
    ----------
    kit_dir
        The hospital's kit folder.
    state_dir
        The node's state folder (default: the kit's ``state/``, where ``medsilo client start`` keeps it).
    accountant
        Opacus accountant for the ledger sums (``prv``, as ``medsilo site ledger``, or ``rdp``).
    probe
        Check the coordinator's certificate with a TLS handshake (a few seconds at most).

    Raises
    ------
    ConfigError
        When ``kit_dir`` is not a hospital kit or its site policy is invalid (the node would not start either).
    LedgerError
        When a ledger file is unreadable (the node refuses too; the message names the file and the fix).

    """
    kit = load_kit(kit_dir, insecure=True)  # identity and policy; the key and CA are checked below, as warnings
    folder = Path(state_dir).absolute() if state_dir is not None else kit.state
    problems = []
    for check in (lambda: crypto.check_node_private_key(kit.key, kit.public_key),
                  lambda: crypto.check_valid_now(kit.ca)):
        try:
            check()
        except MedsiloError as exc:
            problems.append(str(exc))
    try:
        ca_until: dt.datetime | None = crypto.certificate_not_after(kit.ca)
    except (MedsiloError, OSError, ValueError):
        ca_until = None
    node = read_state(folder)
    installed = site_code_digest()
    same = None if node.state != "connected" else node.site_code == installed
    coordinator = None
    if probe:
        try:
            coordinator = check_coordinator_certificate(kit, timeout=3.0)
        except MedsiloError as exc:
            coordinator = str(exc)
    sources, legacy = _ledgers(kit, folder, accountant)
    refused = tuple(sorted(p.name for p in (folder / "refused-apps").glob("*.fab")))
    return NodeStatus(kit=kit.root, site=kit.site, federation=kit.federation, superlink=kit.superlink,
                      state_dir=folder, node=node, policy=kit.policy, site_code=installed, runs_installed_code=same,
                      accountant=accountant, sources=sources, legacy=legacy, refused_apps=refused,
                      coordinator=coordinator, certificate_not_after=ca_until, problems=tuple(problems))
