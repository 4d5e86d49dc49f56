"""Public pretraining, then DP fine-tuning: the public split, the checkpoint's fit, freezing, and overlap checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp import sgd
from client.dp.rng import reproducible
from client.trainer import fine_tune, train_plain
from common.checkpoint import (
    checkpoint_problems,
    freeze_for_fine_tuning,
    initial_model,
    initialize_from_checkpoint,
    save_checkpoint,
    trained_parameters,
)
from common.config import RunConfig
from common.datasets import MedMNIST, Split, Task, dataset_info
from common.errors import ConfigError, DataError
from common.models import build_model
from common.training import training_dataset
from common.volumes import public_indices
from simulations.pretrain import overlap_problems, prepare_public, pretrain, record_digests, set_aside_public

ROOT = Path(__file__).resolve().parents[1]
BREAST = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
needs_breast = pytest.mark.skipif(not BREAST.is_file(), reason="breastmnist.npz not in ../shared/data/medmnist")
HIPPO = dataset_info("msd-hippocampus")


def _dataset(n_train: int = 20, seed: int = 0) -> MedMNIST:
    """A small classification dataset whose every record is distinct."""
    info = dataset_info("breastmnist")
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 2, n))

    return MedMNIST(info=info, train=split(n_train), val=split(6), test=split(6))


def _volumes(n: int) -> Split:
    rng = np.random.default_rng(1)
    shape = HIPPO.volume_shape
    assert shape is not None
    masks = np.zeros((n, *shape), dtype=np.int64)
    masks[:, 8:24, 20:36, 14:26] = rng.integers(0, 3, (n, 16, 16, 12))
    return Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8), masks, np.tile(shape, (n, 1)))


def _flat(model: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


# ---------------------------------------------------------------- the public split
def test_public_records_are_a_fixed_subset_no_site_is_given() -> None:
    # Prepare
    data = _dataset(n_train=20)

    # Execute
    public, rest = set_aside_public(data, 5)
    again, _ = set_aside_public(data, 5)

    # Assert: 5 public records, the same on every call, disjoint (by digest) from the sites' pool of 15; the
    # validation and test splits are the very same arrays.
    assert len(public) == 5 and len(rest.train) == 15
    assert record_digests(public) == record_digests(again)
    assert not set(record_digests(public)) & set(record_digests(rest.train))
    assert set(record_digests(public)) | set(record_digests(rest.train)) == set(record_digests(data.train))
    assert rest.val is data.val and rest.test is data.test
    assert list(public_indices(20, 5)) == sorted(public_indices(20, 5)) and len(set(public_indices(20, 5))) == 5


def test_public_records_that_leave_the_sites_nothing_are_refused() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match=r"public-records=20: the training split has 20 records"):
        public_indices(20, 20)


# ---------------------------------------------------------------- fine-tune settings
def test_fine_tune_settings_name_the_parameters_trained() -> None:
    # Prepare
    unet = build_model("unet2d", HIPPO, seed=0)
    cnn = build_model("cnn", dataset_info("breastmnist"), seed=0)
    names = [n for n, _ in unet.named_parameters()]

    # Execute
    head = trained_parameters(unet, "head")
    decoder = trained_parameters(unet, "decoder")

    # Assert: head is the 1x1 output convolution; decoder adds the up blocks and nothing of the encoder.
    assert head == ["head.weight", "head.bias"]
    assert set(decoder) == {n for n in names if n.startswith(("up.", "head."))}
    assert trained_parameters(unet, "all") == names
    assert trained_parameters(unet, "norm+head") == head  # the slice-wise U-Net's norms have no parameters
    with pytest.raises(DataError, match="fine-tune=decoder: CompactCNN has no decoder"):
        trained_parameters(cnn, "decoder")


def test_config_refuses_an_unknown_setting_and_a_frozen_random_model() -> None:
    # Execute
    problems = RunConfig(fine_tune="adapter").problems() + RunConfig(fine_tune="head").problems()

    # Assert
    assert any("fine-tune='adapter' is unknown; use one of: all, decoder, norm+head, head" in p for p in problems)
    assert any("fine-tune=head freezes the rest of the model at its random initialisation" in p for p in problems)
    with pytest.raises(ConfigError, match="public-records=-1 must be >= 0"):
        RunConfig(public_records=-1).validate()


# ---------------------------------------------------------------- checkpoints that do not fit
def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path: Path) -> None:
    # Prepare: a unet3d checkpoint offered to a unet2d run.
    path = tmp_path / "unet3d.safetensors"
    save_checkpoint(path, build_model("unet3d", HIPPO, seed=0).state_dict(), {"model": "unet3d"})
    config = RunConfig(dataset="msd-hippocampus", model="unet2d", init_checkpoint=str(path))

    # Execute
    problems = checkpoint_problems(config, HIPPO)

    # Assert: the model named, the shares and shapes that differ, and the fix; initial_model raises the same.
    assert len(problems) == 2
    assert "pretrained for model unet3d; this run's model is unet2d" in problems[0]
    assert "matches only" in problems[1] and "shapes differ: down.0.0.weight" in problems[1]
    with pytest.raises(DataError, match="matches only"):
        initial_model(config, HIPPO)


def test_freezing_what_a_checkpoint_does_not_hold_is_refused(tmp_path: Path) -> None:
    # Prepare: a checkpoint of the encoder only (most weights, no decoder), fine-tuning the head.
    model = build_model("unet2d", HIPPO, seed=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("up.0.")}
    path = tmp_path / "partial.safetensors"
    save_checkpoint(path, state, {})

    # Execute / Assert: up.0 would be frozen at random values.
    with pytest.raises(DataError, match=r"fine-tune=head freezes up\.0\.0\.bias, up\.0\.0\.weight"):
        initialize_from_checkpoint(build_model("unet2d", HIPPO, seed=1), path, fine_tune="head")
    initialize_from_checkpoint(build_model("unet2d", HIPPO, seed=1), path, fine_tune="all")  # trains them: fine


# ---------------------------------------------------------------- frozen parameters stay frozen
def test_plain_training_moves_only_what_fine_tune_names() -> None:
    # Prepare
    model = build_model("unet2d", HIPPO, seed=0)
    config = RunConfig(dataset="msd-hippocampus", model="unet2d", dp=False, fine_tune="head",
                       init_checkpoint="pretrained.safetensors", local_epochs=2, batch_size=2, lr=0.01)
    trained = set(trained_parameters(model, "head"))
    frozen = {n for n, _ in model.named_parameters()} - trained
    before = _flat(model, frozen | trained)

    # Execute
    train_plain(model, training_dataset(_volumes(4), HIPPO, "unet2d", seed=0), Task.SEGMENTATION, config, seed=0)

    # Assert
    after = _flat(model, frozen | trained)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)


@pytest.mark.parametrize(("model_name", "fine_tune_setting"), [("unet2d", "decoder"),
                                                               ("cnn", "head")])
def test_dp_sgd_moves_only_what_fine_tune_names(model_name: str, fine_tune_setting: str) -> None:
    """The site's DP-SGD round (expanded weights for the U-Net, one pass for the CNN) on a frozen model."""
    # Prepare: the model as a site trains it (frozen by the run's setting), a DP-SGD round at ε=8.
    if model_name == "unet2d":
        info, task = HIPPO, Task.SEGMENTATION
        data = training_dataset(_volumes(6), HIPPO, "unet2d", seed=0)
    else:
        info, task = dataset_info("pneumoniamnist"), Task.BINARY
        data = TensorDataset(torch.randn(48, 1, 28, 28), torch.randint(0, 2, (48, 1)).float())
    config = RunConfig(dataset=info.name, model=model_name, rounds=1, local_epochs=1, batch_size=2, epsilon=8.0,
                       fine_tune=fine_tune_setting, init_checkpoint="pretrained.safetensors", dp_lr=0.01)
    model = build_model(model_name, info, seed=0)
    trained = set(fine_tune(model, config))
    frozen = {n for n, _ in model.named_parameters()} - trained
    before = _flat(model, frozen | trained)

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sgd.train_dp(model, data, task, config, sgd.plan_for_records(config, len(data)),
                              randomness=reproducible(seed=0, site=0), server_round=1)

    # Assert: every noised step taken, the frozen parameters bit for bit as they were, the trained ones moved.
    after = _flat(model, frozen | trained)
    assert result.steps > 0 and frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)


