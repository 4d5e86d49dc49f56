"""PRIVACY-CRITICAL: a site's durable privacy ledger, one per data source the hospital configured.

The unit of accounting is the *data source* (:func:`data_source`) as the hospital's node config names it, never
the dataset name or run key a coordinator sends. One append-only JSON-lines file per source
(``ledger-src-<hash>.jsonl`` in the node's state folder) holds a header, each run's plan, each Flower run's
binding to its run key, and every release's *reservation* (σ, q, steps of a DP-SGD round, a record count or a
validation release), fsynced before the data is touched, then its ``complete``. ε counts every reservation: the
ledger may over-state what was spent, never under-state it.

Every access holds an ``flock`` on the folder's ``ledger.lock`` and re-reads the file, so :meth:`Ledger.charge`
checks both budgets and reserves atomically across processes. An unreadable file (corrupt or incomplete line,
newer format) raises :class:`LedgerError` and is never rewritten. Ledgers of the previous format
(``ledger-<dataset>.jsonl``, no header) are read-only and count toward the lifetime of every source in the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from client.dp import accounting as privacy
from client.dp.accounting import HistoryEntry, PrivacyPlan
from client.pacs import is_dicomweb
from common.errors import DataError
from common.io import LockTimeout, append_jsonl, atomic_write_npz, locked, private_dir, read_npz

#: The ledger format this module writes; it reads this one and the previous, header-less one.
LEDGER_FORMAT = 2
LOCK_FILE = "ledger.lock"
_MECHANISM = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_KEEP = ("do not delete or edit the file: the ε it records would be forgotten")


class LedgerError(DataError):
    """Unreadable ledger, lock held past the timeout, or a ledger written by a newer format.

    The message names the file, what is wrong and the fix; the site refuses (nothing is written, no entry lost).
    """


@dataclass(frozen=True)
class DataSource:
    """The records a ledger accounts for."""

    #: ``src-`` and the first 16 hex digits of SHA-256 over the source's identity string.
    key: str
    #: What the hospital configured, for display: a path, or a URL without user-info, query and fragment.
    label: str


def _source(identity: str, label: str) -> DataSource:
    return DataSource("src-" + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16], label)


def _url_label(url: str) -> str:
    """``url`` with scheme and host in lower case and no credentials, query, fragment or trailing slash."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        raise DataError("the node's data-path is a URL with an invalid port; fix the data-path") from None
    host = (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme.lower(), host + (f":{port}" if port else ""), parts.path.rstrip("/"), "", ""))


