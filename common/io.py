"""Atomic file writes (a reader sees the old file or the new one, never half of one), and safe names for them.

Everything medsilo writes is derived from patient data or is a node's or coordinator's state, so it is
owner-only unless a caller says otherwise: the writers here create files ``0600`` (:data:`PRIVATE`) and the
folders they create ``0700`` (:data:`PRIVATE_DIR`). Certificates and public keys are the exception and pass
``mode=PUBLIC``. :func:`private_dir` creates (or tightens) a folder medsilo owns, and :func:`owner_only_umask`
covers what libraries write (``np.save``, SQLite, pydicom, Flower, the processes medsilo starts).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import stat
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_UNSAFE = re.compile(r"[^a-z0-9._-]+")

#: Mode of a file only its owner reads and writes: the default of every writer here.
PRIVATE = 0o600
#: Mode of a file meant to be read by anyone (certificates, public keys): pass ``mode=PUBLIC``.
PUBLIC = 0o644
#: Mode of a folder medsilo creates for what it writes.
PRIVATE_DIR = 0o700
#: The umask of a process whose files and folders are owner-only (``subprocess.Popen(umask=...)``).
OWNER_ONLY_UMASK = 0o077
#: The permission bits of the group and of others.
_SHARED_BITS = 0o077


def make_owner_only(path: str | Path) -> None:
    """Remove the group's and others' permissions from ``path`` (file or folder) when this user owns it.

    Parameters
    ----------
    path
        An existing file or folder; a symbolic link is followed.

    Notes
    -----
    A path owned by another user is left as it is (only its owner could change it), as are the owner's bits.

    """
    st = os.stat(path)
    if st.st_mode & _SHARED_BITS and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_SHARED_BITS)


def _make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents, each with ``mode`` (less the umask); existing ones are kept."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not folder.is_dir():
                raise


def _parent_mode(mode: int) -> int:
    """Mode of the folders created for a file of ``mode``: ``0700`` for a private file, else ``0777`` less umask."""
    return PRIVATE_DIR if not mode & _SHARED_BITS else 0o777


def private_dir(path: str | Path) -> Path:
    """Make ``path`` an owner-only folder: create it and its missing parents ``0700``, or tighten it.

    Parameters
    ----------
    path
        A folder medsilo keeps its own files in (a state folder, a cache, a spool, simulated sites).

    Returns
    -------
    Path
        ``path``, as a :class:`~pathlib.Path`.

    Notes
    -----
    Only the folders this call creates and ``path`` itself are changed: an existing parent (a user's home,
    ``/var/lib``) keeps its mode. An existing ``path`` loses its group and other bits (:func:`make_owner_only`);
    the files already in it are left as they are.

    """
    path = Path(path)
    _make_dirs(path, PRIVATE_DIR)
    make_owner_only(path)
    return path


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Within the ``with`` block, files and folders this process creates are owner-only (umask ``077``).

    For what libraries write without a mode (``np.save``, SQLite, pydicom's ``dcmwrite``, Flower and Ray,
    child processes started in the block): a file they create ``0666`` becomes ``0600``, a folder ``0700``.
    The previous umask is kept where it is stricter, and restored when the block ends.

    Notes
    -----
    The umask belongs to the process, not to the thread: other threads' files are owner-only too while the
    block runs. To start a child process owner-only, pass ``umask=OWNER_ONLY_UMASK`` to ``subprocess.Popen``.

    """
    previous = os.umask(OWNER_ONLY_UMASK)
    os.umask(previous | OWNER_ONLY_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = PRIVATE) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and an atomic rename.

    Parameters
    ----------
    path
        The file; missing parent folders are created, ``0700`` for a private file.
    data
        The whole content.
    mode
        The file's permissions, exactly (the umask does not apply): owner-only unless the caller means
        the file for everyone (``mode=PUBLIC``, whose new parent folders get the default ``0777`` less umask).

    """
    path = Path(path)
    _make_dirs(path.parent, _parent_mode(mode))
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


def atomic_write_npz(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Any, *, mode: int = PRIVATE) -> None:
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


def atomic_write_text(path: str | Path, text: str, *, mode: int = PRIVATE) -> None:
    """Write UTF-8 text atomically (owner-only unless ``mode`` says otherwise, see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | Path, obj: Any, *, mode: int = PRIVATE) -> None:
    """Write an object as indented JSON atomically (owner-only unless ``mode`` says otherwise)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode=mode)


def append_jsonl(path: str | Path, obj: Any, *, mode: int = PRIVATE) -> None:
    """Append one JSON line and sync it, so a crash loses at most the line being written.

    ``mode`` is the permission of a file this call creates (less the umask; an existing file keeps its own),
    and missing parent folders are created ``0700``; the line is one ``write``.
    """
    path = Path(path)
    _make_dirs(path.parent, _parent_mode(mode))
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE)
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
