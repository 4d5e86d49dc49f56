"""Per-record clipping in one backward pass gives exactly Opacus's clipped gradients, noise and accounting."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import clipping, sgd
from client.dp.clipping import IndexedRecords, PerRecordClipper, unsupported_layers
from client.dp.rng import os_entropy, reproducible
from common.config import RunConfig
from common.datasets import Task, dataset_info
from common.models import build_model


class _Odd(nn.Module):
    """Layers off the default path: strided, dilated and bias-free convolutions, a linear layer over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, dilation=2, padding=2)
        self.conv3 = nn.Conv2d(6, 5, (1, 3), stride=(1, 2))
        self.mix = nn.Linear(5, 4)
        self.head = nn.Linear(4 * 7 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv3(torch.tanh(self.conv2(self.norm(self.conv1(x))))))  # (N, 5, 7, 3)
        h = self.mix(h.permute(0, 2, 3, 1))  # a linear layer applied at every position
        return self.head(h.flatten(1))


def _data(model_name: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    if model_name == "odd":
        return _Odd(), torch.randn(n, 3, 14, 14), torch.randint(0, 2, (n,)), nn.CrossEntropyLoss()
    model = build_model(model_name, dataset_info("pneumoniamnist"), seed=0)
    return model, torch.randn(n, 1, 28, 28), torch.randint(0, 2, (n, 1)).float(), nn.BCEWithLogitsLoss()


def _opacus_hooks_clipped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                          max_grad_norm: float) -> list[torch.Tensor]:
    """Opacus's reference: its hooks' per-record gradients, clipped and summed by its own optimizer (no noise)."""
    data = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
            data_loader=data,
            noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode="hooks", loss_reduction="sum",
        )
    opt.zero_grad()
    (loss_fn(private(x), y) * len(x)).backward()  # "sum" of the mean loss's per-record shares, as with "mean"
    opt.step()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    """Each record's gradient norm, one record at a time (no per-sample machinery at all)."""
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    return torch.stack(norms)


@pytest.mark.parametrize("model_name", ["scatcnn", "cnn", "scatnet", "scatnet-mirror", "resnet18-small", "odd"])
@pytest.mark.parametrize("route", ["auto", "gram", "materialised"])
def test_clipped_sum_equals_opacus_hooks(model_name: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a batch whose records half exceed the clipping norm; the convolution route forced or left to cost.
    if route != "auto":
        monkeypatch.setattr(clipping, "_gram_cheaper", lambda *_: route == "gram")
    model, x, y, loss_fn = _data(model_name, 12)
    bound = float(_norms(copy.deepcopy(model), x, y, loss_fn).median())
    reference = _opacus_hooks_clipped(copy.deepcopy(model), x, y, loss_fn, bound)
    clipper = PerRecordClipper(model, max_grad_norm=bound)

    # Execute
    clipper.backward(loss_fn(model(x), y))
    clipper.close()

    # Assert: the same clipped sum for every parameter, and clipping did bind.
    ours = [p.grad for p in model.parameters()]
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6 * bound)
    total = torch.cat([g.flatten() for g in ours]).norm()
    assert 0 < total <= len(x) * bound * (1 + 1e-5)


@pytest.mark.parametrize("route", ["gram", "materialised"])
def test_frozen_weights_get_no_gradient_and_add_nothing_to_the_norm(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a frozen convolution bias, linear weight and GroupNorm weight; the rest trains.
    monkeypatch.setattr(clipping, "_gram_cheaper", lambda *_: route == "gram")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    for frozen in (model[0].bias, model[1].weight, model[3].weight):
        frozen.requires_grad_(False)
    x, y = torch.randn(10, 3, 6, 6), torch.randn(10, 1)
    loss_fn = nn.MSELoss()
    reference = _opacus_hooks_clipped(copy.deepcopy(model), x, y, loss_fn, 0.05)
    clipper = PerRecordClipper(model, max_grad_norm=0.05)

    # Execute
    clipper.backward(loss_fn(model(x), y))
    clipper.close()

    # Assert: the trained parameters match Opacus's hooks; the frozen ones have no gradient.
    trained = [p for p in model.parameters() if p.requires_grad]
    for mine, theirs in zip(trained, reference, strict=True):
        torch.testing.assert_close(mine.grad, theirs, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_the_cost_rule_picks_the_gram_route_for_many_channels_on_small_maps() -> None:
    # Prepare: the scattering CNN's first convolution (81 maps at 7 x 7) and the compact CNN's (1 channel at 28 x 28).
    scat = build_model("scatcnn", dataset_info("pneumoniamnist"), seed=0)
    cnn = build_model("cnn", dataset_info("pneumoniamnist"), seed=0)
    first_scat = scat.features[0]
    first_cnn = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d))

    # Execute / Assert
    assert clipping._gram_cheaper(first_scat, torch.zeros(2, 81, 7, 7), torch.zeros(2, 32, 7, 7))
    assert not clipping._gram_cheaper(first_cnn, torch.zeros(2, 1, 28, 28), torch.zeros(2, first_cnn.out_channels,
                                                                                           28, 28))