def data_source(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> DataSource:
    """The data source this node reads, as the hospital configured it (never the coordinator's names).

    Parameters
    ----------
    node_config
        ``ledger-source`` (a name the hospital picks, e.g. to share one budget between two paths to the same
        records) wins over ``data-path`` (a file or folder, resolved to an absolute path, or a DICOMweb URL
        without credentials, query and fragment).
    run_config
        Read only in simulation: ``site-data-dir`` with the node's ``partition-id`` names its site file.

    Raises
    ------
    DataError
        When the node config names no data source.

    """
    name = str(node_config.get("ledger-source", "")).strip()
    if name:
        return _source(f"ledger-source:{name}", name)
    path = str(node_config.get("data-path", "")).strip()
    if path:
        if is_dicomweb(path):
            label = _url_label(path)
            return _source(f"dicomweb:{label}", label)
        resolved = str(Path(path).expanduser().resolve())
        return _source(f"path:{resolved}", resolved)
    if run_config.get("site-data-dir") and "partition-id" in node_config:
        from client.data import site_file

        resolved = str(site_file(str(run_config["site-data-dir"]), int(node_config["partition-id"])).resolve())
        return _source(f"path:{resolved}", resolved)
    raise DataError("this node names no data source for its privacy ledger: start it with --node-config "
                    "'data-path=\"/path/site.npz\"' (or 'ledger-source=\"NAME\"'), or run it inside `medsilo simulate`")


@dataclass(frozen=True)
class Charge:
    """Outcome of :meth:`Ledger.charge`."""

    #: Whether the release may go ahead (its reservation is on file).
    granted: bool
    #: Why not: which budget, ε now, ε it would reach, the budget and the fix.
    reason: str | None
    #: ε of the run and lifetime ε of the source after the charge (the current ones when refused).
    epsilon_run: float
    epsilon_lifetime: float
    #: An open reservation of the same (run, round, mechanism) already covered it: nothing new appended.
    reused: bool = False


_NUMBER = (int, float)
_LEGACY_RESERVE: dict[str, Any] = {"run": int, "sigma": _NUMBER, "q": _NUMBER, "steps": int}
#: Fields (and types) each kind of entry must have; of a legacy ledger only the reservations are read.
_FIELDS: dict[str, dict[str, Any]] = {
    "reserve": {**_LEGACY_RESERVE, "round": int}, "complete": {"run": int, "round": int},
    "claim": {"run": int, "round": int}, "plan": {"run": int, "plan": dict}, "bind": {"flower_run": int, "run": int},
}


def _valid(row: dict[str, Any], *, legacy: bool) -> bool:
    fields = (_LEGACY_RESERVE if row["kind"] == "reserve" else {}) if legacy else _FIELDS.get(row["kind"], {})
    return all(isinstance(row.get(k), t) and not isinstance(row.get(k), bool) for k, t in fields.items())


def _read(path: Path, *, legacy: bool = False) -> list[dict[str, Any]]:
    """Every line of a ledger file as a dict ([] when absent or empty); :class:`LedgerError` on any bad line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LedgerError(f"privacy ledger {path} cannot be read ({exc}); give this node read and write access "
                          "to its state folder") from None
    lines = raw.split(b"\n")
    if lines.pop() != b"":
        raise LedgerError(
            f"privacy ledger {path}: line {len(lines) + 1}, the last, is incomplete (an interrupted write); the site "
            "refuses until it is repaired. If that is the only damage, removing that incomplete line is safe (a "
            "reservation is complete before any data is touched); keep the rest, " + _KEEP)
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("kind"), str) or not _valid(row, legacy=legacy):
            raise LedgerError(f"privacy ledger {path}: line {number} is not a valid entry (corrupted or edited); "
                              f"the site refuses until it is restored from a backup; {_KEEP}")
        rows.append(row)
    return rows


def _header(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    fmt = row.get("format")
    if not isinstance(fmt, int):
        raise LedgerError(f"privacy ledger {path}: its header has no valid format number; restore it; {_KEEP}")
    if fmt > LEDGER_FORMAT:
        raise LedgerError(f"privacy ledger {path} was written in ledger format {fmt}, and this medsilo reads up to "
                          f"format {LEDGER_FORMAT}; upgrade medsilo on this node")
    return row


def _first_row(path: Path) -> dict[str, Any] | None:
    """The first line of ``path`` if it parses as a JSON object, else ``None``."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError), open(path, "rb") as handle:
        row = json.loads(handle.readline())
        return row if isinstance(row, dict) else None
    return None


def _legacy_rows(folder: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """Ledger files of the previous format in ``folder`` (no header) and their reservations."""
    files, rows = [], []
    for path in sorted(folder.glob("ledger-*.jsonl")):
        first = _first_row(path)
        if first is not None and first.get("kind") == "header":
            continue
        files.append(path)
        rows += [r for r in _read(path, legacy=True) if r["kind"] == "reserve"]
    return files, rows


def _check_mechanism(mechanism: str) -> None:
    if not _MECHANISM.fullmatch(mechanism):
        raise ValueError(f"mechanism {mechanism!r}: expected a short lower-case name such as 'dp-sgd'")


def _process(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process ``pid`` from ``/proc``, or ``None`` where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    proc = _process(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": proc[1] if proc else None,
            "thread": threading.current_thread().ident}


def _gone(owner: Any) -> bool:
    """Whether the call holding a reservation has certainly ended (another host, or unknown: it has not).

    Its process exited; or, in this process, its thread is the caller's (whose earlier call returned) or exited.
    """
    mine = _owner()
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or mine["start"] is None \
            or owner.get("host") != mine["host"]:
        return False
    if (owner["pid"], owner.get("start")) == (mine["pid"], mine["start"]):
        return owner.get("thread") == mine["thread"] or owner.get("thread") not in {
            t.ident for t in threading.enumerate()}
    proc = _process(owner["pid"])  # None: no such process; a zombie, or a new process under the same pid
    return proc is None or proc[0] == "Z" or proc[1] != owner.get("start")


class Ledger:
    """The privacy ledger of ``source`` in the node's state ``folder`` (created owner-only).

    ``lock_timeout``: seconds to wait for another process's lock before raising :class:`LedgerError`.
    """

    def __init__(self, folder: Path, source: DataSource, *, lock_timeout: float = 60.0) -> None:
        self.folder = Path(folder)
        self.source = source
        self.lock_timeout = lock_timeout
        self.path = self.folder / f"ledger-{source.key}.jsonl"

    # ------------------------------------------------------------------ file access
    @contextlib.contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        if not shared:
            private_dir(self.folder)
        lock = self.folder / LOCK_FILE
        try:
            with locked(lock, timeout=self.lock_timeout, shared=shared):
                yield
        except LockTimeout:
            raise LedgerError(
                f"{lock} is locked by another process for more than {self.lock_timeout:g} s; if no other medsilo "
                "node uses this state folder, find the process holding it (`fuser` on that file) and stop it; do not "
                "delete the lock file (a lock is released when its process exits)") from None

    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Entries of this source after the header, and the legacy ledgers' reservations, read now."""
        rows = _read(self.path)
        if rows:
            head = _header(self.path, rows[0]) if rows[0]["kind"] == "header" else None
            if head is None or head.get("source") != self.source.key:
                raise LedgerError(f"privacy ledger {self.path} does not start with this source's header (renamed, "
                                  f"copied or edited); restore it from a backup; {_KEEP}")
        return rows[1:], _legacy_rows(self.folder)[1]

    def _read_state(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if not self.folder.is_dir():
            return [], []
        with self._locked(shared=True):
            return self._load()

    def _append(self, row: dict[str, Any]) -> None:
        """Append ``row`` (the caller holds the lock), after the header if the file is new."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            append_jsonl(self.path, {"kind": "header", "format": LEDGER_FORMAT, "source": self.source.key,
                                     "label": self.source.label, "time": round(time.time(), 3)}, mode=0o600)
        append_jsonl(self.path, {**row, "time": round(time.time(), 3)}, mode=0o600)

    @staticmethod
    def _history(rows: list[dict[str, Any]], legacy: list[dict[str, Any]], run: int | None) -> list[HistoryEntry]:
        """Reservations of ``run`` (all when ``None``) here and in legacy ledgers (over-stating, never under)."""
        return [(float(r["sigma"]), float(r["q"]), int(r["steps"])) for r in [*rows, *legacy]
                if r["kind"] == "reserve" and (run is None or int(r["run"]) == run)]

    @staticmethod
    def _matches(row: dict[str, Any], run: int, server_round: int, mechanism: str) -> bool:
        return row["run"] == run and row["round"] == server_round and row.get("mechanism", "dp-sgd") == mechanism

    # ------------------------------------------------------------------ plans and runs
    def plan(self, run: int) -> PrivacyPlan | None:
        """The plan first recorded for ``run``, if any."""
        return self._plan(self._read_state()[0], run)

    def _plan(self, rows: list[dict[str, Any]], run: int) -> PrivacyPlan | None:
        names = {f.name for f in dataclasses.fields(PrivacyPlan)}
        for row in rows:
            if row["kind"] == "plan" and row.get("run") == run:
                try:
                    return PrivacyPlan(**{k: v for k, v in dict(row["plan"]).items() if k in names})
                except (KeyError, TypeError, ValueError):
                    raise LedgerError(f"privacy ledger {self.path}: the plan of run {run} is unreadable (edited); "
                                      f"restore the file from a backup; {_KEEP}") from None
        return None

    def plan_or_record(self, run: int, make: Callable[[], PrivacyPlan]) -> PrivacyPlan:
        """The plan recorded for ``run`` (the first one wins, across processes), else ``make()``'s, recorded.

        ``make`` runs under the ledger's lock: it must not use the ledger (that would wait for itself).
        """
        with self._locked():
            rows, _ = self._load()
            found = self._plan(rows, run)
            if found is not None:
                return found
            plan = make()
            self._append({"kind": "plan", "run": run, "plan": dataclasses.asdict(plan)})
            return plan

    def bind_run(self, flower_run: int, run_key: int) -> str | None:
        """Record that Flower run ``flower_run`` is run ``run_key``; a refusal reason if it is bound to another.

        One Flower run gets one per-run budget; a run key bound to another Flower run is allowed (a coordinator
        that restarted and resumed its run has a new Flower run id).
        """
        with self._locked():
            rows, _ = self._load()
            bound = next((r["run"] for r in rows if r["kind"] == "bind" and r["flower_run"] == flower_run), None)
            if bound is None:
                self._append({"kind": "bind", "flower_run": flower_run, "run": run_key})
            if bound is None or bound == run_key:
                return None
            return (f"the coordinator sent run-key {run_key} in Flower run {flower_run}, which this site already "
                    f"accounts as run {bound}: one Flower run gets one per-run privacy budget, so this request is "
                    "refused (start a new run from the coordinator)")

    # ------------------------------------------------------------------ releases
    def charge(self, *, run: int, server_round: int, mechanism: str, entry: HistoryEntry, epsilon: float,
               delta: float, lifetime_epsilon: float | None, lifetime_delta: float, accountant: str) -> Charge:
        """Check both budgets and reserve ``entry`` in one step, under the lock (nothing written when refused).

        Parameters
        ----------
        run, server_round, mechanism, entry
            The release (``mechanism``: ``"dp-sgd"``, ``"count"``, ``"validation"``) and its history entry.
        epsilon, delta, lifetime_epsilon, lifetime_delta
            The run's budget over its reservations, and the source's (``None``: none) over all, legacy included.
        accountant
            Opacus accountant, ``"prv"`` or ``"rdp"``.

        Returns
        -------
        Charge
            ``reused`` when an open reservation of the same release covering ``entry`` already counts it and the
            call holding it has ended (:func:`_gone`); a ``claim`` line (no ε) makes this call its holder. One
            held by a live call (another process or thread) is never reused: its release may still leave the
            site, so this one is charged again.

        """
        _check_mechanism(mechanism)
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        with self._locked():
            rows, legacy = self._load()
            run_history, lifetime_history = self._history(rows, legacy, run), self._history(rows, legacy, None)

            def eps(history: list[HistoryEntry], at: float) -> float:
                return privacy.epsilon_spent(history=history, delta=at, accountant=accountant)

            opened, owner = None, None  # the open reservation of this release, and the process that holds it
            for row in rows:
                if row["kind"] in ("reserve", "claim", "complete") and self._matches(row, run, server_round, mechanism):
                    opened = row if row["kind"] == "reserve" else None if row["kind"] == "complete" else opened
                    owner = row.get("owner")
            if opened is not None and (float(opened["sigma"]), float(opened["q"])) == (sigma, q) and \
                    int(opened["steps"]) >= steps and _gone(owner):
                self._append({"kind": "claim", "mechanism": mechanism, "run": run, "round": server_round,
                              "owner": _owner()})  # no ε: this process now holds the reservation
                return Charge(True, None, eps(run_history, delta), eps(lifetime_history, lifetime_delta), reused=True)
            what = f"the {mechanism} release of round {server_round} of run {run}"
            over, run_eps = privacy.would_exceed(history=run_history, next_entry=(sigma, q, steps), epsilon=epsilon,
                                                 delta=delta, accountant=accountant)
            if over:
                now = eps(run_history, delta)
                return Charge(False, (
                    f"{what} would raise the run's ε from {now:.3f} to {run_eps:.3f}, above its budget "
                    f"ε={epsilon:g} (δ={delta:g}); the run's budget is spent: start a new run with a larger ε or "
                    "fewer rounds"), now, eps(lifetime_history, lifetime_delta))
            life_eps = eps([*lifetime_history, (sigma, q, steps)], lifetime_delta)
            if lifetime_epsilon is not None and life_eps > lifetime_epsilon * (1 + privacy.BUDGET_TOLERANCE):
                now = eps(lifetime_history, lifetime_delta)
                return Charge(False, (
                    f"{what} would raise the lifetime ε of this site's data source {self.source.key} "
                    f"from {now:.3f} to {life_eps:.3f}, above the site's lifetime budget ε={lifetime_epsilon:g} "
                    f"(δ={lifetime_delta:g}); these records' budget is spent: release nothing more from them, "
                    "or have the hospital's privacy officer decide on the site policy's epsilon-lifetime"),
                    eps(run_history, delta), now)
            self._append({"kind": "reserve", "mechanism": mechanism, "run": run, "round": server_round,
                          "sigma": sigma, "q": q, "steps": steps, "owner": _owner()})
            return Charge(True, None, run_eps, life_eps)

    def complete(self, run: int, server_round: int, mechanism: str, *, steps: int, epsilon_run: float,
                 epsilon_lifetime: float) -> None:
        """Record that a reserved release finished: its actual steps and ε, for the record."""
        with self._locked():
            self._load()
            self._append({"kind": "complete", "mechanism": mechanism, "run": run, "round": server_round,
                          "steps": steps, "epsilon_run": epsilon_run, "epsilon_lifetime": epsilon_lifetime})

    def round_state(self, run: int, server_round: int, mechanism: str = "dp-sgd") -> str:
        """``"new"``, ``"reserved"`` (open reservation: trained partly or not at all) or ``"completed"``."""
        state = "new"
        for row in self._read_state()[0]:
            if row["kind"] in ("reserve", "complete") and self._matches(row, run, server_round, mechanism):
                state = "reserved" if row["kind"] == "reserve" else "completed"
        return state

    def history(self, run: int | None = None) -> list[HistoryEntry]:
        """Every reservation of ``run`` (of all runs when ``None``), every mechanism, legacy ledgers' included."""
        return self._history(*self._read_state(), run)

    def spent(self, *, delta: float, accountant: str, run: int | None = None) -> float:
        """ε at ``delta`` of the reserved history of ``run``, or of the source's lifetime."""
        return privacy.epsilon_spent(history=self.history(run), delta=delta, accountant=accountant)

    # ------------------------------------------------------------------ replay
    def _replay_path(self, mechanism: str) -> Path:
        _check_mechanism(mechanism)
        return self.folder / f"replay-{self.source.key}-{mechanism}.npz"

    def keep_for_replay(self, run: int, server_round: int, mechanism: str, model_digest: str,
                        arrays: list[np.ndarray], num_examples: int, metrics: dict[str, Any]) -> None:
        """Keep the last completed release of ``mechanism`` on the node (owner-only; it never leaves unasked)."""
        meta = {"run": run, "round": server_round, "mechanism": mechanism, "model_sha256": model_digest,
                "num_examples": num_examples, "metrics": metrics}
        private_dir(self.folder)
        atomic_write_npz(self._replay_path(mechanism), {f"u{i:04d}": np.asarray(a) for i, a in enumerate(arrays)},
                         meta, mode=0o600)

    def replay(self, run: int, server_round: int, mechanism: str,
               model_digest: str) -> tuple[list[np.ndarray], int, dict[str, Any]] | None:
        """The kept release of ``(run, round, mechanism)`` computed from the model ``model_digest``, if kept."""
        path = self._replay_path(mechanism)
        if not path.is_file():
            return None
        meta, arrays = read_npz(path)
        if (meta["run"], meta["round"], meta.get("mechanism"), meta["model_sha256"]) != \
                (run, server_round, mechanism, model_digest):
            return None
        return [arrays[k] for k in sorted(arrays)], int(meta["num_examples"]), dict(meta["metrics"])

    # ------------------------------------------------------------------ report
    def summary(self, *, delta: float | None = None, accountant: str) -> dict[str, Any]:
        """Source, file, runs, releases per mechanism, lifetime ε at ``delta`` and each run's ε at its plan's δ.

        ``delta=None``: the smallest δ the plans record, else 1e-5 (a run without a recorded δ is at ``delta``).
        """
        rows, legacy = self._read_state()
        deltas = {r["run"]: float(d) for r in rows if r["kind"] == "plan" and isinstance(d := r["plan"].get("delta"),
                                                                                         (int, float)) and d > 0}
        if delta is None:
            delta = min(deltas.values(), default=1e-5)
        reserves = [r for r in rows if r["kind"] == "reserve"]
        runs = sorted({int(r["run"]) for r in reserves})
        releases: dict[str, int] = {}
        for r in reserves:
            releases[r.get("mechanism", "dp-sgd")] = releases.get(r.get("mechanism", "dp-sgd"), 0) + 1

        def eps(run: int | None, at: float) -> float:
            return privacy.epsilon_spent(history=self._history(rows, legacy, run), delta=at, accountant=accountant)

        return {"source": self.source.key, "label": self.source.label, "file": self.path.name, "delta": delta,
                "runs": len(runs), "releases": releases, "legacy_releases": len(legacy),
                "epsilon_lifetime": eps(None, delta),
                "per_run": {run: eps(run, deltas.get(run, delta)) for run in runs}}


def ledgers_in(folder: Path, *, lock_timeout: float = 60.0) -> tuple[list[Ledger], list[Path]]:
    """The ledgers of every data source in ``folder`` (from their headers) and the legacy ledger files."""
    ledgers = []
    for path in sorted(Path(folder).glob("ledger-*.jsonl")):
        first = _first_row(path)
        if first is not None and first.get("kind") == "header":
            _header(path, first)
            ledgers.append(Ledger(Path(folder), DataSource(str(first.get("source")), str(first.get("label"))),
                                  lock_timeout=lock_timeout))
    return ledgers, _legacy_rows(Path(folder))[0]


def legacy_summary(path: Path, *, delta: float, accountant: str) -> dict[str, Any]:
    """Runs, reservations and ε at ``delta`` of a legacy ledger file (read-only)."""
    reserves = [r for r in _read(path, legacy=True) if r["kind"] == "reserve"]
    history = [(float(r["sigma"]), float(r["q"]), int(r["steps"])) for r in reserves]
    return {"file": path.name, "dataset": path.stem.removeprefix("ledger-"), "delta": delta,
            "runs": len({int(r["run"]) for r in reserves}), "releases": len(reserves),
            "epsilon": privacy.epsilon_spent(history=history, delta=delta, accountant=accountant)}
