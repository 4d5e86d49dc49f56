"""common.io: atomic array files with JSON metadata, and dataset names as parts of file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.io import atomic_write_npz, file_stem, read_npz


def test_an_npz_with_metadata_round_trips_owner_only_and_without_pickle(tmp_path: Path) -> None:
    # Prepare
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7], dtype=np.int64)}
    meta = {"run": 2**62 + 1, "metrics": {"auc": 0.9}}
    # Execute
    atomic_write_npz(tmp_path / "x" / "f.npz", arrays, meta)
    back_meta, back = read_npz(tmp_path / "x" / "f.npz")
    # Assert: same metadata (large ints too) and arrays, 0600, no temporary file left
    assert back_meta == meta and back.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
    assert (tmp_path / "x" / "f.npz").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.npz"]
    with pytest.raises(ValueError, match="'meta'"):
        atomic_write_npz(tmp_path / "y.npz", {"meta": np.zeros(1)}, {})
    assert not (tmp_path / "y.npz").exists()


def test_a_file_stem_keeps_only_safe_characters() -> None:
    assert file_stem("BreastMNIST") == "breastmnist"
    assert file_stem("msd/../hippo campus") == "msd-..-hippo-campus"
