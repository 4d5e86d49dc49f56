"""Append-only, hash-chained audit logs: what left a site, what the coordinator received and aggregated.

Each line is a JSON object with ``seq`` (0, 1, ...), ``prev`` (the previous line's ``hash``; 64 zeros for
the first) and ``hash`` = SHA-256 of the line's canonical JSON without ``hash``. Editing a line breaks its
hash, deleting or reordering lines breaks ``seq`` and ``prev``, and a companion ``<log>.head`` file
(rewritten atomically after every append) records the last ``seq`` and ``hash`` so that cutting lines off
the end is detected too. Lines are appended and fsynced: a crash loses at most the line being written.
Appending holds an exclusive lock on ``<log>.lock`` around reading the last line and writing the next, so
processes sharing one log (a node's ClientApp runs) never give two lines one sequence number.

Records hold no PHI: identifiers of runs and rounds, byte counts, digests, ε, and policy decisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.io import LockTimeout, atomic_write_json, fsync_dir, locked

GENESIS = "0" * 64
#: Seconds :func:`append` waits for another process's append to the same log.
LOCK_TIMEOUT = 60.0


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of ``entry`` without its ``hash`` field, over canonical JSON."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def digest(*chunks: bytes) -> str:
    """SHA-256 of the concatenated ``chunks`` (for update payloads)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _last_entry(path: Path) -> dict[str, Any] | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        block = min(size, 1 << 16)
        while True:
            handle.seek(size - block)
            tail = handle.read(block)
            lines = [line for line in tail.split(b"\n") if line.strip()]
            if len(lines) > 1 or block == size:
                break
            block = min(size, block * 4)
    if not tail.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is incomplete (interrupted write); run `medsilo audit verify {path}`")
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


class AuditError(Exception):
    """An audit log cannot be appended to or does not verify."""


def append(path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` (JSON-serialisable, no ``seq``/``prev``/``hash`` keys) and return the chained entry.

    Raises :class:`AuditError` when another process holds the log's lock for more than ``LOCK_TIMEOUT`` s.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:
        with locked(lock, timeout=LOCK_TIMEOUT):
            return _append_locked(path, record)
    except LockTimeout:
        raise AuditError(
            f"{lock} is locked by another process for more than {LOCK_TIMEOUT:g} s; if no other medsilo process "
            "writes this audit log, find the one holding the lock (`fuser` on that file) and stop it (do not "
            "delete the lock file: the lock is released when its process exits)"
        ) from None


def _append_locked(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    last = _last_entry(path)
    entry: dict[str, Any] = {
        "seq": 0 if last is None else int(last["seq"]) + 1,
        "time": round(time.time(), 3),
        **record,
        "prev": GENESIS if last is None else str(last["hash"]),
    }
    entry["hash"] = entry_hash(entry)
    created = not path.exists()
    with open(path, "ab") as handle:
        handle.write(_canonical(entry) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)
    atomic_write_json(_head_path(path), {"seq": entry["seq"], "hash": entry["hash"]})
    return entry


@dataclass
class Verification:
    """Outcome of :func:`verify`: ``ok`` and, when not, every problem found (line numbers are 1-based)."""

    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path) -> Verification:
    """Check every line's hash, the sequence, the chain, and the head file."""
    path = Path(path)
    result = Verification()
    if not path.is_file():
        result.problems.append(f"{path} does not exist")
        return result
    prev, expected_seq = GENESIS, 0
    last: dict[str, Any] | None = None
    with open(path, "rb") as handle:
        raw_lines = handle.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    else:
        result.problems.append(f"line {len(raw_lines)}: incomplete last line (interrupted or truncated write)")
    for number, raw in enumerate(raw_lines, start=1):
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            result.problems.append(f"line {number}: not valid JSON (edited or corrupted)")
            continue
        if not isinstance(entry, dict) or entry_hash(entry) != entry.get("hash"):
            result.problems.append(f"line {number}: content does not match its hash (edited)")
        if entry.get("seq") != expected_seq:
            result.problems.append(
                f"line {number}: sequence number {entry.get('seq')} where {expected_seq} was expected "
                "(a line was deleted, inserted or moved)"
            )
        if entry.get("prev") != prev:
            result.problems.append(f"line {number}: does not chain to the line before it (deleted or reordered)")
        prev = str(entry.get("hash"))
        seq = entry.get("seq")
        expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
        last = entry
        result.entries += 1
    head = _head_path(path)
    if head.is_file():
        recorded = json.loads(head.read_text())
        if last is None or recorded.get("hash") != last.get("hash") or recorded.get("seq") != last.get("seq"):
            result.problems.append(
                f"{head.name} records entry {recorded.get('seq')} as the last one, the log ends at "
                f"{None if last is None else last.get('seq')} (lines were cut off the end or the log was replaced)"
            )
    else:
        result.problems.append(f"{head.name} is missing: cannot tell whether lines were cut off the end")
    return result
