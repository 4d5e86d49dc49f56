"""Stopping a process together with everything it started (Flower detaches its app processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after the closing parenthesis.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_tree(process: subprocess.Popen[Any], *, timeout: float = 15.0, kill: bool = False) -> None:
    """Stop ``process`` and all its descendants, including those that left its process group.

    SIGTERM first so Flower shuts down cleanly (``kill=True``: SIGKILL at once, as a crash would);
    whatever is still alive after ``timeout`` seconds gets SIGKILL.
    """
    tree = descendants(process.pid)
    first = signal.SIGKILL if kill else signal.SIGTERM
    if process.poll() is None:
        process.send_signal(first)
    _signal(tree, first)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(max(0.0, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait(5)
    _signal([p for p in tree if _alive(p)], signal.SIGKILL)
