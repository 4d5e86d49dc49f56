"""Append-only, hash-chained audit logs: what left a site, what the coordinator received and aggregated.

Each line is a JSON object with ``seq`` (0, 1, ...), ``prev`` (the previous line's ``hash``; 64 zeros for
the first) and ``hash`` = SHA-256 of the line's canonical JSON without ``hash``. Editing a line breaks its
hash, deleting or reordering lines breaks ``seq`` and ``prev``, and a companion ``<log>.head`` file
(rewritten atomically after every append) records the last ``seq`` and ``hash`` so that cutting lines off
the end is detected too. Lines are appended and fsynced: a crash loses at most the line being written.
Appending holds an exclusive lock on ``<log>.lock`` around reading the last line and writing the next, so
processes sharing one log (a node's ClientApp runs) never give two lines one sequence number.

Signed logs. A plain hash chain only detects accidents and careless edits: anyone who can write the file can
edit a line, recompute every later ``hash`` and rewrite ``<log>.head``, and the forgery verifies. Given a
:class:`common.crypto.Signer` (a site's ``node.key``, the coordinator's ``server.key``), :func:`append` adds
``key`` (the signer's fingerprint) and ``sig`` to each line: ``hash`` is computed over the line without
``hash`` and ``sig`` (so it covers ``key``, ``prev`` and, through ``prev``, every earlier line) and ``sig`` is
an ECDSA signature over ``ENTRY_CONTEXT + hash``. The head file then also carries ``key`` and ``sig`` over
``HEAD_CONTEXT`` + canonical ``{"hash", "seq"}``. :func:`verify` with the matching
:class:`common.crypto.Verifier` (``node.pub``, ``server.crt``) requires every line and the head to carry a
valid signature by that key; without one it checks the chain only and reports who signed what, unverified.
Logs written before signing existed (no ``key``/``sig``) still verify without a key.

What a signature proves, and what it does not:

* it proves which key wrote each line: editing, inserting or re-chaining lines without the private key is
  detected (under ``--key``);
* it cannot stop the key's holder (or anyone who has copied the key file) from rewriting the whole log and
  signing it again: protect ``node.key`` / ``server.key`` (mode 0600) and keep copies of the log elsewhere;
* it cannot detect a rollback: an attacker who replaces the log and ``.head`` with an older, genuinely
  signed copy (cutting the newest lines off) passes verification. Only an earlier copy of ``.head`` (or of
  the log) kept out of the attacker's reach — backups, an offsite copy, the coordinator's own log — shows
  that ``seq`` once went further.

Records hold no PHI: identifiers of runs and rounds, byte counts, digests, ε, and policy decisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import MedsiloError
from common.io import LockTimeout, atomic_write_json, fsync_dir, locked, private_dir

if TYPE_CHECKING:
    from common.crypto import Signer, Verifier

GENESIS = "0" * 64
#: Seconds :func:`append` waits for another process's append to the same log.
LOCK_TIMEOUT = 60.0
#: What an entry's ``sig`` signs, followed by the entry's ``hash`` (ASCII hex): a context string keeps an audit
#: signature from being valid for any other use of the same key (SuperNode authentication, TLS).
ENTRY_CONTEXT = b"medsilo audit entry v1\n"
#: What the head's ``sig`` signs, followed by canonical JSON of ``{"hash": ..., "seq": ...}``.
HEAD_CONTEXT = b"medsilo audit head v1\n"
#: Keys :func:`append` writes itself; a record may not carry them.
RESERVED = frozenset({"seq", "prev", "hash", "key", "sig"})
#: Fields excluded from an entry's hash: the hash itself and the signature over it.
_UNHASHED = frozenset({"hash", "sig"})


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of ``entry`` without its ``hash`` and ``sig`` fields, over canonical JSON (``key`` is covered)."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in _UNHASHED})).hexdigest()


def entry_message(entry_hash_hex: str) -> bytes:
    """The bytes an entry's ``sig`` signs: :data:`ENTRY_CONTEXT` and the entry's ``hash``."""
    return ENTRY_CONTEXT + entry_hash_hex.encode("ascii")


def head_message(seq: int, entry_hash_hex: str) -> bytes:
    """The bytes the head's ``sig`` signs: :data:`HEAD_CONTEXT` and canonical ``{"hash", "seq"}``."""
    return HEAD_CONTEXT + _canonical({"hash": entry_hash_hex, "seq": seq})


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


class AuditError(MedsiloError):
    """An audit log cannot be appended to or does not verify."""