def test_fine_tune_all_changes_nothing_and_never_unfreezes() -> None:
    # Prepare: a model with one parameter fixed by design.
    model = build_model("unet2d", HIPPO, seed=0)
    bias = dict(model.named_parameters())["head.bias"]
    bias.requires_grad_(False)

    # Execute
    trained = freeze_for_fine_tuning(model, "all")
    head = freeze_for_fine_tuning(model, "head")

    # Assert
    assert "head.bias" not in trained and len(trained) == len(list(model.parameters())) - 1
    assert head == ["head.weight"] and not bias.requires_grad


# ---------------------------------------------------------------- overlap of public and private data
def test_a_checkpoint_pretrained_on_a_sites_records_is_refused(tmp_path: Path) -> None:
    # Prepare: a checkpoint whose metadata lists 3 digests of the training split.
    data = _dataset(n_train=20)
    path = tmp_path / "leaky.safetensors"
    meta = {"record_digests": record_digests(data.train.subset(np.arange(3))), "public_records": 3}
    save_checkpoint(path, build_model("cnn", data.info, seed=0).state_dict(), meta)
    config = RunConfig(dataset="breastmnist", model="cnn", init_checkpoint=str(path))

    # Execute
    _, problems = prepare_public(data, config)

    # Assert
    assert problems == [overlap_problems(meta, path, {"sites' training": data.train})[0]]
    assert "pretrained on 3 record(s) of the sites' training data (same record digest)" in problems[0]


