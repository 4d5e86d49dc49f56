"""Atomic file writes (a reader sees the old file or the new one, never half of one), and safe names for them."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_stem(name: str) -> str:
    """``name`` as part of a file name: lower case, every run of other than ``a-z 0-9 . _ -`` made one ``-``."""
    return _UNSAFE.sub("-", name.lower())


def atomic_write_npz(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Any, *, mode: int = 0o600) -> None:
    """``arrays`` and the JSON-able ``meta`` as one ``.npz``, written atomically; :func:`read_npz` reads it.

    ``meta`` is stored as JSON text under the key ``meta``, so reading it back never unpickles anything.
    """
    if "meta" in arrays:
        raise ValueError("received an array named 'meta'; that key holds the metadata, rename the array")
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue(), mode=mode)


def read_npz(path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a file written by :func:`atomic_write_npz` (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["meta"].tobytes()), {k: npz[k] for k in npz.files if k != "meta"}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write an object as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, obj: Any, *, mode: int = 0o666) -> None:
    """Append one JSON line and sync it, so a crash loses at most the line being written.

    ``mode`` is the permission of a file this call creates (less the umask); the line is one ``write``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    line = (json.dumps(obj, sort_keys=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # the new directory entry must survive a crash too
        fsync_dir(path.parent)


class LockTimeout(TimeoutError):
    """:func:`locked` waited ``timeout`` seconds and another process still held the lock."""


@contextlib.contextmanager
def locked(path: str | Path, *, timeout: float, shared: bool = False) -> Iterator[None]:
    """Hold an inter-process ``flock`` on the lock file ``path`` (created owner-only) for the ``with`` block.

    Parameters
    ----------
    path
        The lock file; every process that reads or writes the guarded files locks the same one.
    timeout
        Seconds to keep retrying (short sleeps) before raising :class:`LockTimeout`.
    shared
        A shared (read) lock instead of an exclusive one.

    Notes
    -----
    The lock belongs to the open file, so it is released when the block ends or the process dies; two
    ``locked`` blocks on one path exclude each other even within one process (do not nest them).

    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError:
        if not (shared and path.exists()):
            raise
        fd = os.open(path, os.O_RDONLY)  # a reader without write access to the lock file (flock still works)
    try:
        deadline = time.monotonic() + timeout
        op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} stayed locked for more than {timeout:g} s") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read every complete JSON line of ``path`` (a torn last line is ignored)."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a new or renamed file) to disk; best effort where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_toml(path: str | Path, *, missing: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises one :class:`common.errors.ConfigError`.

    ``missing`` is the fix to print when the file does not exist.
    """
    from common.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path} not found; {missing}"])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path} is not valid TOML ({exc}); fix the syntax"]) from None