def append(path: str | Path, record: dict[str, Any], *, signer: Signer | None = None) -> dict[str, Any]:
    """Append ``record`` and return the chained entry as written.

    Parameters
    ----------
    path
        The log (``audit.jsonl``); its ``.head`` and ``.lock`` files sit beside it.
    record
        JSON-serialisable, without the keys in :data:`RESERVED`.
    signer
        When given (:func:`common.crypto.load_signer` of ``node.key`` or ``server.key``), the entry carries
        ``key`` and ``sig`` and the head is signed too.

    Raises
    ------
    AuditError
        ``record`` uses a reserved key, the log's last line is incomplete, or another process holds the log's
        lock for more than ``LOCK_TIMEOUT`` s.

    """
    path = Path(path)
    clash = sorted(RESERVED & record.keys())
    if clash:
        raise AuditError(
            f"audit record uses reserved key(s) {', '.join(clash)}; append() writes {', '.join(sorted(RESERVED))} "
            "itself: rename those fields in the record"
        )
    private_dir(path.parent)
    lock = path.with_name(path.name + ".lock")
    try:
        with locked(lock, timeout=LOCK_TIMEOUT):
            return _append_locked(path, record, signer)
    except LockTimeout:
        raise AuditError(
            f"{lock} is locked by another process for more than {LOCK_TIMEOUT:g} s; if no other medsilo process "
            "writes this audit log, find the one holding the lock (`fuser` on that file) and stop it (do not "
            "delete the lock file: the lock is released when its process exits)"
        ) from None


def _append_locked(path: Path, record: dict[str, Any], signer: Signer | None) -> dict[str, Any]:
    last = _last_entry(path)
    entry: dict[str, Any] = {
        "seq": 0 if last is None else int(last["seq"]) + 1,
        "time": round(time.time(), 3),
        **record,
        "prev": GENESIS if last is None else str(last["hash"]),
    }
    if signer is not None:
        entry["key"] = signer.fingerprint
    entry["hash"] = entry_hash(entry)
    head: dict[str, Any] = {"seq": entry["seq"], "hash": entry["hash"]}
    if signer is not None:
        entry["sig"] = signer.sign(entry_message(entry["hash"]))
        head["key"] = signer.fingerprint
        head["sig"] = signer.sign(head_message(entry["seq"], entry["hash"]))
    created = not path.exists()
    # Owner-only: the log names runs, rounds and what the site decided.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as handle:
        handle.write(_canonical(entry) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)
    atomic_write_json(_head_path(path), head)
    return entry


@dataclass
class Verification:
    """Outcome of :func:`verify`: ``ok`` and, when not, every problem found (line numbers are 1-based).

    Attributes
    ----------
    entries
        Lines read.
    problems
        Each one makes the log fail verification; names the line (or the head file) and what is wrong.
    notes
        Information that does not fail verification: an unsigned log, signatures present but not checked,
        the rollback caveat.
    signers
        Fingerprint -> number of lines naming it in ``key``. Checked cryptographically only when
        :func:`verify` was given a key (then ``key`` is that key's fingerprint).
    unsigned
        Lines without ``key`` and ``sig``.
    key
        Fingerprint of the key every signature was checked against, or ``None``.

    """

    entries: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signers: dict[str, int] = field(default_factory=dict)
    unsigned: int = 0
    key: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def signed(self) -> int:
        """Lines that name a signing key."""
        return sum(self.signers.values())

    def signing_summary(self) -> str:
        """One phrase on signatures, e.g. ``every entry signed by SHA256:...`` (meaningful when ``ok``)."""
        if self.key is not None:
            return f"every entry signed by {self.key}"
        if not self.signers:
            return "unsigned"
        by = ", ".join(f"{fp} ({n})" for fp, n in sorted(self.signers.items()))
        return f"{self.signed} of {self.entries} entries signed by {by}, signatures NOT checked"


