from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from torch.utils.data import DataLoader, TensorDataset

from client.dp import accounting as privacy


def _opacus_run(history: list, steps_epochs: int, sigma: float, n: int = 200, batch: int = 50) -> list:
    """Train a tiny model with Opacus continuing ``history``; return the accountant's history."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = DataLoader(TensorDataset(torch.randn(n, 4), torch.randn(n, 1)), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=data, noise_multiplier=sigma, max_grad_norm=1.0,
            poisson_sampling=True,
        )
    for _ in range(steps_epochs):
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return [tuple(h) for h in engine.accountant.history]


def test_epsilon_composes_over_rounds_like_opacus_own_accountant() -> None:
    # Prepare: two "rounds" of DP-SGD, the second continuing the first's history.
    round1 = _opacus_run([], 2, sigma=1.1)
    round2 = _opacus_run(round1, 2, sigma=1.1)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = round2
    # Execute
    ours = privacy.epsilon_spent(history=round2, delta=1e-5, accountant="rdp")
    # Assert: same number as Opacus's accountant, and more than after round 1.
    assert ours == pytest.approx(engine.get_epsilon(1e-5))
    assert ours > privacy.epsilon_spent(history=round1, delta=1e-5, accountant="rdp") > 0
    q = privacy.sample_rate_for(batch_size=50, num_records=200)
    assert sum(t for _, _, t in round2) == 4 * privacy.steps_per_epoch(sample_rate=q)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_merging_equal_entries_gives_opacus_own_epsilon_of_the_whole_history(accountant: str) -> None:
    # Prepare: a site's ledger after 6 rounds, one entry each, with a different plan in between
    history = [(1.3, 0.4, 5), (1.3, 0.4, 5), (0.9, 0.2, 7), (1.3, 0.4, 5), (1.3, 0.4, 0), (1.3, 0.4, 5)]
    raw = create_accountant(mechanism=accountant)
    raw.history = [h for h in history if h[2] > 0]

    # Execute
    merged = privacy.merged_history(history)
    ours = privacy.epsilon_spent(history=history, delta=1e-5, accountant=accountant)

    # Assert
    assert merged == [(1.3, 0.4, 20), (0.9, 0.2, 7)]
    assert ours == pytest.approx(raw.get_epsilon(delta=1e-5), rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_spends_at_most_the_budget(accountant: str) -> None:
    q = privacy.sample_rate_for(batch_size=64, num_records=940)
    steps = privacy.planned_steps(rounds=10, local_epochs=2, sample_rate=q)
    sigma = privacy.calibrate_noise(target_epsilon=8.0, target_delta=1e-5, sample_rate=q, steps=steps,
                                    accountant=accountant)
    eps = privacy.epsilon_spent(history=[(sigma, q, steps)], delta=1e-5, accountant=accountant)
    assert 7.5 < eps <= 8.0


def test_would_exceed_refuses_the_step_past_the_budget() -> None:
    q, sigma = 0.1, 2.0
    per_round = 10
    history: list = []
    spent = []
    for _ in range(50):
        exceed, projected = privacy.would_exceed(
            history=history, next_entry=(sigma, q, per_round), epsilon=3.0, delta=1e-5, accountant="rdp"
        )
        if exceed:
            break
        history = privacy.merge_history(history, (sigma, q, per_round))
        spent.append(projected)
    assert spent and max(spent) <= 3.0
    assert privacy.epsilon_spent(history=[*history, (sigma, q, per_round)], delta=1e-5, accountant="rdp") > 3.0


def test_sample_rate_matches_opacus_loader() -> None:
    for n, b in [(136, 64), (940, 64), (49, 1), (5000, 256)]:
        data = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b)
        assert privacy.sample_rate_for(batch_size=b, num_records=n) == 1 / len(data)


def test_bad_targets_are_explained() -> None:
    with pytest.raises(ValueError, match="expected ε > 0"):
        privacy.calibrate_noise(target_epsilon=0, target_delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp")


def test_expanded_weights_clip_exactly_like_opacus_hooks() -> None:
    """The per-record gradient mode medsilo trains with gives Opacus's reference clipped gradients."""
    from client.trainer import GRAD_SAMPLE_MODE
    from common.datasets import dataset_info
    from common.models import build_model

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 2, (32, 1)).float()
    grads = {}
    for mode in ("hooks", GRAD_SAMPLE_MODE):
        model = build_model("cnn", dataset_info("breastmnist"), seed=0)
        data = DataLoader(TensorDataset(torch.zeros(320, 1, 28, 28), torch.zeros(320, 1)), batch_size=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data,
                noise_multiplier=0.0, max_grad_norm=0.05, grad_sample_mode=mode,
            )
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(private(x), y).backward()
        opt.step()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["hooks"].norm() > 0
    assert torch.allclose(grads["hooks"], grads[GRAD_SAMPLE_MODE], atol=1e-7)
