"""Flower's ``flower-supernode``, with the node's idle poll interval as a setting.

A SuperNode that finds no message waiting sleeps a fixed 3 s before it asks the SuperLink again
(``flwr.supernode.start_client_internal``). Each SecAgg+ stage is one such exchange, so a secure round (four
stages) waits for the poll four times where a plain round waits once: on a small model the secure round took 1.75
times as long as a plain one, mostly waiting. ``medsilo client start`` runs Flower's own SuperNode through this
module, which caps that idle sleep at :data:`IDLE_POLL_S` seconds (one HTTPS request to the SuperLink per interval
and node) and changes nothing else. A test checks that Flower's loop still has the one 3 s idle sleep this
setting replaces, so an upgrade that changes it is noticed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

#: The longest a node waits between two polls of the SuperLink when it has nothing to do.
IDLE_POLL_S = 0.5


class IdleClock:
    """``time`` as Flower's SuperNode loop sees it: every sleep capped at ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.limit))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def main() -> None:
    """Run ``flower-supernode`` (same arguments) with the idle poll capped at :data:`IDLE_POLL_S`."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    loop.time = IdleClock(IDLE_POLL_S)  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
