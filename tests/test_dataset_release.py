"""Official files of every MedMNIST release are accepted by their MD5, and a run knows which release it read."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from common import datasets
from common.datasets import CATALOG, RELEASES, Task, dataset_info, dataset_release, load, locate, search_path
from common.errors import DataError

#: The five datasets whose v3 files dropped blank samples (medmnist 2.2.4 release notes), v2 checksum first.
CHANGED_IN_V3 = {
    "organamnist": ("866b832ed4eeba67bfb9edee1d5544e6", "68e3f8846a6bd62f0c9bf841c0d9eacc"),
    "organcmnist": ("0afa5834fb105f7705a7d93372119a21", "b9ceb9546e10131b32923c5bbeaea2b1"),
    "organsmnist": ("e5c39f1af030238290b9557d9503af9d", "9ab87b696fb54e2a387ebe992d6ed5f1"),
    "organmnist3d": ("21f0a239e7f502e6eca33c3fc453c0b6", "a0c5a1ff56af4f155c46d46fbb45a2fe"),
    "vesselmnist3d": ("2ba5b80617d705141f3f85627108fce8", "b41fd4f7e7e2feedddb201585ecafa1b"),
}


def _npz(n_train: int, marker: int) -> bytes:
    """A small MedMNIST-shaped file; ``marker`` makes its bytes (and MD5) distinct."""
    buffer = io.BytesIO()
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.full((n, 28, 28), marker, np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 11).astype(np.uint8)[:, None]
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _two_release_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    """organamnist's catalog entry pointed at two synthetic files, one per release (v2 has one more record)."""
    v2, v3 = _npz(5, 1), _npz(4, 2)
    md5 = {k: hashlib.md5(b).hexdigest() for k, b in (("v2", v2), ("v3", v3))}
    info = dataclasses.replace(CATALOG["organamnist"], md5=md5["v3"], v2_file=(md5["v2"], (5, 2, 2)))
    monkeypatch.setitem(CATALOG, "organamnist", info)
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path))
    return v2, v3


def test_catalog_knows_both_releases_and_where_they_differ() -> None:
    # Prepare
    medmnist = [i for i in CATALOG.values() if i.task is not Task.SEGMENTATION]
    # Execute
    differing = {i.name: (i.release_md5s["v2"], i.release_md5s["v3"]) for i in medmnist
                 if i.release_md5s["v2"] != i.release_md5s["v3"]}
    # Assert: exactly the five files v3 changed, with the checksums of medmnist 2.1.0 and 3.0.2's info.py
    assert RELEASES == ("v2", "v3")
    assert differing == CHANGED_IN_V3
    assert all(set(i.release_md5s) == set(RELEASES) for i in medmnist)
    assert dataset_info("organamnist").release_of(CHANGED_IN_V3["organamnist"][0]) == "v2"
    assert dataset_info("organamnist").release_of(CHANGED_IN_V3["organamnist"][1]) == "v3"
    assert dataset_info("breastmnist").release_of("750601b1f35ba3300ea97c75c52ff8f6") == "v2/v3"
    assert dataset_info("breastmnist").release_of("0" * 32) is None
    # the download record serves v3 files: what a download is checked against
    assert "10519652" in datasets.ZENODO_URL and dataset_info("vesselmnist3d").md5 == CHANGED_IN_V3["vesselmnist3d"][1]


def test_shared_files_are_files_both_releases_ship() -> None:
    # Prepare: the official files in ../shared, hashed here independently of the catalog
    for name in ("breastmnist", "pneumoniamnist", "retinamnist", "adrenalmnist3d"):
        path = next(d / f"{name}.npz" for d in search_path() if (d / f"{name}.npz").is_file())
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        # Execute
        release = dataset_release(name, path)
        # Assert
        assert release == "v2/v3"
        assert dataset_info(name).release_md5s == {"v2": digest, "v3": digest}
    assert load("breastmnist", download=False).release == "v2/v3"


@pytest.mark.parametrize("release", ["v2", "v3"])
def test_load_accepts_each_release_and_says_which(tmp_path, monkeypatch, release: str) -> None:
    # Prepare
    v2, v3 = _two_release_catalog(tmp_path, monkeypatch)
    (tmp_path / "organamnist.npz").write_bytes(v2 if release == "v2" else v3)
    # Execute
    data = load("organamnist", download=False)
    # Assert: the file's own records were read, and its release recorded
    assert data.release == release
    assert len(data.train) == (5 if release == "v2" else 4)
    assert dataset_release("organamnist", tmp_path / "organamnist.npz") == release


def test_unknown_md5_names_the_file_both_checksums_and_the_fix(tmp_path, monkeypatch) -> None:
    # Prepare
    (tmp_path / "organamnist.npz").write_bytes(_npz(3, 7))
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path))
    actual = hashlib.md5(_npz(3, 7)).hexdigest()
    # Execute
    with pytest.raises(DataError) as info:
        load("organamnist", download=False)
    # Assert
    msg = str(info.value)
    assert str(tmp_path / "organamnist.npz") in msg and actual in msg
    assert f"{CHANGED_IN_V3['organamnist'][0]} (MedMNIST v2)" in msg
    assert f"{CHANGED_IN_V3['organamnist'][1]} (MedMNIST v3)" in msg
    assert "replace it with the official file (https://zenodo.org/records/10519652/files/organamnist.npz" in msg


def test_a_withdrawn_file_is_refused_with_the_reason(tmp_path, monkeypatch) -> None:
    # Prepare: a file whose checksum is listed as withdrawn (stands in for the pre-2.1.0 NoduleMNIST3D)
    payload = _npz(3, 9)
    (tmp_path / "nodulemnist3d.npz").write_bytes(payload)
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path))
    monkeypatch.setitem(datasets.WITHDRAWN_MD5, hashlib.md5(payload).hexdigest(), "withdrawn for a data error")
    # Execute
    with pytest.raises(DataError) as info:
        locate(dataset_info("nodulemnist3d"), download=False)
    # Assert: the reason, and the one checksum both releases share
    assert "withdrawn for a data error" in str(info.value)
    assert "8755a7e9e05a4d9ce80a24c3e7a256f3 (MedMNIST v2 and v3)" in str(info.value)
    assert "902d495e3d91ad1a7bcac1a6b58a8fa2" in datasets.WITHDRAWN_MD5


def test_missing_file_offline_lists_every_release_checksum(tmp_path, monkeypatch) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path / "mine"))
    # Execute
    with pytest.raises(DataError) as info:
        locate(dataset_info("vesselmnist3d"), download=False)
    # Assert
    assert CHANGED_IN_V3["vesselmnist3d"][0] in str(info.value) and CHANGED_IN_V3["vesselmnist3d"][1] in str(info.value)
