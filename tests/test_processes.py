"""Stopping a process tree, including children that left the process group (as Flower's app processes do)."""

from __future__ import annotations

import subprocess
import time

from common.processes import _alive, descendants, stop_tree


def test_stop_tree_reaches_detached_grandchildren() -> None:
    # Prepare: a parent whose child starts its own session (like SuperExec's flwr-clientapp).
    proc = subprocess.Popen(["sh", "-c", "setsid sleep 300 & sleep 300"], start_new_session=True)
    deadline = time.time() + 10
    while len(descendants(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    tree = descendants(proc.pid)
    assert len(tree) == 2
    # Execute
    stop_tree(proc, timeout=5)
    # Assert
    assert proc.poll() is not None
    assert not any(_alive(pid) for pid in tree)
