"""Environment every process that starts Flower (or Ray) needs on a hospital network."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from common.io import atomic_write_text, private_dir
from common.processes import is_terminal

#: Settings that keep Flower offline, quiet and on loopback.
FLOWER_ENV: dict[str, str] = {
    # Never `uv sync` the app's dependencies at run time (it would fetch a CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Keeps Ray's services on 127.0.0.1 instead of every interface.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "0",
}


def apply_flower_environment(flwr_home: str | Path) -> None:
    """Set the Flower settings in this process (before Flower or Ray start); ``flwr_home`` is made owner-only.

    Flower's telemetry writes a random installation ID to ``FLWR_HOME/source`` from a background thread the
    first time it records an event (telemetry off or not), which may be after an :func:`~common.io.owner_only_umask`
    block has ended; it is written here first, owner-only, so that Flower only reads it.
    """
    home = private_dir(flwr_home)  # Flower keeps run state and installed apps there
    if not (home / "source").exists():
        atomic_write_text(home / "source", str(uuid.uuid4()))
    os.environ.update(FLOWER_ENV)
    os.environ["FLWR_HOME"] = str(Path(flwr_home).absolute())
    if not is_terminal(sys.stderr):  # Ray colours the actors' line prefixes: plain text in logs and pipes
        os.environ["RAY_COLOR_PREFIX"] = "0"


def keep_flower_logs_single() -> None:
    """Stop Flower's log records from reaching the root logger a second time.

    Opacus calls ``logging.basicConfig`` when imported, which gives the root logger a stderr
    handler; Flower's logger already prints through its own handler, so every line appeared twice. Flower's
    handler also loses its colours unless it writes to a terminal (plain text in log files and pipes).
    """
    flower = logging.getLogger("flwr")
    flower.propagate = False
    # Flower colours its levels with ANSI codes: kept on a terminal, dropped in a redirected log.
    for handler in flower.handlers:
        if hasattr(handler, "colored"):
            handler.colored = is_terminal(getattr(handler, "stream", None))
