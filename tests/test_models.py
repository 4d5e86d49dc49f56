from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from common.checkpoint import initialize_from_checkpoint, load_checkpoint, save_checkpoint
from common.datasets import dataset_info
from common.errors import DataError
from common.models import MODELS, build_model, model_problems


@pytest.mark.parametrize(
    ("model", "dataset", "shape"),
    [
        ("cnn", "pneumoniamnist", (3, 1, 28, 28)),
        ("cnn", "pathmnist", (3, 3, 28, 28)),
        ("scatnet", "breastmnist", (3, 1, 28, 28)),
        ("scatnet", "pathmnist", (3, 3, 28, 28)),
        ("scatcnn", "pneumoniamnist", (3, 1, 28, 28)),
        ("scatcnn", "pathmnist", (3, 3, 28, 28)),
        ("resnet18-small", "dermamnist", (3, 3, 28, 28)),
        ("resnet18", "breastmnist", (2, 1, 28, 28)),
        ("cnn-3d", "adrenalmnist3d", (2, 1, 28, 28, 28)),
        ("resnet18-3d", "fracturemnist3d", (2, 1, 28, 28, 28)),
    ],
)
def test_output_shape_and_opacus_compatibility(model: str, dataset: str, shape: tuple) -> None:
    info = dataset_info(dataset)
    net = build_model(model, info)
    out = net(torch.zeros(shape))
    assert out.shape == (shape[0], info.num_outputs)
    assert ModuleValidator.validate(net, strict=False) == []


def test_dimension_mismatch_is_explained() -> None:
    problems = model_problems("cnn", dataset_info("adrenalmnist3d"))
    assert problems and "2D" in problems[0] and "3D" in problems[0] and "cnn-3d" in problems[0]
    assert model_problems("nope", dataset_info("breastmnist"))[0].startswith("model='nope' is unknown")
    assert set(MODELS) >= {"cnn", "cnn-3d", "resnet18", "resnet18-3d"}


def test_seeded_models_are_identical() -> None:
    info = dataset_info("breastmnist")
    a, b = build_model("cnn", info, seed=3), build_model("cnn", info, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_checkpoint_round_trip_safetensors_and_weights_only_pt(tmp_path) -> None:
    info = dataset_info("breastmnist")
    net = build_model("cnn", info, seed=1)
    save_checkpoint(tmp_path / "m.safetensors", net.state_dict(), {"dataset": "breastmnist", "round": 3})
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert meta == {"dataset": "breastmnist", "round": 3}
    assert all(torch.equal(tensors[k], v) for k, v in net.state_dict().items())
    torch.save(net.state_dict(), tmp_path / "m.pt")
    tensors_pt, _ = load_checkpoint(tmp_path / "m.pt")
    assert all(torch.equal(tensors_pt[k], v) for k, v in net.state_dict().items())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_pickled_objects_are_refused(tmp_path) -> None:
    import argparse

    torch.save({"x": argparse.Namespace(payload="runs code when unpickled")}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt")


def test_transfer_learning_keeps_features_and_resets_a_new_head(tmp_path) -> None:
    source = build_model("cnn", dataset_info("pathmnist"), seed=1)  # 3 channels, 9 classes
    save_checkpoint(tmp_path / "src.safetensors", source.state_dict(), {})
    target = build_model("cnn", dataset_info("dermamnist"), seed=2)  # 3 channels, 7 classes
    skipped = initialize_from_checkpoint(target, tmp_path / "src.safetensors")
    assert skipped == ["head.bias", "head.weight"]
    assert torch.equal(target.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"])
    with pytest.raises(DataError, match="matches only"):
        initialize_from_checkpoint(build_model("cnn-3d", dataset_info("adrenalmnist3d")), tmp_path / "src.safetensors")


def test_a_seeded_model_build_leaves_torchs_global_generator_as_it_was() -> None:
    # Prepare: the global generator in a state no seed of a run config chose
    from common.datasets import dataset_info
    from common.models import build_model

    info = dataset_info("breastmnist")
    torch.manual_seed(12345)
    expected_next = torch.rand(4)
    torch.manual_seed(12345)
    # Execute
    first = build_model("cnn", info, seed=7)
    after = torch.rand(4)
    second = build_model("cnn", info, seed=7)
    # Assert: the same weights for the same seed, and the global stream is untouched by the seed
    assert torch.equal(after, expected_next)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
