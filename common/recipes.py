"""Dataset recipes: the one source of a run's dataset-dependent defaults, for simulation and deployment alike.

A recipe is what medsilo trains a dataset with unless told otherwise: rounds, local epochs, batch size, learning
rates, clipping bound, aggregation rule and model, chosen by the dataset's task and size and by DP-SGD and its ε.
The measurements behind each choice are in docs/results.md ("Why the recipes are what they are").

``medsilo simulate`` starts from :func:`defaults_for` and applies the flags given. In deployment the app's run
config (``[tool.flwr.app.config]``) writes every recipe-controlled setting as ``"auto"``; the ServerApp and every
ClientApp turn a Flower run config into a :class:`~common.config.RunConfig` with :func:`from_flower`, which
replaces each ``"auto"`` by the recipe's value, so a deployment and a simulation of the same dataset resolve the
same settings while a value the coordinator sets with ``-c`` wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from common.config import RunConfig
from common.datasets import CATALOG, DatasetInfo, Task

#: The value that means "the dataset's recipe" in a Flower run config.
AUTO = "auto"

#: 2D classification datasets with fewer training records than this train, with ``model=auto``, the linear model on
#: fixed wavelet-scattering features (``scatnet``) and get the small-dataset recipe.
SMALL_DATASET_RECORDS = 2_000

#: 2D classification datasets with at least :data:`SMALL_DATASET_RECORDS` and fewer training records than this
#: train, with ``model=auto``, the CNN on scattering maps (``scatcnn``). Larger datasets keep the compact CNN: the
#: scattering transform is paid once per image and round.
SCATTERING_CNN_RECORDS = 10_000

#: A model's own defaults, whether named or picked by ``auto``: the CNN on scattering maps trains a shallow head on
#: fixed features and takes larger steps.
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    "scatcnn": {"lr": 0.005, "dp_lr": 0.02},
    "scatcnn-mirror": {"lr": 0.005, "dp_lr": 0.02},
    "coarse-3d": {"lr": 0.02, "dp_lr": 0.05},  # a linear model on fixed features: larger steps
}

#: Defaults that differ for segmentation datasets (a record is a patient's volume; sites hold tens of them).
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "rounds": 15,
    "local_epochs": 6,
    "batch_size": 4,
    "lr": 0.003,
    "dp_lr": 0.01,
    "max_grad_norm": 1.0,
    "strategy": "fedavg",
}

#: Segmentation under DP-SGD: fewer, larger steps (the budget is fixed, so every extra step raises the noise).
SEGMENTATION_DP_DEFAULTS: dict[str, Any] = {"local_epochs": 3, "batch_size": 8}

#: Small 2D datasets (fewer than :data:`SMALL_DATASET_RECORDS` training records, e.g. BreastMNIST):
#: 30 rounds of 3 local epochs, clipping at 0.3, SCAFFOLD's drift correction, plain FedAvg.
SMALL_DATASET_DEFAULTS: dict[str, Any] = {
    "rounds": 30, "local_epochs": 3, "max_grad_norm": 0.3, "scaffold": True, "strategy": "fedavg",
}

#: Small 2D datasets under DP-SGD: 15 rounds, the mirror-invariant scattering model, no SCAFFOLD below
#: :data:`SMALL_DATASET_DP_SCAFFOLD_EPSILON`.
SMALL_DATASET_DP_DEFAULTS: dict[str, Any] = {"rounds": 15, "scaffold": False, "model": "scatnet-mirror"}

#: Small 2D datasets under DP-SGD keep SCAFFOLD when each site's ε is at least this: a site's control variate is
#: the mean of the noised gradients it stepped on, so its noise grows as ε shrinks.
SMALL_DATASET_DP_SCAFFOLD_EPSILON = 4.0

#: Small 2D datasets without DP: the CNN on scattering maps (learned shapes cost no privacy budget there).
SMALL_DATASET_NO_DP_DEFAULTS: dict[str, Any] = {"model": "scatcnn"}

#: Small 2D colour datasets (e.g. RetinaMNIST's fundus photographs) without DP, on top of
#: :data:`SMALL_DATASET_NO_DP_DEFAULTS`: the compact CNN with training augmentation. Scattering triples the
#: channels of a colour image (243 maps) for a few hundred records per site, and the CNN learns colour and shape
#: together.
SMALL_COLOUR_DATASET_NO_DP_DEFAULTS: dict[str, Any] = {"model": "cnn", "augment": True}

#: 3D classification under DP-SGD: the linear model on coarse fixed features (``coarse-3d``) instead of the compact
#: 3D CNN, whose tens of thousands of weights a few hundred volumes per site cannot train under DP-SGD, and plain
#: FedAvg.
VOLUME_DP_DEFAULTS: dict[str, Any] = {"model": "coarse-3d", "strategy": "fedavg"}

#: 2D datasets on which ``model=auto`` trains ``scatcnn`` train, under DP-SGD with each site's ε below this,
#: ``scatcnn-mirror``: the same CNN on scattering maps averaged with the left-right mirror image's. At small ε the
#: noise, not the model's capacity, limits what a site learns, and a mirror-invariant input halves what the noise can
#: move; at large ε the mirror costs more than it saves.
SCATTERING_CNN_DP_MIRROR_EPSILON = 4.0

#: The :class:`RunConfig` fields a recipe decides; the deployment run config writes them as ``"auto"``.
RECIPE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(RunConfig)
    if any(f.name in d for d in (SEGMENTATION_DEFAULTS, SEGMENTATION_DP_DEFAULTS, SMALL_DATASET_DEFAULTS,
                                 SMALL_DATASET_DP_DEFAULTS, SMALL_DATASET_NO_DP_DEFAULTS,
                                 SMALL_COLOUR_DATASET_NO_DP_DEFAULTS, VOLUME_DP_DEFAULTS, *MODEL_DEFAULTS.values()))
    or f.name == "model"
)


#: The recipe's settings other than the model (which ``model=auto`` resolves on its own): what a research run's
#: flags override one by one.
RECIPE_OPTIONS: tuple[str, ...] = tuple(name for name in RECIPE_FIELDS if name != "model")


def auto_model(info: DatasetInfo) -> str:
    """The model ``model=auto`` trains on ``info``: segmentation the slice-wise U-Net, else by size and dimension.

    2D datasets with fewer than :data:`SMALL_DATASET_RECORDS` training records get ``scatnet``, those with fewer
    than :data:`SCATTERING_CNN_RECORDS` ``scatcnn``: both learn on fixed scattering features, which spend less of a
    site's privacy budget than learning them. Others get the compact CNN of their dimensionality.
    """
    if info.task is Task.SEGMENTATION:
        return "unet2d"
    if info.spatial_dims == 2 and info.n_train < SMALL_DATASET_RECORDS:
        return "scatnet"
    if info.spatial_dims == 2 and info.n_train < SCATTERING_CNN_RECORDS:
        return "scatcnn"
    return "cnn-3d" if info.spatial_dims == 3 else "cnn"


def defaults_for(
    dataset: str, *, dp: bool = True, epsilon: float = RunConfig.epsilon, model: str = AUTO
) -> dict[str, Any]:
    """:class:`RunConfig` defaults for ``dataset`` trained by ``model``.

    Segmentation datasets: :data:`SEGMENTATION_DEFAULTS`, and under DP-SGD (``dp``)
    :data:`SEGMENTATION_DP_DEFAULTS` on top. 2D classification datasets with fewer than
    :data:`SMALL_DATASET_RECORDS` training records: :data:`SMALL_DATASET_DEFAULTS`, and under DP-SGD
    :data:`SMALL_DATASET_DP_DEFAULTS` on top, except SCAFFOLD from :data:`SMALL_DATASET_DP_SCAFFOLD_EPSILON`
    (each site's ``epsilon``) on, and without DP-SGD :data:`SMALL_DATASET_NO_DP_DEFAULTS` on top (colour images:
    then :data:`SMALL_COLOUR_DATASET_NO_DP_DEFAULTS`). 3D
    classification datasets under DP-SGD: :data:`VOLUME_DP_DEFAULTS`. Datasets whose ``auto`` model is ``scatcnn``,
    under DP-SGD below :data:`SCATTERING_CNN_DP_MIRROR_EPSILON`: ``scatcnn-mirror``. ``model``
    other than ``auto`` is kept as ``values["model"]``; ``auto`` becomes the dataset's model where its recipe
    names one and stays ``auto`` otherwise. Then the model's own :data:`MODEL_DEFAULTS` (``auto``
    resolved for the dataset).
    """
    values = {f.name: f.default for f in fields(RunConfig)}
    info = CATALOG.get(dataset.lower())
    if info is not None and info.task is Task.SEGMENTATION:
        values.update(SEGMENTATION_DEFAULTS)
        if dp:
            values.update(SEGMENTATION_DP_DEFAULTS)
    elif info is not None and info.spatial_dims == 2 and info.n_train < SMALL_DATASET_RECORDS:
        values.update(SMALL_DATASET_DEFAULTS)
        if dp:
            values.update(SMALL_DATASET_DP_DEFAULTS)
            values["scaffold"] = epsilon >= SMALL_DATASET_DP_SCAFFOLD_EPSILON
        else:
            values.update(SMALL_DATASET_NO_DP_DEFAULTS)
            if info.channels == 3:
                values.update(SMALL_COLOUR_DATASET_NO_DP_DEFAULTS)
    elif info is not None and info.spatial_dims == 3 and dp:
        values.update(VOLUME_DP_DEFAULTS)
    elif (info is not None and dp and epsilon < SCATTERING_CNN_DP_MIRROR_EPSILON
          and auto_model(info) == "scatcnn"):
        values["model"] = "scatcnn-mirror"
    if model != AUTO:  # a model the user names wins over the dataset's
        values["model"] = model
    resolved = str(values["model"])
    if resolved == AUTO and info is not None:
        resolved = auto_model(info)
    values.update(MODEL_DEFAULTS.get(resolved, {}))
    return values


def flower_defaults() -> dict[str, bool | int | float | str]:
    """The deployment app's ``[tool.flwr.app.config]``: :class:`RunConfig`'s defaults, recipe fields as ``auto``."""
    flat = RunConfig().to_flower()
    return {key: (AUTO if key in {RunConfig.key(n) for n in RECIPE_FIELDS} else value) for key, value in flat.items()}


def from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a Flower run config, every ``"auto"`` replaced by the dataset's recipe.

    Raises
    ------
    ConfigError
        Listing every problem at once: unknown keys, values of the wrong type, invalid settings. Whether the model
        fits the dataset is checked where models are built (:func:`common.models.model_problems`).

    """
    auto_keys = {RunConfig.key(n) for n in RECIPE_FIELDS if run_config.get(RunConfig.key(n)) == AUTO}
    named = {k: v for k, v in run_config.items() if k not in auto_keys}
    base = RunConfig.from_flower(named)  # recipe fields left out take RunConfig's defaults, then the recipe's
    model = str(run_config.get("model", AUTO))
    recipe = defaults_for(base.dataset, dp=base.dp, epsilon=base.epsilon, model=model)
    return base.replace(**{n: recipe[n] for n in RECIPE_FIELDS if RunConfig.key(n) in auto_keys})

