"""Resolution as a setting: 2D classification at 28, 64, 128 or 224 pixels, recorded in the model card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import common.training
from client.data import site_file
from client.preprocessing import Preprocessing, to_model_input
from common import recipes
from common.config import RunConfig
from common.datasets import RESOLUTIONS, dataset_info, to_tensor_layout
from common.errors import ConfigError, DataError
from common.models import build_model, model_problems

SIZES = (40, 50)


def _write_sites(root: Path) -> None:
    """Two tiny 28-pixel binary sites whose label brightens the image (as MedMNIST's files would be: 28 px)."""
    rng = np.random.default_rng(0)
    for i, n in enumerate(SIZES):
        labels = rng.integers(0, 2, n + 16)
        images = (rng.integers(0, 120, (n + 16, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
        buf = io.BytesIO()
        np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:], val_labels=labels[n:])
        site_file(root, i).write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------ the setting
def test_resolution_defaults_to_the_datasets_own_size_and_appears_in_the_apps_run_config() -> None:
    # Prepare
    info = dataset_info("breastmnist")
    # Execute
    config = RunConfig()
    defaults = recipes.flower_defaults()
    # Assert: 0 means the dataset's own size, and the default info is the catalog's entry itself
    assert config.resolution == 0 and defaults["resolution"] == 0
    assert dataset_info("breastmnist", resolution=0) is info and info.size == info.source_resolution == 28
    assert dataset_info("breastmnist", resolution=28) is info


def test_a_bad_resolution_is_one_clear_error_naming_the_sizes() -> None:
    # Prepare
    run_config = {**RunConfig().to_flower(), "resolution": 100}
    # Execute
    with pytest.raises(ConfigError) as caught:
        recipes.from_flower(run_config)
    # Assert
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert "resolution=100" in problem and all(str(r) in problem for r in RESOLUTIONS)


def test_another_resolution_for_a_3d_or_segmentation_dataset_is_refused() -> None:
    # Execute / Assert
    for name in ("organmnist3d", "msd-hippocampus"):
        with pytest.raises(ConfigError, match=f"resolution=64: {name} is a 3D"):
            RunConfig(dataset=name, model="auto").replace(resolution=64)
        with pytest.raises(DataError, match="use resolution=0"):
            dataset_info(name, resolution=64)


@pytest.mark.parametrize("size", [28, 64, 128, 224])
def test_resnet18_small_builds_and_predicts_at_every_size(size: int) -> None:
    # Prepare
    info = dataset_info("pneumoniamnist", resolution=size)
    # Execute
    model = build_model("resnet18-small", info, seed=0).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, info.channels, size, size))
    # Assert
    assert info.size == size and info.source_resolution == 28
    assert logits.shape == (2, info.num_outputs)


def test_resnet18_builds_at_64_and_128() -> None:
    for size in (64, 128):
        info = dataset_info("dermamnist", resolution=size)
        with torch.no_grad():
            logits = build_model("resnet18", info, seed=0).eval()(torch.zeros(1, 3, size, size))
        assert logits.shape == (1, 7)


def test_scattering_models_at_64_are_refused_naming_the_models_that_work() -> None:
    # Prepare
    info = dataset_info("breastmnist", resolution=64)
    # Execute
    problems = {name: model_problems(name, info) for name in ("scatnet", "scatnet-mirror", "scatcnn", "auto")}
    # Assert: each refusal names the size, the resolution and the models that train at 64
    for name, found in problems.items():
        assert len(found) == 1, name
        assert "28 pixels only" in found[0] and "resolution=64" in found[0]
        assert "resnet18-small" in found[0] and "resnet18," in found[0] and "scatnet," not in found[0]
    assert "(scatnet for breastmnist)" in problems["auto"][0]
    with pytest.raises(ValueError, match=r"scatnet.*28 pixels only"):
        build_model("scatnet", info)
    assert model_problems("scatnet", dataset_info("breastmnist")) == []