def test_unsupported_layers_are_named_and_keep_opacus_grad_samplers() -> None:
    # Prepare: a 3D CNN (Conv3d) and a grouped convolution.
    model = build_model("cnn-3d", dataset_info("organmnist3d"), seed=0)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 1))

    class Standardised(nn.Linear):  # computes otherwise than its base class
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.weight / self.weight.norm(), self.bias)

    # Execute
    found, found_grouped = unsupported_layers(model), unsupported_layers(grouped)
    found_subclass = unsupported_layers(nn.Sequential(Standardised(3, 1)))

    # Assert
    assert found and all("Conv3d" in f for f in found)
    assert found_grouped == ["0 (Conv2d, groups=2)"]
    assert found_subclass == ["0 (Standardised)"]
    with pytest.raises(ValueError, match=r"0 \(Conv2d, groups=2\).*grad samplers"):
        PerRecordClipper(grouped, max_grad_norm=1.0)
    data = DataLoader(TensorDataset(torch.zeros(8, 1, 28, 28, 28), torch.zeros(8, 1)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   sgd.records_dataset(data.dataset), sample_rate=0.5, noise_multiplier=1.0,
                                   max_grad_norm=1.0, expected_batch_size=4.0, randomness=os_entropy(), server_round=1)
    assert private.how == sgd.GRAD_SAMPLE_MODE
    private.close()


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x))


def test_a_layer_run_twice_is_refused_and_a_new_forward_starts_afresh() -> None:
    # Prepare: one linear layer applied twice in a forward pass (shared weights); a model without sharing.
    twice, once = _Twice(), nn.Sequential(nn.Linear(3, 3))
    clipper, clipper_once = PerRecordClipper(twice, max_grad_norm=1.0), PerRecordClipper(once, max_grad_norm=1.0)
    x = torch.randn(4, 3)

    # Execute / Assert: refused; two forward passes of the model before one backward are fine (the last counts).
    with pytest.raises(RuntimeError, match="layer ran 2 times"):
        clipper.backward(twice(x).sum())
    once(x)
    clipper_once.backward(once(x).sum())
    assert clipper_once.clipped
    for c, m in ((clipper, twice), (clipper_once, once)):
        c.close()
        assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in m.modules())


@pytest.mark.parametrize("spare_runs", [False, True])
def test_a_layer_the_loss_does_not_use_gets_a_zero_gradient_and_scoring_records_nothing(spare_runs: bool) -> None:
    # Prepare: two heads, the loss uses one; the other is skipped or runs without reaching the loss.
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "spare": nn.Linear(3, 1)})
    clipper = PerRecordClipper(model, max_grad_norm=0.1)
    x = torch.randn(5, 3)
    with torch.no_grad():
        model["used"](x)  # scoring: not recorded
    if spare_runs:
        model["spare"](x)

    # Execute
    clipper.backward(model["used"](x).square().mean())

    # Assert: the used head's clipped sum is bounded by the records' clipped norms; the spare head's is zero.
    used = torch.cat([model["used"].weight.grad.flatten(), model["used"].bias.grad])
    assert 0 < used.norm() <= 5 * 0.1 * (1 + 1e-5)
    assert torch.equal(model["spare"].weight.grad, torch.zeros(1, 3))
    assert torch.equal(model["spare"].bias.grad, torch.zeros(1))
    clipper.close()


