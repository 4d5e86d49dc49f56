"""``medsilo status`` at the coordinator: sites, their connections, runs, the certificate, the SuperLink itself.

:func:`coordinator_status` reads, without changing anything:

- the kit's sites: every hospital key in ``nodes/`` (authorised) and ``revoked/``, with its fingerprint and its
  entry in the site registry (``state/registry.json``, written by :func:`server.superlink.sync`);
- each registered site's connection, from Flower's node table in ``state/superlink.db`` (opened read-only): a
  node is connected while its last heartbeat is younger than Flower's patience (``online_until`` in the future),
  and its last heartbeat is ``online_until`` less that patience;
- whether the SuperLink answers its HTTPS health endpoint (a stopped SuperLink is an answer, not an error);
- the runs, from ``flwr ls`` over the kit's TLS connection, when the SuperLink is running;
- the SuperLink certificate's expiry, with a warning from :data:`CERTIFICATE_WARNING_DAYS` days before it.

The result renders as plain lines (:meth:`CoordinatorStatus.lines`) or JSON (:meth:`CoordinatorStatus.to_json`).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import crypto
from common.errors import MedsiloError
from common.io import owner_only_umask
from server.federation import format_address
from server.superlink import CoordinatorKit, flwr_json, load_kit, read_registry

#: Days before the SuperLink certificate expires from which the status warns.
CERTIFICATE_WARNING_DAYS = 30

#: Flower's ``HEARTBEAT_PATIENCE``: a node stays online for this many heartbeat intervals after its last one.
HEARTBEAT_PATIENCE = 2


@dataclass(frozen=True)
class SiteStatus:
    """One hospital of the coordinator kit and its connection."""

    name: str
    #: ``SHA256:...`` of its node key (as ``ssh-keygen -lf`` prints it), or ``None`` when unreadable.
    fingerprint: str | None
    #: ``"authorised"`` (key in ``nodes/``) or ``"revoked"`` (key in ``revoked/``).
    key: str
    #: The SuperLink's node ID once :func:`server.superlink.sync` registered the key, else ``None``.
    node_id: int | None
    #: ``"connected"``, ``"offline"``, ``"never connected"``, ``"unregistered"``, ``"not registered"``,
    #: ``"missing"`` (registered, but not in the SuperLink's database) or ``"unknown"`` (no database to read).
    state: str
    #: The site's last heartbeat (connected) or when the SuperLink marked it offline (UTC).
    last_seen: dt.datetime | None = None
    #: When its current or last connection began (UTC).
    connected_since: dt.datetime | None = None

    @property
    def connected(self) -> bool:
        return self.state == "connected"


@dataclass(frozen=True)
class RunStatus:
    """One Flower run, as ``flwr ls`` reports it."""

    run_id: str
    app: str
    status: str
    elapsed: str
    changed: str


@dataclass(frozen=True)
class CoordinatorStatus:
    """What :func:`coordinator_status` found."""

    kit: Path
    federation: str
    address: str
    running: bool
    #: Why the SuperLink is taken as running or not (one sentence).
    running_detail: str
    certificate_not_after: dt.datetime | None
    sites: tuple[SiteStatus, ...]
    #: Runs from ``flwr ls`` (``None``: not asked, the SuperLink being stopped, or it failed: see ``runs_error``).
    runs: tuple[RunStatus, ...] | None
    runs_error: str | None = None
    #: Node IDs in the SuperLink's database that no site of the kit's registry holds.
    unknown_nodes: tuple[int, ...] = ()
    #: Problems reading the kit or the database (the rest of the status is still reported).
    problems: tuple[str, ...] = ()
    checked_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def certificate_days_left(self) -> float | None:
        if self.certificate_not_after is None:
            return None
        return (self.certificate_not_after - self.checked_at).total_seconds() / 86400

    @property
    def warnings(self) -> list[str]:
        """What needs the coordinator's attention."""
        out = []
        days = self.certificate_days_left
        if days is not None and days < 0:
            out.append(f"the SuperLink certificate {self.kit / 'server.crt'} EXPIRED on "
                       f"{self.certificate_not_after:%Y-%m-%d}: no hospital can connect; renew it with the same CA")
        elif days is not None and days < CERTIFICATE_WARNING_DAYS:
            out.append(f"the SuperLink certificate expires in {days:.0f} day(s), on "
                       f"{self.certificate_not_after:%Y-%m-%d}; renew it with the same CA before then")
        pending = [s.name for s in self.sites if s.key == "authorised" and s.state == "not registered"]
        if pending:
            out.append(f"site(s) {', '.join(pending)} have a key in nodes/ but are not registered on the SuperLink: "
                       "run `medsilo server sync --kit KIT` (or restart the SuperLink)")
        missing = [s.name for s in self.sites if s.state == "missing"]
        if missing:
            out.append(f"the SuperLink database does not know the registered node(s) of {', '.join(missing)} (was "
                       "state/superlink.db replaced?); remove their entries from state/registry.json, then run "
                       "`medsilo server sync --kit KIT`")
        still = [s.name for s in self.sites if s.key == "revoked" and s.state not in ("unregistered", "not registered")]
        if still:
            out.append(f"revoked site(s) {', '.join(still)} are still registered on the SuperLink: run "
                       "`medsilo server sync --kit KIT`")
        return out + list(self.problems)

    def lines(self) -> list[str]:
        """The status as plain text, one item a line."""
        out = [f"coordinator of federation '{self.federation}' ({self.kit})",
               f"superlink: {'running' if self.running else 'not running'} on {self.address} ({self.running_detail})"]
        if self.certificate_not_after is not None:
            out.append(f"certificate: valid until {self.certificate_not_after:%Y-%m-%d %H:%M}Z "
                       f"({self.certificate_days_left:.0f} days left)")
        connected = sum(s.connected for s in self.sites)
        out.append(f"sites: {len(self.sites)} in the kit, {connected} connected")
        for s in self.sites:
            when = (f", last seen {_iso(s.last_seen)}" if s.last_seen else "") + \
                (f", connected since {_iso(s.connected_since)}" if s.connected and s.connected_since else "")
            node = f"node {s.node_id}" if s.node_id is not None else "no node ID"
            out.append(f"site {s.name}: {s.state}{when} ({s.key} key {s.fingerprint or '?'}, {node})")
        out += [f"unknown node {n}: in the SuperLink's database, in no site of the registry"
                for n in self.unknown_nodes]
        if self.runs is not None:
            out.append(f"runs: {len(self.runs)}")
            out += [f"run {r.run_id}: {r.status} ({r.app}, elapsed {r.elapsed}, changed {r.changed})"
                    for r in self.runs]
        else:
            out.append(f"runs: {self.runs_error or 'not listed'}")
        out += [f"WARNING: {w}" for w in self.warnings]
        return out

    def as_dict(self) -> dict[str, Any]:
        """The status as JSON-ready values (times in ISO 8601, UTC)."""
        out = {k: _plain(v) for k, v in asdict(self).items()}
        out["role"] = "coordinator"
        out["certificate_days_left"] = self.certificate_days_left
        out["warnings"] = self.warnings
        for site, raw in zip(self.sites, out["sites"], strict=True):
            raw["connected"] = site.connected
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------ probes
def probe(kit: CoordinatorKit, *, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the SuperLink answers its health endpoint on loopback, over TLS verified with the kit's CA."""
    url = f"https://{kit.local_address}/health"
    try:
        with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(kit.ca)),
                                    timeout=timeout) as response:
            return response.status == 200, f"{url} answered {response.status}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            return True, f"it answers on {kit.local_address} but its certificate does not verify: " \
                         f"{reason.verify_message or reason}"
        if isinstance(reason, ConnectionRefusedError):
            return False, f"nothing listens on {kit.local_address}; start it with `medsilo server start --kit KIT`"
        return False, f"{url} did not answer ({reason})"
    except (ConnectionError, TimeoutError, OSError) as exc:
        return False, f"{url} did not answer ({exc})"


