"""What the DP-SGD workers of tests/test_site_workers.py run from the test: hooks and a model, in a light module.

Spawned workers import the module of every callable they receive; this one imports only torch, so a worker starts
without the test module's imports (Flower, the site).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import nn


def note_start(folder: str, rank: int) -> None:
    """Leave ``pid-<rank>-<pid>`` in ``folder``: every worker that started, and its process id."""
    Path(folder, f"pid-{rank}-{os.getpid()}").touch()


def note_step(folder: str, rank: int) -> None:
    """Leave ``rank-<rank>`` in ``folder``: which workers took a step."""
    Path(folder, f"rank-{rank}").touch()


def kill_rank_1(folder: str, rank: int) -> None:
    """Note the step; worker 1 then kills itself (SIGKILL: no clean-up of its own) as its first step starts."""
    note_step(folder, rank)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


class ZeroGradient(nn.Module):
    """A linear layer whose output the loss ignores: every record's gradient is zero, the update is the noise alone."""

    def __init__(self, inputs: int, classes: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 0.0
