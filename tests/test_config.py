from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common import recipes
from common.config import RunConfig
from common.errors import ConfigError
from common.recipes import (
    MODEL_DEFAULTS,
    RECIPE_OPTIONS,
    SCATTERING_CNN_DP_MIRROR_EPSILON,
    SMALL_DATASET_DP_SCAFFOLD_EPSILON,
    defaults_for,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_defaults_equal_run_config_defaults() -> None:
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr == recipes.flower_defaults()
    assert {k for k, v in flwr.items() if v != RunConfig().to_flower()[k]} == {
        RunConfig.key(n) for n in recipes.RECIPE_FIELDS if n != "model"}  # only the recipe's settings say "auto"


@pytest.mark.parametrize(
    "dataset", ["pneumoniamnist", "breastmnist", "retinamnist", "msd-hippocampus", "adrenalmnist3d"])
@pytest.mark.parametrize(("dp", "epsilon"), [(True, 8.0), (True, 1.0), (False, 8.0)])
def test_a_deployment_resolves_the_same_settings_as_a_simulation_of_the_same_dataset(
        dataset: str, dp: bool, epsilon: float) -> None:
    # Prepare: the deployed app's run config as `flwr run . -c 'dataset=... dp=... epsilon=...'` makes it
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {**shipped, "dataset": dataset, "dp": dp, "epsilon": epsilon}

    # Execute
    deployed = recipes.from_flower(run_config)

    # Assert: every recipe setting is what `medsilo simulate` starts from (its flags not given)
    simulated = defaults_for(dataset, dp=dp, epsilon=epsilon)
    for name in recipes.RECIPE_FIELDS:
        assert getattr(deployed, name) == simulated[name], name
    assert "auto" not in {str(v) for k, v in deployed.to_flower().items() if k != "model"}


def test_a_setting_the_coordinator_gives_wins_over_the_recipe() -> None:
    # Prepare
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    # Execute: BreastMNIST's recipe under DP is 15 rounds, clipping 0.3, FedAvg, scatnet-mirror
    cfg = recipes.from_flower({**shipped, "dataset": "breastmnist", "rounds": 10, "max-grad-norm": 1.0})

    # Assert
    assert (cfg.rounds, cfg.max_grad_norm) == (10, 1.0)
    assert (cfg.strategy, cfg.model, cfg.scaffold) == ("fedavg", "scatnet-mirror", True)


def test_segmentation_defaults_depend_on_dp_and_classification_defaults_do_not() -> None:
    # Prepare / Execute
    seg_dp, seg_plain = defaults_for("msd-hippocampus", dp=True), defaults_for("msd-hippocampus", dp=False)
    cls_dp, cls_plain = defaults_for("pneumoniamnist", dp=True), defaults_for("pneumoniamnist", dp=False)

    # Assert: under DP a segmentation site takes fewer, larger steps (less noise per step for the same ε)
    assert seg_dp["local_epochs"] < seg_plain["local_epochs"] and seg_dp["batch_size"] > seg_plain["batch_size"]
    differs = ("local_epochs", "batch_size")
    assert {k: v for k, v in seg_dp.items() if k not in differs} == {
        k: v for k, v in seg_plain.items() if k not in differs}
    assert cls_dp == cls_plain


def test_small_2d_datasets_train_more_shorter_rounds_with_a_lower_clipping_bound_and_scaffold() -> None:
    # Prepare / Execute
    breast, pneumonia = (defaults_for(d) for d in ("breastmnist", "pneumoniamnist"))
    adrenal = defaults_for("adrenalmnist3d", dp=False)  # 3D under DP-SGD: tests/test_dp_3d.py

    # Assert: 546 BreastMNIST images get the small-dataset recipe; larger and 3D datasets keep the defaults
    assert breast["rounds"] > pneumonia["rounds"] == adrenal["rounds"] == RunConfig().rounds
    # under DP half as many rounds: every noised step is paid from the site's budget
    assert breast["rounds"] * 2 == defaults_for("breastmnist", dp=False)["rounds"]
    # SCAFFOLD without DP, and under DP from a budget where the control variates are not mostly noise
    assert defaults_for("breastmnist", dp=False)["scaffold"] and breast["scaffold"]
    assert not defaults_for("breastmnist", epsilon=1.0)["scaffold"]
    assert defaults_for("breastmnist", epsilon=SMALL_DATASET_DP_SCAFFOLD_EPSILON)["scaffold"]
    assert not defaults_for("pneumoniamnist", dp=False)["scaffold"]
    # under DP the mirror-invariant scattering model, unless the user names a model; elsewhere auto stays auto
    assert breast["model"] == "scatnet-mirror"
    assert defaults_for("breastmnist", model="scatnet")["model"] == "scatnet"
    assert pneumonia["model"] == adrenal["model"] == "auto"
    assert breast["max_grad_norm"] < pneumonia["max_grad_norm"] == adrenal["max_grad_norm"] == RunConfig().max_grad_norm
    assert adrenal == {k: getattr(RunConfig(), k) for k in adrenal}


def test_the_scattering_cnn_datasets_train_the_mirror_invariant_cnn_under_dp_below_its_epsilon() -> None:
    # Prepare / Execute
    bound = SCATTERING_CNN_DP_MIRROR_EPSILON
    low, at, plain = (defaults_for("pneumoniamnist", dp=dp, epsilon=e)
                      for dp, e in ((True, bound / 4), (True, bound), (False, 1.0)))
    named = defaults_for("pneumoniamnist", epsilon=1.0, model="scatcnn")

    # Assert: the mirror below the bound, with the scattering CNN's own step sizes; scatcnn (auto) from the bound
    # on and without DP; a model the user names wins; the other datasets are untouched
    assert low["model"] == "scatcnn-mirror" and low["dp_lr"] == MODEL_DEFAULTS["scatcnn"]["dp_lr"]
    assert at["model"] == plain["model"] == "auto" and named["model"] == "scatcnn"
    assert {k: v for k, v in low.items() if k != "model"} == {k: v for k, v in at.items() if k != "model"}
    assert defaults_for("breastmnist", epsilon=1.0)["model"] == "scatnet-mirror"
    assert defaults_for("adrenalmnist3d", epsilon=1.0)["model"] == "coarse-3d"


def test_small_2d_datasets_average_by_plain_fedavg_and_without_dp_train_the_scattering_cnn() -> None:
    # Prepare / Execute
    plain, named = (defaults_for("breastmnist", dp=False, model=m) for m in ("auto", "scatnet"))
    private = defaults_for("breastmnist")

    # Assert: learned features cost no budget without DP; no server momentum (it made scatcnn diverge, and
    # lost under DP)
    assert plain["model"] == "scatcnn" and plain["strategy"] == "fedavg" and plain["scaffold"]
    assert plain["lr"] == MODEL_DEFAULTS["scatcnn"]["lr"]  # the model's own defaults come with it
    assert named["model"] == "scatnet" and named["lr"] == RunConfig().lr  # a named model wins, with its defaults
    assert private["strategy"] == "fedavg" != RunConfig().strategy
    assert defaults_for("pneumoniamnist", dp=False)["strategy"] == defaults_for("pneumoniamnist")["strategy"] == (
        RunConfig().strategy)


def test_small_colour_datasets_without_dp_train_the_augmented_cnn_and_the_flag_can_turn_augmentation_off() -> None:
    # Prepare / Execute: RetinaMNIST (colour fundus photographs, 1,080 records) and BreastMNIST (grey ultrasound)
    from common.cli import build_parser
    from simulations.experiment import research_config_values

    retina, retina_dp, breast = (defaults_for(d, dp=dp) for d, dp in
                                 (("retinamnist", False), ("retinamnist", True), ("breastmnist", False)))
    args = build_parser().parse_args(["simulate", "--dataset", "retinamnist", "--no-dp", "--no-augment"])
    settings = {name: getattr(args, name) for name in RECIPE_OPTIONS}
    flagged = research_config_values("retinamnist", dp=False, epsilon=8.0, model="auto", settings=settings)

    # Assert: only the colour dataset without DP changes; the flag wins over the recipe
    assert (retina["model"], retina["augment"]) == ("cnn", True)
    assert retina["lr"] == RunConfig().lr  # the compact CNN's defaults, not the scattering CNN's
    assert (retina_dp["model"], retina_dp["augment"]) == ("scatnet-mirror", False)
    assert (breast["model"], breast["augment"]) == ("scatcnn", False)
    assert (flagged["model"], flagged["augment"]) == ("cnn", False)


def test_a_model_brings_its_own_defaults_whether_named_or_picked_by_auto() -> None:
    # Prepare / Execute: PneumoniaMNIST's auto model is the CNN on scattering maps
    auto, named, cnn = (defaults_for("pneumoniamnist", model=m) for m in ("auto", "scatcnn", "cnn"))

    # Assert: larger steps for the scattering CNN only; the compact CNN keeps the run defaults
    assert auto == {**named, "model": "auto"}  # a named model is kept as named
    assert auto["dp_lr"] == MODEL_DEFAULTS["scatcnn"]["dp_lr"] > RunConfig().dp_lr
    assert auto["lr"] == MODEL_DEFAULTS["scatcnn"]["lr"] > RunConfig().lr
    assert cnn == {**{k: getattr(RunConfig(), k) for k in cnn}, "model": "cnn"}


def test_round_trip_through_flower_run_config() -> None:
    cfg = RunConfig(dataset="breastmnist", rounds=3, dp=False, epsilon=2.0)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"dataset": "nomnist", "epsilon": -1.0, "delta": 1.5, "model": "",
                               "strategy": "fedsgd", "rounds": 0})
    text = str(info.value)
    assert len(info.value.problems) == 6
    for needle in ("dataset='nomnist'", "epsilon=-1.0", "delta=1.5", "model=''", "strategy='fedsgd'",
                   "rounds=0"):
        assert needle in text


def test_unknown_and_mistyped_keys_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"epsilonn": 3.0, "rounds": "many"})
    assert len(info.value.problems) == 2
    assert "unknown setting 'epsilonn'" in str(info.value)


def test_dp_off_skips_budget_checks() -> None:
    assert RunConfig(dp=False, epsilon=0.0).problems() == []