@pytest.mark.parametrize("model_name", ["scatcnn", "cnn"])
def test_dp_round_matches_opacus_expanded_weights(model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole round: same Poisson batches, clipped sums, noise, steps and accountant history as before."""
    # Prepare: one site's round of DP-SGD, once in one pass and once with Opacus's expanded weights.
    info = dataset_info("pneumoniamnist")
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(96, 1, 28, 28), torch.randint(0, 2, (96, 1)).float())
    config = RunConfig(rounds=2, local_epochs=2, batch_size=16, epsilon=4.0, delta=1e-5, model=model_name,
                       max_grad_norm=0.5, augment=False)
    plan = sgd.plan_for_records(config, len(data))
    runs = {}
    for how in ("one-pass", sgd.GRAD_SAMPLE_MODE):
        if how != "one-pass":
            monkeypatch.setattr(clipping, "unsupported_layers", lambda _: ["forced"])
        model = build_model(model_name, info, seed=0)

        # Execute
        result = sgd.train_dp(model, data, Task.BINARY, config, plan, randomness=reproducible(seed=3, site=0),
                              server_round=1)
        runs[how] = (torch.cat([p.detach().flatten() for p in model.parameters()]), result)

    # Assert: the same model (float rounding apart) and the same noised steps; hooks removed afterwards.
    (ours, ours_result), (theirs, theirs_result) = runs.values()
    assert not torch.equal(ours, torch.cat([p.flatten() for p in build_model(model_name, info, seed=0).parameters()]))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)
    assert ours_result.steps == theirs_result.steps == plan.steps_per_round
    assert all(not m._forward_hooks for m in model.modules())


def test_a_step_on_an_unclipped_gradient_is_refused() -> None:
    # Prepare: DP-SGD set up with one-pass clipping, then a plain backward pass instead of the clipper's.
    model = build_model("cnn", dataset_info("pneumoniamnist"), seed=0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 28, 28), torch.zeros(32, 1)), batch_size=8)
    private = sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), sgd.records_dataset(data.dataset),
                               sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8.0,
                               randomness=os_entropy(), server_round=1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 1, 28, 28)

    # Execute / Assert: refused, the weights and the accountant untouched; the clipper's own pass then steps.
    nn.functional.binary_cross_entropy_with_logits(private.model(x), torch.ones(8, 1)).backward()
    with pytest.raises(RuntimeError, match="not clipped per record"):
        private.optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    private.optimizer.zero_grad()
    private.backward(nn.functional.binary_cross_entropy_with_logits(private.model(x), torch.ones(8, 1)))
    private.optimizer.step()
    with pytest.raises(RuntimeError, match="not clipped per record"):  # one clipped backward, one step
        private.optimizer.step()
    private.close()
    assert private.how == "one-pass" and not all(torch.equal(b, p) for b, p in zip(before, model.parameters(),
                                                                                  strict=True))


def test_record_grams_are_looked_up_only_for_the_batch_served_unchanged() -> None:
    # Prepare: the scattering CNN's first convolution over records served by IndexedRecords.
    model = build_model("scatcnn", dataset_info("pneumoniamnist"), seed=0)
    conv = model.features[0]
    torch.manual_seed(0)
    records = IndexedRecords(torch.randn(300, 81, 7, 7), torch.zeros(300, 1))
    clipper = PerRecordClipper(model, max_grad_norm=1.0, records=records)
    batch, _ = IndexedRecords.collate(records.__getitems__([5, 280, 3]))

    # Execute
    looked_up = clipper._input_gram(conv, batch.detach(), (7, 7))
    other = torch.randn_like(batch)
    other_batch = clipper._input_gram(conv, other, (7, 7))
    batch.mul_(2)  # written in place after it was served
    after_write = clipper._input_gram(conv, batch.detach(), (7, 7))

    # Assert: the lookup (computed for all 300 records, in chunks) equals computing; another tensor of the same
    # shape, or the batch written to, is computed afresh, never looked up.
    assert conv in clipper._record_grams and clipper._record_grams[conv][0].shape == (300, 49 * 49)
    torch.testing.assert_close(looked_up, clipping._unfolded_gram(conv, batch / 2, (7, 7)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(other_batch, clipping._unfolded_gram(conv, other, (7, 7)))
    torch.testing.assert_close(after_write, 4 * looked_up, rtol=1e-5, atol=1e-3)
    records.inputs.mul_(3)  # the records themselves written to: their Gram matrices are computed again
    batch, _ = IndexedRecords.collate(records.__getitems__([5, 280, 3]))
    torch.testing.assert_close(clipper._input_gram(conv, batch, (7, 7)), 9 * looked_up, rtol=1e-5, atol=1e-3)
    clipper.close()


def test_a_dp_round_on_fixed_features_computes_the_first_gram_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count the Gram computations of a DP round of the scattering CNN.
    calls: list[int] = []
    original = clipping._unfolded_gram
    monkeypatch.setattr(clipping, "_unfolded_gram", lambda conv, x, hw: calls.append(conv.in_channels) or
                        original(conv, x, hw))
    info = dataset_info("pneumoniamnist")
    data = TensorDataset(torch.randn(96, 1, 28, 28), torch.randint(0, 2, (96, 1)).float())
    config = RunConfig(rounds=1, local_epochs=2, batch_size=16, epsilon=4.0, delta=1e-5, model="scatcnn",
                       augment=False)
    plan = sgd.plan_for_records(config, len(data))

    # Execute
    result = sgd.train_dp(build_model("scatcnn", info, seed=0), data, Task.BINARY, config, plan,
                          randomness=reproducible(seed=3, site=0), server_round=1)

    # Assert: the first convolution (81 scattering maps) once for all 96 records; the second at every step.
    assert calls.count(81) == 1
    assert calls.count(32) == result.steps > 1