@needs_breast
def test_pretrain_writes_a_checkpoint_a_run_starts_from(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "breast.safetensors"

    # Execute
    meta = pretrain("breastmnist", out, public_records=60, model="cnn", epochs=1, download=False)

    # Assert: the checkpoint starts a run that sets the same records aside, and is refused by one that does not.
    from common.datasets import load

    data = load("breastmnist", download=False)
    assert meta["public_records"] == 60 and len(meta["record_digests"]) == 60 and meta["dp"] is False
    config = RunConfig(dataset="breastmnist", model="cnn", init_checkpoint=str(out), fine_tune="head")
    assert checkpoint_problems(config, data.info) == []
    rest, problems = prepare_public(data, config.replace(public_records=60))
    assert problems == [] and len(rest.train) == len(data.train) - 60
    _, problems = prepare_public(data, config)
    assert len(problems) == 1 and "pretrained on 60 record(s) of the sites' training data" in problems[0]
    state = initial_model(config, data.info).state_dict()
    assert all(torch.equal(state[k], v) for k, v in _load(out).items())


def test_a_public_record_equal_to_a_private_one_is_not_trained_on(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a dataset whose public subset holds a record with the pixels of a test record (MedMNIST's official
    # splits share a few images)
    import simulations.pretrain as module
    from common.volumes import public_indices

    data = _dataset(n_train=30)
    first_public = int(public_indices(len(data.train), 10)[0])
    data.test.images[2] = data.train.images[first_public]
    monkeypatch.setattr(module, "load", lambda *a, **k: data)
    out = tmp_path / "ck.safetensors"
    # Execute
    meta = pretrain("breastmnist", out, public_records=10, model="scatnet", epochs=1, download=False)
    # Assert: the duplicate is set aside but absent from the checkpoint's records, so a run with the same public
    # split finds no overlap with its private data
    digests = set(meta["record_digests"])
    assert meta["duplicates_of_private"] == 1 and len(digests) == 9
    assert record_digests(data.test.subset(np.array([2])))[0] not in digests
    config = RunConfig(dataset="breastmnist", model="scatnet", init_checkpoint=str(out), public_records=10)
    _, problems = prepare_public(data, config)
    assert problems == []


def test_pretrain_reports_every_bad_input_before_loading(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(ConfigError) as err:
        pretrain("nosuchdata", tmp_path / "x.pt", public_records=1, holdout=1.5)

    # Assert
    text = str(err.value)
    for needle in ("dataset='nosuchdata' is unknown", "--public-records 1", "--holdout 1.5", "name the checkpoint"):
        assert needle in text


def _load(path: Path) -> dict[str, torch.Tensor]:
    from common.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


def test_pretrain_is_a_medsilo_command() -> None:
    # Prepare
    from common.cli import build_parser

    # Execute
    args = build_parser().parse_args(["pretrain", "--dataset", "msd-hippocampus", "--out", "p.safetensors",
                                      "--public-records", "50"])

    # Assert
    assert args.command == "pretrain" and args.public_records == 50 and args.epochs == 0
    assert args.func.__module__ == "simulations.pretrain"
