from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDMNIST = ROOT.parent / "shared" / "data" / "medmnist"


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run from the repository root so ../shared/data is on the dataset search path."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MEDSILO_DATA", raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