def _uint64(value: int) -> int:
    """A node ID as Flower shows it (its database stores the unsigned 64-bit ID as a signed one)."""
    return value + (1 << 64) if value < 0 else value


def _utc(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def read_nodes(database: Path) -> dict[int, dict[str, Any]]:
    """Flower's node table in ``database``, read-only: node ID -> its row (status, times, heartbeat).

    Raises
    ------
    MedsiloError
        When the file is not a SuperLink state database this medsilo can read.

    """
    columns = ("node_id", "status", "registered_at", "last_activated_at", "last_deactivated_at",
               "unregistered_at", "online_until", "heartbeat_interval")
    try:
        # Read-only; SQLite may still create the WAL index beside it: owner-only, as the SuperLink's own files.
        with owner_only_umask():
            connection = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                rows = connection.execute(f"SELECT {', '.join(columns)} FROM node").fetchall()
            finally:
                connection.close()
    except sqlite3.Error as exc:
        raise MedsiloError(f"the SuperLink database {database} cannot be read ({exc}); it was written by another "
                           "Flower version or is damaged") from None
    return {_uint64(int(row[0])): dict(zip(columns, row, strict=True)) for row in rows if row[0] is not None}


def _connection(row: dict[str, Any] | None, now: dt.datetime,
                running: bool) -> tuple[str, dt.datetime | None, dt.datetime | None]:
    """(state, last seen, connected since) of a node row (``None``: the database does not know the node).

    A node is connected while the SuperLink runs and the node's heartbeat is within Flower's patience; its last
    heartbeat is ``online_until`` less that patience. An offline node was last seen when the SuperLink marked it
    offline (on its goodbye, or when its patience ran out).
    """
    if row is None:  # the registry names a node the database lacks (a replaced database)
        return "missing", None, None
    status = str(row["status"])
    since = _utc(row["last_activated_at"])
    until, interval = row["online_until"], row["heartbeat_interval"]
    if status == "unregistered":
        return "unregistered", _utc(row["last_deactivated_at"]), None
    if status == "registered" and since is None:
        return "never connected", None, None
    if status == "online" and until is not None:
        beat = min(now, dt.datetime.fromtimestamp(float(until) - HEARTBEAT_PATIENCE * float(interval or 0), dt.UTC))
        # Past its patience, or the SuperLink stopped: Flower marks it offline when it next looks.
        return ("connected" if running and float(until) > now.timestamp() else "offline"), beat, since
    gone = _utc(row["last_deactivated_at"])
    if gone is None and until is not None:
        gone = dt.datetime.fromtimestamp(float(until), dt.UTC)
    return "offline", gone, since


def _runs(kit: CoordinatorKit) -> tuple[tuple[RunStatus, ...] | None, str | None]:
    try:
        out = flwr_json(kit, "ls")
    except (MedsiloError, OSError, TimeoutError) as exc:
        return None, f"`flwr ls` failed ({exc})"
    if not out.get("success"):
        return None, f"`flwr ls` failed: {out.get('error-message', out)}"
    runs = []
    for r in out.get("runs", []):
        status = str(r.get("status", "?"))
        changed = next((r[k] for k in ("finished-at", "running-at", "starting-at", "pending-at") if r.get(k)), "")
        runs.append(RunStatus(run_id=str(r.get("run-id")), app=f"{r.get('fab-id', '?')}=={r.get('fab-version', '?')}",
                              status=status, elapsed=str(r.get("elapsed", "")), changed=str(changed)))
    return tuple(runs), None


# ------------------------------------------------------------------------------ the status
def coordinator_status(kit_dir: str | Path, *, list_runs: bool = True) -> CoordinatorStatus:
    """The coordinator's status, read from its kit, its SuperLink database and (when running) the SuperLink.

    Parameters
    ----------
    kit_dir
        The coordinator kit folder (``kits/coordinator``).
    list_runs
        Ask a running SuperLink for its runs (``flwr ls``, a few seconds).

    Raises
    ------
    ConfigError
        When ``kit_dir`` is not a coordinator kit.

    """
    kit = load_kit(kit_dir, check_tls=False)  # an expired certificate is reported, not refused
    problems: list[str] = []
    try:
        not_after: dt.datetime | None = crypto.certificate_not_after(kit.certificate)
    except (MedsiloError, OSError, ValueError) as exc:
        not_after = None
        problems.append(f"the SuperLink certificate {kit.certificate} cannot be read ({exc}); restore it from the kit")
    running, detail = probe(kit)
    registry = read_registry(kit)
    nodes: dict[int, dict[str, Any]] | None = None
    if kit.database.is_file():
        try:
            nodes = read_nodes(kit.database)
        except MedsiloError as exc:
            problems.append(str(exc))
    now = dt.datetime.now(dt.UTC)  # after the read: every heartbeat it holds came before this moment
    sites = []
    keys = [(p, "authorised") for p in sorted((kit.root / "nodes").glob("*.pub"))] + \
        [(p, "revoked") for p in sorted((kit.root / "revoked").glob("*.pub"))]
    for pub, key in keys:
        try:
            fingerprint: str | None = crypto.public_key_fingerprint(pub.read_bytes())
        except (MedsiloError, OSError):
            fingerprint = None
            problems.append(f"{pub} is not a readable OpenSSH public key; restore it from the kits folder")
        entry = registry.get(pub.stem, {})
        node_id = int(entry["node_id"]) if entry.get("node_id") is not None and (
            entry.get("fingerprint") in (None, fingerprint)) else None
        if node_id is None:
            state, seen, since = "not registered", None, None
        elif nodes is None:
            state, seen, since = "unknown", None, None
        else:
            state, seen, since = _connection(nodes.get(node_id), now, running)
        sites.append(SiteStatus(name=pub.stem, fingerprint=fingerprint, key=key, node_id=node_id, state=state,
                                last_seen=seen, connected_since=since))
    if nodes is None and not kit.database.is_file():
        detail += "; no SuperLink database yet (it was never started from this kit)"
    known = {s.node_id for s in sites}
    unknown = tuple(sorted(n for n, row in (nodes or {}).items() if n not in known and row["status"] != "unregistered"))
    runs: tuple[RunStatus, ...] | None = None
    runs_error: str | None = "none listed (the SuperLink is not running)"
    if running and list_runs:
        runs, runs_error = _runs(kit)
    elif running:
        runs_error = "not asked"
    return CoordinatorStatus(kit=kit.root, federation=kit.federation, address=format_address(kit.bind, kit.port),
                             running=running, running_detail=detail, certificate_not_after=not_after,
                             sites=tuple(sites), runs=runs, runs_error=runs_error, unknown_nodes=unknown,
                             problems=tuple(problems), checked_at=now)
