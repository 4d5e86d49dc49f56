from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from common.datasets import CATALOG, Task, dataset_info, load, locate, search_path, to_tensor_layout, volume_search_path
from common.errors import DataError


def test_catalog_covers_medmnist_2d_and_3d() -> None:
    assert len([i for i in CATALOG.values() if i.task is not Task.SEGMENTATION]) == 18
    assert dataset_info("PneumoniaMNIST").md5 == "28209eda62fecd6e6a2d98b1501bb15f"
    assert dataset_info("adrenalmnist3d").spatial_dims == 3
    assert dataset_info("pathmnist").channels == 3
    assert dataset_info("chestmnist").task is Task.MULTILABEL
    assert dataset_info("breastmnist").num_outputs == 1 and dataset_info("octmnist").num_outputs == 4
    assert dataset_info("msd-hippocampus").task is Task.SEGMENTATION
    assert dataset_info("msd-hippocampus").num_outputs == 3  # background + anterior + posterior


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'nomnist'; use one of: .*pneumoniamnist"):
        dataset_info("nomnist")


def test_real_file_loads_with_official_shapes() -> None:
    data = load("breastmnist", download=False)
    assert data.train.images.shape == (546, 28, 28)
    assert data.test.labels.shape == (156,)
    assert set(np.unique(data.train.labels)) == {0, 1}


def test_md5_mismatch_names_file_and_fix(tmp_path, monkeypatch) -> None:
    (tmp_path / "breastmnist.npz").write_bytes(b"not the official file")
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        locate(dataset_info("breastmnist"), download=False)
    msg = str(info.value)
    assert hashlib.md5(b"not the official file").hexdigest() in msg
    assert "750601b1f35ba3300ea97c75c52ff8f6" in msg and "replace it" in msg


def test_missing_file_offline_says_where_to_put_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./data and no ../shared here
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path / "mine"))
    with pytest.raises(DataError) as info:
        locate(dataset_info("dermamnist"), download=False)
    assert "dermamnist.npz not found" in str(info.value)
    assert str(tmp_path / "mine" / "dermamnist.npz") in str(info.value)


def test_tensor_layout_for_gray_rgb_and_volumes() -> None:
    gray = to_tensor_layout(np.zeros((2, 28, 28), np.uint8), dataset_info("breastmnist"))
    rgb = to_tensor_layout(np.full((2, 28, 28, 3), 255, np.uint8), dataset_info("pathmnist"))
    vol = to_tensor_layout(np.zeros((2, 28, 28, 28), np.uint8), dataset_info("adrenalmnist3d"))
    assert gray.shape == (2, 1, 28, 28) and gray.min() == -1.0
    assert rgb.shape == (2, 3, 28, 28) and rgb.max() == 1.0
    assert vol.shape == (2, 1, 28, 28, 28)


def test_medsilo_data_may_list_several_folders(tmp_path, monkeypatch) -> None:
    # Prepare: the official file in the second of two listed folders, run from a folder with nothing else
    real = next(d / "breastmnist.npz" for d in search_path() if (d / "breastmnist.npz").is_file()).absolute()
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "breastmnist.npz").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSILO_DATA", os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second")]))
    # Execute
    found = locate(dataset_info("breastmnist"), download=False)
    # Assert
    assert found == tmp_path / "second" / "breastmnist.npz"
    assert volume_search_path()[:2] == [tmp_path / "first", tmp_path / "second"]


def test_the_serverapp_is_given_no_data_folder_unless_the_coordinator_names_one(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from server.superlink import flower_env

    kit = SimpleNamespace(flwr_home=tmp_path, root=tmp_path, key=tmp_path / "server.key")
    # Prepare: medsilo is started from the repository, where relative search folders would find the data
    monkeypatch.delenv("MEDSILO_DATA", raising=False)
    assert any((d / "breastmnist.npz").is_file() for d in search_path())
    # Execute
    env = flower_env(kit)  # type: ignore[arg-type]
    # Assert: the coordinator needs no data, and is handed none
    assert "MEDSILO_DATA" not in env
    # Prepare / Execute: a coordinator that adds the optional central test set names its folder itself
    monkeypatch.setenv("MEDSILO_DATA", str(tmp_path / "public-test-sets"))
    # Assert: passed through unchanged
    assert flower_env(kit)["MEDSILO_DATA"] == str(tmp_path / "public-test-sets")  # type: ignore[arg-type]
