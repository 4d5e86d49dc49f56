"""Stopping a process together with everything it started (Flower detaches its app processes)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

#: ANSI escape sequences (Flower colours its log levels): dropped from lines written anywhere but a terminal.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: What a service manager or a closed terminal sends: each stops the wrapper *and* what it started.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


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


def plain(line: str) -> str:
    """``line`` without ANSI escape sequences (colour codes)."""
    return _ANSI.sub("", line)


def is_terminal(sink: IO[Any] | None) -> bool:
    """Whether ``sink`` is an interactive terminal (colours kept there, dropped everywhere else)."""
    if sink is None:
        return False
    try:
        return bool(sink.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed file
        return False


def pump(source: IO[str], sink: IO[str] | None, *, keep: Callable[[str], None] | None = None) -> threading.Thread:
    """Copy ``source`` line by line to ``sink`` (plain text unless ``sink`` is a terminal) on a daemon thread.

    ``keep`` then receives each plain line (a process's last lines, its ready mark). The thread ends with ``source``.
    """
    colour = sink is not None and is_terminal(sink)

    def run() -> None:
        for line in source:
            text = plain(line)
            if sink is not None:
                with contextlib.suppress(ValueError, OSError):  # the sink was closed while the process stops
                    sink.write(line if colour else text)
                    sink.flush()
            if keep is not None:
                keep(text)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) arrived; raised where Ctrl-C would be, so the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread, as Ctrl-C raises.

    A wrapper that starts Flower in its own session (``flower-superlink``, ``flower-supernode``) must not die on
    SIGTERM alone: its ``finally`` blocks stop the process tree. The previous handlers are restored on exit.
    """

    def handler(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