def _read_head(head: Path, result: Verification) -> dict[str, Any] | None:
    if not head.is_file():
        result.problems.append(f"{head.name} is missing: cannot tell whether lines were cut off the end")
        return None
    try:
        recorded = json.loads(head.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        result.problems.append(f"{head.name} is not a JSON object (edited or corrupted)")
        return None
    return recorded


def _check_entry_signature(number: int, entry: dict[str, Any], key: Verifier | None, result: Verification) -> bool:
    """Record the line's signer; with ``key``, check its signature. Return whether the line names a signer."""
    fingerprint, signature = entry.get("key"), entry.get("sig")
    if fingerprint is None and signature is None:
        result.unsigned += 1
        if key is not None:
            result.problems.append(f"line {number}: unsigned, but every entry must be signed by {key.fingerprint}")
        return False
    if not isinstance(fingerprint, str) or not isinstance(signature, str):
        missing = "sig" if fingerprint is not None else "key"
        result.problems.append(f"line {number}: has a malformed or missing `{missing}` (a signature was stripped "
                               "or the line was edited)")
        return fingerprint is not None
    result.signers[fingerprint] = result.signers.get(fingerprint, 0) + 1
    if key is None:
        return True
    if not key.matches(fingerprint):
        result.problems.append(f"line {number}: signed by {fingerprint}, not by the given key {key.fingerprint}")
        return True
    try:
        key.verify(entry_message(str(entry.get("hash"))), signature)
    except MedsiloError:
        result.problems.append(
            f"line {number}: signature does not verify with {key.fingerprint} (the line or an earlier one was "
            "edited and re-hashed, or the signature was forged)"
        )
    return True


def _check_head_signature(head: Path, recorded: dict[str, Any], last_signed: bool, key: Verifier | None,
                          result: Verification) -> None:
    fingerprint, signature = recorded.get("key"), recorded.get("sig")
    if fingerprint is None and signature is None:
        if key is not None:
            result.problems.append(f"{head.name} is unsigned, but it must be signed by {key.fingerprint}")
        elif last_signed:
            result.notes.append(f"{head.name} is unsigned although the last entry is signed (check with a key)")
        return
    if not isinstance(fingerprint, str) or not isinstance(signature, str):
        result.problems.append(f"{head.name} has a malformed or missing `key`/`sig` (edited)")
        return
    if key is None:
        return
    if not key.matches(fingerprint):
        result.problems.append(f"{head.name} is signed by {fingerprint}, not by the given key {key.fingerprint}")
        return
    seq, head_hash = recorded.get("seq"), recorded.get("hash")
    if not isinstance(seq, int) or not isinstance(head_hash, str):
        result.problems.append(f"{head.name} has no valid `seq`/`hash` to check its signature against (edited)")
        return
    try:
        key.verify(head_message(seq, head_hash), signature)
    except MedsiloError:
        result.problems.append(
            f"{head.name}: signature does not verify with {key.fingerprint} (edited, or rewritten without the key)"
        )


def verify(path: str | Path, *, key: Verifier | None = None) -> Verification:
    """Check every line's hash, the sequence, the chain and the head file; with ``key``, every signature.

    Parameters
    ----------
    path
        The log.
    key
        The public key the log must be signed with (:func:`common.crypto.load_verifier` of a site's
        ``node.pub`` or the coordinator's ``server.crt``). Then an unsigned line, a line signed by another key,
        a bad signature, or an unsigned or badly signed head is a problem. Without it, signatures are counted
        per fingerprint but not checked: a rewritten log with recomputed hashes passes.

    Returns
    -------
    Verification
        ``ok`` when no problem was found.

    """
    path = Path(path)
    result = Verification(key=None if key is None else key.fingerprint)
    if not path.is_file():
        result.problems.append(f"{path} does not exist")
        return result
    prev, expected_seq = GENESIS, 0
    last: dict[str, Any] | None = None
    last_signed = seen_signed = False
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
        if not isinstance(entry, dict):
            result.problems.append(f"line {number}: not a JSON object (edited or corrupted)")
            continue
        if entry_hash(entry) != entry.get("hash"):
            result.problems.append(f"line {number}: content does not match its hash (edited)")
        if entry.get("seq") != expected_seq:
            result.problems.append(
                f"line {number}: sequence number {entry.get('seq')} where {expected_seq} was expected "
                "(a line was deleted, inserted or moved)"
            )
        if entry.get("prev") != prev:
            result.problems.append(f"line {number}: does not chain to the line before it (deleted or reordered)")
        last_signed = _check_entry_signature(number, entry, key, result)
        if seen_signed and not last_signed and key is None:
            result.notes.append(f"line {number}: unsigned after signed lines (written without the key; check with "
                                "a key)")
        seen_signed = seen_signed or last_signed
        prev = str(entry.get("hash"))
        seq = entry.get("seq")
        expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
        last = entry
        result.entries += 1
    head = _head_path(path)
    recorded = _read_head(head, result)
    if recorded is not None:
        if last is None or recorded.get("hash") != last.get("hash") or recorded.get("seq") != last.get("seq"):
            result.problems.append(
                f"{head.name} records entry {recorded.get('seq')} as the last one, the log ends at "
                f"{None if last is None else last.get('seq')} (lines were cut off the end or the log was replaced)"
            )
        _check_head_signature(head, recorded, last_signed, key, result)
    if key is None and result.entries and not result.signers:
        result.notes.append(
            "the log is unsigned: the chain detects accidental damage and edits that do not recompute every hash "
            "and the head; sign it (a node or coordinator key) to detect deliberate rewriting"
        )
    elif key is None and result.signers:
        result.notes.append("signatures were not checked: give the signer's public key (node.pub or server.crt) "
                            "to check them")
    elif key is not None and last is not None:
        result.notes.append(
            f"signatures cannot reveal a rollback to an older signed copy: the log ends at entry {last.get('seq')}; "
            f"compare with an earlier copy of {head.name} kept elsewhere (backup, offsite)"
        )
    return result
