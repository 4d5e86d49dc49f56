"""DP-SGD on volumes: the 3D path's clipped gradients, and the 3D recipe's model under DP-SGD (issue 27)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from client.dp import sgd
from client.dp.clipping import IndexedRecords, unsupported_layers
from client.dp.rng import reproducible
from common.config import RunConfig
from common.datasets import Task, dataset_info
from common.models import (
    CoarseLinear3D,
    CompactCNN,
    ExplainableModel,
    build_model,
    fixed_front,
    split_for_cam,
)
from common.recipes import defaults_for


def _volumes(n: int, seed: int, side: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary shape volumes, 1 positive in 5, whose positives are larger balls (as AdrenalMNIST3D's hyperplasia).

    Background -1, the organ +1: a ball of radius 2.5 (+0.8 when positive, sd 0.5) near the centre.
    """
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=gen) < 0.2).float()
    radius = 2.5 + 0.8 * y + 0.5 * torch.randn(n, generator=gen)
    centre = (side - 1) / 2 + torch.randn(n, 3, generator=gen)
    axis = torch.arange(side, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, side, side, side)
    dist2 = ((grid[None] - centre[:, :, None, None, None]) ** 2).sum(1)
    x = torch.where(dist2 <= radius[:, None, None, None] ** 2, 1.0, -1.0)[:, None]
    return x, y[:, None]


def _per_record_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Independent reference: each record's gradient by its own backward pass, clipped as Opacus does, summed."""
    loss_fn = nn.BCEWithLogitsLoss()
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()])
    norms = torch.stack([torch.stack([(g * g).sum() for g in record]).sum().sqrt() for record in grads])
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return norms, [torch.stack([factors[i] * grads[i][k] for i in range(len(x))]).sum(0) for k in range(len(grads[0]))]


def test_expanded_weights_on_conv3d_give_the_per_record_loops_clipped_sum() -> None:
    # Prepare: a small 3D CNN (Conv3d: Opacus's expanded weights), an unbalanced batch, a copy for the loop.
    torch.manual_seed(0)
    model, reference = CompactCNN(1, 1, dims=3, width=4), CompactCNN(1, 1, dims=3, width=4)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 1, 8, 8, 8), torch.tensor([[0.0], [1.0], [0.0], [0.0], [1.0]])
    norms, expected = _per_record_clipped_sum(reference, x, y, max_grad_norm=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), IndexedRecords(x, y),
                                   sample_rate=0.5, noise_multiplier=0.0, max_grad_norm=0.05,
                                   expected_batch_size=5.0, randomness=reproducible(seed=0, site=0), server_round=1)

    # Execute: the DP-SGD step's gradient, times the normaliser it was divided by, is the clipped sum.
    private.backward(nn.BCEWithLogitsLoss()(private.model(x), y))
    samples: list[torch.Tensor] = [p.grad_sample for p in model.parameters()]  # type: ignore[attr-defined]
    grad_norms = torch.stack([(g.flatten(1) ** 2).sum(1) for g in samples]).sum(0).sqrt()
    private.optimizer.step()
    private.close()

    # Assert: the same per-record norms (all above the bound: every record is clipped), the same sum and sign.
    assert private.how == sgd.GRAD_SAMPLE_MODE
    assert bool((norms > 0.05).all())
    torch.testing.assert_close(grad_norms, norms, rtol=1e-4, atol=1e-7)
    for param, clipped in zip(model.parameters(), expected, strict=True):
        assert param.grad is not None
        torch.testing.assert_close(param.grad * 5.0, clipped, rtol=1e-4, atol=1e-7)


def test_the_3d_dp_recipe_trains_a_linear_model_the_one_pass_clipper_clips() -> None:
    # Prepare
    info = dataset_info("adrenalmnist3d")

    # Execute
    private, plain = defaults_for("adrenalmnist3d", dp=True), defaults_for("adrenalmnist3d", dp=False)
    model = build_model(private["model"], info, seed=0)
    split = fixed_front(model)

    # Assert: under DP the coarse linear model on fixed features; without DP the compact 3D CNN (auto) as before.
    assert private["model"] == "coarse-3d" and plain["model"] == "auto"
    assert split is not None
    front, trainable = split
    assert not list(front.parameters())
    assert unsupported_layers(trainable) == []
    assert sum(p.numel() for p in model.parameters()) == 4**3 + 1


def test_coarse_model_is_its_fixed_front_then_its_head_for_training_and_grad_cam() -> None:
    # Prepare
    torch.manual_seed(0)
    model = CoarseLinear3D(1, 1)
    x = torch.rand(3, 1, 28, 28, 28) * 2 - 1

    # Execute
    front, trainable = fixed_front(model) or (None, None)
    body, head = split_for_cam(model)
    scripted = torch.jit.script(ExplainableModel(model))  # what medsilo export writes

    # Assert: the same logits three ways; an all-background volume has all-zero features.
    assert front is not None and trainable is not None
    torch.testing.assert_close(trainable(front(x)), model(x))
    torch.testing.assert_close(head(body(x)), model(x))
    torch.testing.assert_close(scripted(x), model(x))
    assert body(x).shape == (3, 1, 4, 4, 4)
    assert torch.count_nonzero(front(-torch.ones(1, 1, 28, 28, 28))) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_sgd_on_the_coarse_model_ranks_the_minority_class_above_chance(seed: int) -> None:
    # Prepare: 240 records (the size of a site), 1 positive in 5; the 3D recipe's settings at ε=8.
    x, y = _volumes(240, seed=0)
    x_test, y_test = _volumes(400, seed=1)
    recipe = defaults_for("adrenalmnist3d", dp=True)
    config = RunConfig(dataset="adrenalmnist3d", model=recipe["model"], dp_lr=recipe["dp_lr"], epsilon=8.0)
    plan = sgd.plan_for_records(config, len(x))
    scores = {}

    # Execute: three rounds of DP-SGD with the intercept as a fast weight (the model's default), and as a plain bias.
    for bias_gain in (16.0, 1.0):
        torch.manual_seed(seed)
        model = CoarseLinear3D(1, 1, bias_gain=bias_gain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for server_round in (1, 2, 3):
                sgd.train_dp(model, TensorDataset(x, y), Task.BINARY, config, plan,
                             randomness=reproducible(seed=seed, site=0), server_round=server_round)
        with torch.no_grad():
            scores[bias_gain] = roc_auc_score(y_test.numpy().ravel(), model(x_test).numpy().ravel())

    # Assert: the default ranks the larger organs first; a plain bias, learned no faster than each cell's weight,
    # lowers the logits towards the majority class mostly through the cells, that is for the larger organs first.
    assert scores[16.0] > 0.7
    assert scores[16.0] > scores[1.0] + 0.15
    assert np.isfinite(scores[1.0])
