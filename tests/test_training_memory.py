"""The training process keeps freed memory mapped (common.training.retain_freed_memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Like a training step: allocates six 8 MB temporaries, frees them, 40 times; prints the minor page
#: faults that took. glibc by default raises its mmap threshold to 8 MB after the first free but trims
#: the heap top down to twice that, so each step faults part of its 48 MB in again.
_CHURN = """
import resource, sys
import numpy as np
from common.training import retain_freed_memory
accepted = retain_freed_memory() if sys.argv[1] == "tuned" else None
def step():
    blocks = [np.ones(1_000_000) for _ in range(6)]
    return sum(b.sum() for b in blocks)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_freed_training_buffers_are_reused_without_page_faults() -> None:
    # Prepare / Execute: the same allocate-and-free loop with glibc's defaults and after the call
    _, default = _faults("default")
    accepted, tuned = _faults("tuned")

    # Assert: by default thousands of pages per step are faulted in again; once tuned, none
    assert accepted == "True"
    assert default > 40 * 2_000
    assert tuned < 1_000