# ------------------------------------------------------------------------------ images to the size
def test_the_default_path_leaves_the_tensors_as_they_were() -> None:
    # Prepare
    images = np.random.default_rng(3).integers(0, 256, (5, 28, 28, 3)).astype(np.uint8)
    info = dataset_info("dermamnist")
    # Execute
    x = to_tensor_layout(images, info)
    # Assert: exactly the scaling and transposition, nothing resized
    expected = np.ascontiguousarray((images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))
    assert x.dtype == np.float32 and np.array_equal(x, expected)


def test_28_pixel_images_are_upsampled_for_a_64_pixel_run() -> None:
    # Prepare: a left-dark, right-bright image
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[:, :, 14:] = 255
    info = dataset_info("breastmnist", resolution=64)
    # Execute
    x = to_tensor_layout(images, info)
    # Assert: 64 pixels a side, the halves kept, values still in [-1, 1]
    assert x.shape == (2, 1, 64, 64)
    assert np.allclose(x[:, :, :, :30], -1.0) and np.allclose(x[:, :, :, 34:], 1.0)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_a_dicom_site_resizes_from_its_native_resolution_to_the_runs() -> None:
    # Prepare: a 300 x 200 display image, and the settings a DICOM site derives from the run's dataset info
    pixels = np.random.default_rng(0).uniform(0, 1, (1, 300, 200)).astype(np.float32)
    info = dataset_info("pneumoniamnist", resolution=128)
    settings = Preprocessing.for_dataset(info.name, size=info.size, channels=info.channels,
                                         spatial_dims=info.spatial_dims)
    # Execute
    record = to_model_input(pixels, settings)
    # Assert: one 128-pixel record, and a cache key apart from the 28-pixel one
    assert record.shape == (128, 128) and record.dtype == np.uint8
    default = Preprocessing.for_dataset(info.name, size=28, channels=1, spatial_dims=2)
    assert settings.key() != default.key()


# ------------------------------------------------------------------------------ end to end
def test_a_64_pixel_resnet18_small_federation_trains_at_64_and_its_card_says_so(tmp_path, monkeypatch) -> None:
    # Prepare: two 28-pixel sites, one DP round of resnet18-small at 64 pixels through the real ServerApp and
    # ClientApp; every tensor the training code builds is recorded.
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from server.app import main
    from server.export import export_run
    from simulations.loopback import LoopbackGrid

    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", model="resnet18-small", resolution=64, site_data_dir=str(tmp_path),
                    batch_size=16, rounds=1, local_epochs=1, strategy="fedavg", server_eval=False,
                    out_dir=str(tmp_path / "run"), min_sites=2, epsilon=8.0, accountant="rdp",
                    secure_aggregation=False)
    shapes: list[tuple[int, ...]] = []
    layout = common.training.to_tensor_layout

    def recording(images: np.ndarray, info) -> np.ndarray:
        out = layout(images, info)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(common.training, "to_tensor_layout", recording)
    nodes = {10 + i: {"partition-id": i, "state-dir": str(tmp_path / f"state-{i}")} for i in range(len(SIZES))}
    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    # Execute
    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    card = export_run(tmp_path / "run", tmp_path / "bundle")
    # Assert: the round aggregated both sites, every training and validation tensor was 64 pixels a side ...
    federated = json.loads((tmp_path / "run" / "federated.json").read_text())
    assert federated["aggregated_rounds"] == 1
    assert shapes and all(s[1:] == (1, 64, 64) for s in shapes)
    # ... and the card records the resolution beside the files' own, in JSON and in words
    assert card.preprocessing.size == 64 and card.resolution == 64 and card.source_resolution == 28
    data = json.loads((tmp_path / "bundle" / "model-card.json").read_text())
    assert data["dataset"]["resolution"] == 64 and data["dataset"]["source_resolution"] == 28
    assert data["dataset"]["version"] == "MedMNIST, 28 px, resized to 64 px"  # deployed: the sites' release unknown
    markdown = (tmp_path / "bundle" / "model-card.md").read_text()
    assert "64 px per side (trained on 28-pixel images upsampled to 64)" in markdown
