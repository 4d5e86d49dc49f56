"""Services: what a service manager sends (SIGTERM, SIGHUP) stops a medsilo wrapper and every process it started.

``medsilo server start`` and ``medsilo client start`` start Flower in its own session; a SIGTERM that killed only
the wrapper would leave ``flower-superlink`` or ``flower-supernode`` (and their SuperExec) running. The processes
are real, bound to 127.0.0.1, and stopped by these tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_deployment import _free_port

from common.processes import _alive, descendants, stop_tree
from server.federation import parse_federation
from server.provision import provision
from server.superlink import SuperLink, sync
from server.superlink import load_kit as load_coordinator_kit

ROOT = Path(__file__).resolve().parents[1]
ANSI = "\x1b["

pytestmark = pytest.mark.slow


class Wrapper:
    """A ``medsilo`` command in its own process; its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self.tree: list[int] = []  # the wrapper's process tree when it was signalled
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, text: str, *, timeout: float = 300) -> None:
        """Block until a line contains ``text`` (a generous bound: it only stops a hung test)."""
        with self._seen:
            found = self._seen.wait_for(
                lambda: any(text in line for line in self.lines) or self.process.poll() is not None, timeout)
        assert found and any(text in line for line in self.lines), "".join(self.lines)[-3000:]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def __enter__(self) -> Wrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever the test found, nothing it started outlives it (a wrapper that died leaves orphans)."""
        tree = descendants(self.process.pid) + self.tree
        if self.process.poll() is None:
            stop_tree(self.process, timeout=5, kill=True)
        for pid in tree:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def kits(tmp_path) -> Iterator[Path]:
    port = _free_port()
    spec = parse_federation({"federation": {"name": "services"},
                             "coordinator": {"hosts": ["127.0.0.1"], "port": port, "bind": "127.0.0.1"},
                             "sites": [{"name": "h0", "epsilon": 8.0}]})
    yield provision(spec, tmp_path / "kits").root


def _stop_with(wrapper: Wrapper, sig: signal.Signals, *, flower: str) -> list[int]:
    """Send ``sig`` to the wrapper only (as ``kill PID`` or systemd's main-process stop does); the tree it had."""
    tree = wrapper.tree = descendants(wrapper.process.pid)
    names = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
             for pid in tree if _alive(pid)]
    assert any(flower in name for name in names), names  # Flower runs in the wrapper's tree before the signal
    wrapper.process.send_signal(sig)
    wrapper.process.wait(timeout=120)
    return tree


def test_sigterm_stops_the_superlink_and_everything_it_started(kits: Path) -> None:
    # Prepare: the coordinator's SuperLink as `medsilo server start` runs it (TLS, node authentication)
    with Wrapper("server", "start", "--kit", str(kits / "coordinator")) as server:
        server.wait_for("hospital keys registered")
        # Execute
        tree = _stop_with(server, signal.SIGTERM, flower="server.tls13")
    # Assert: the wrapper exits cleanly, says why, and leaves no process; its output carries no colour codes
    assert server.process.returncode == 0, server.output[-3000:]
    assert "stopped by SIGTERM" in server.output
    assert tree and not any(_alive(pid) for pid in tree)
    assert ANSI not in server.output


def test_sighup_and_sigterm_stop_a_hospital_node_and_its_flower_processes(kits: Path, tmp_path: Path) -> None:
    # Prepare: a running SuperLink that knows the hospital's key, and the hospital's node with a small site file
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 2, (40, 1))
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:32], train_labels=labels[:32], val_images=images[32:], val_labels=labels[32:])
    data = tmp_path / "site.npz"
    data.write_bytes(buf.getvalue())
    coordinator = load_coordinator_kit(kits / "coordinator")
    with SuperLink(coordinator, log_file=tmp_path / "superlink.log"):
        assert sync(coordinator)["registered"] == ["h0"]
        for sig in (signal.SIGHUP, signal.SIGTERM):
            with Wrapper("client", "start", "--kit", str(kits / "h0"), "--data", str(data),
                         "--runtime-port", str(_free_port())) as node:
                node.wait_for("joined federation")
                # Execute
                tree = _stop_with(node, sig, flower="client.supernode")
            # Assert
            assert node.process.returncode == 0, node.output[-3000:]
            assert f"stopped by {sig.name}" in node.output
            assert tree and not any(_alive(pid) for pid in tree)
            assert ANSI not in node.output
    # The SuperLink's own log, written through medsilo, is plain text too.
    assert ANSI not in (tmp_path / "superlink.log").read_text()
