"""Privacy accounting checked against computations that do not use the Opacus accountant under test.

References:

- RDP: dp_accounting's ``RdpAccountant`` at Opacus's integer orders (both use the exact binomial closed form),
  and at Opacus's fractional orders the Rényi divergence itself, integrated numerically (:func:`_log_a`);
  dp_accounting 0.6's fractional-order series adds its terms' absolute values (its binomial coefficients
  lose their sign), over-estimating RDP there (by ~27 % at α = 1.4, q = 1/15, σ = 1) and giving up on the
  smallest orders, whereas Opacus's alternating series is exact (checked against scipy quadrature).
  The RDP→(ε, δ) conversion is dp_accounting's (Balle et al. 2020).
- PLD: dp_accounting's ``PLDAccountant`` (pessimistic discretization, an upper bound on the true ε).
- q = 1, one step: the analytic Gaussian mechanism's exact ε (Balle & Wang 2018, Theorem 8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from opacus import PrivacyEngine
from opacus.accountants.rdp import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from client.dp import accounting as privacy

# Opacus's PRV accountant takes log(1 - q) on its grid; at q = 1 (Gaussian releases) that is log 0, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

History = Sequence[privacy.HistoryEntry]

DELTA = 1e-5
#: The orders Opacus's RDP accountant minimises over (only the list is taken from Opacus, not its arithmetic).
ORDERS: list[float] = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
#: dp_accounting's PLD grid. Its pessimistic rounding puts it above the true ε by at most ~5e-4 on these
#: histories (measured against a 1e-4 grid), at a tenth of a second each.
PLD_GRID = 1e-3
#: How far the PLD may sit above the true ε, which Opacus's PRV upper-bounds: PRV ≥ PLD - this.
PLD_SLACK = 2e-3
#: Opacus's PRV reports ε_est(δ - δ/1000) + eps_error, with eps_error = 0.01 and |ε_est - ε| ≤ eps_error
#: (Gopi et al. 2021): an upper bound up to ~0.02 above the true ε (measured: 0.010-0.012 above the PLD).
PRV_SLACK = 0.025
#: Opacus's ``get_noise_multiplier`` and ``calibrate_training_noise`` stop within 0.01 below the target.
CALIBRATION_TOLERANCE = 0.01
TARGET_EPSILON = 8.0

#: medsilo's plan for 940 records, batch 64 (q = 1/15), 10 rounds of 2 local epochs.
PLAN_Q = 1 / 15
HISTORIES: list[list[privacy.HistoryEntry]] = [
    [(1.1, 0.25, 8)],
    [(1.0, PLAN_Q, 300)],
    [(0.8, 0.01, 1000)],
    # a site's ledger: one entry per round, another plan in between, an empty round
    [(1.3, 0.4, 5), (1.3, 0.4, 5), (0.9, 0.2, 7), (1.3, 0.4, 5), (1.3, 0.4, 0), (1.3, 0.4, 5)],
    # record count (σ = 10), DP-SGD, 10 validation releases (σ = 2)
    [(10.0, 1.0, 1), (1.0, PLAN_Q, 300), (2.0, 1.0, 10)],
]


def _event(history: History) -> dp_accounting.DpEvent:
    """Each step a Poisson-sampled Gaussian mechanism, each entry composed ``steps`` times (0 steps: nothing)."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), t)
        for s, q, t in history if t > 0
    ])


def _pld_epsilon(history: History) -> float:
    """dp_accounting's PLD ε at :data:`DELTA`."""
    acct = pld.PLDAccountant(value_discretization_interval=PLD_GRID)
    acct.compose(_event(history))
    return float(acct.get_epsilon(DELTA))


def _log_a(sigma: float, q: float, alpha: float) -> float:
    """(α - 1) · D_α(P ‖ Q) for P = (1-q) N(0, σ²) + q N(1, σ²), Q = N(0, σ²): log E_Q[(dP/dQ)^α].

    The RDP of one Poisson-subsampled Gaussian step under add/remove (Mironov, Talwar & Zhang 2019), by its
    definition, with the trapezoid rule in log space (exponentially accurate for this smooth, fast-decaying
    integrand; the grid spans both modes, z = 0 and z = α, by 40 σ).
    """
    z = np.linspace(-40 * sigma, alpha + 40 * sigma, 20_001)
    with np.errstate(divide="ignore"):
        log_1mq = np.log1p(-q)
    log_ratio = np.logaddexp(log_1mq, math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_f = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) + alpha * log_ratio
    peak = float(log_f.max())
    return peak + math.log(float(np.exp(log_f - peak).sum()) * (z[1] - z[0]))


def _rdp_epsilon(history: History) -> float:
    """RDP ε at :data:`DELTA` over Opacus's orders, without Opacus (see the module docstring)."""
    integer = [a for a in ORDERS if a.is_integer()]
    fractional = [a for a in ORDERS if not a.is_integer()]
    acct = rdp.RdpAccountant(orders=integer)
    acct.compose(_event(history))
    rdp_fractional = [sum(t * _log_a(s, q, a) / (a - 1) for s, q, t in history if t > 0) for a in fractional]
    return min(float(acct.get_epsilon(DELTA)), float(rdp.compute_epsilon(fractional, rdp_fractional, DELTA)[0]))


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of the Gaussian mechanism of sensitivity 1 at δ (Balle & Wang 2018, Thm 8), by bisection."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_at(eps: float) -> float:  # decreasing in ε
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _opacus_run(history: History, epochs: int, sigma: float, n: int = 200, batch: int = 50) -> list[tuple]:
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
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return [tuple(h) for h in engine.accountant.history]


@pytest.mark.parametrize(("sigma", "q"), [(1.1, 0.25), (0.8, 0.01), (2.0, 1.0)])
def test_rdp_reference_integral_matches_dp_accounting_at_integer_orders(sigma: float, q: float) -> None:
    # Prepare: dp_accounting's exact integer-order RDP, one order at a time
    steps = 10
    expected = []
    for alpha in (2.0, 3.0, 5.0, 10.0, 40.0):
        acct = rdp.RdpAccountant(orders=[alpha])
        acct.compose(_event([(sigma, q, steps)]))
        expected.append(float(acct.get_epsilon(DELTA)))

    # Execute
    ours = [float(rdp.compute_epsilon([a], [steps * _log_a(sigma, q, a) / (a - 1)], DELTA)[0])
            for a in (2.0, 3.0, 5.0, 10.0, 40.0)]

    # Assert
    assert ours == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_epsilon_matches_independent_rdp(history: list[privacy.HistoryEntry]) -> None:
    # Prepare
    expected = _rdp_epsilon(history)

    # Execute
    spent = privacy.epsilon_spent(history=history, delta=DELTA, accountant="rdp")

    # Assert: same RDP bound over the same orders (measured agreement ~1e-11)
    assert spent == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_epsilon_is_bracketed_by_dp_accounting_pld_and_rdp(history: list[privacy.HistoryEntry]) -> None:
    # Prepare
    tight = _pld_epsilon(history)
    rdp_bound = _rdp_epsilon(history)

    # Execute
    spent = privacy.epsilon_spent(history=history, delta=DELTA, accountant="prv")

    # Assert: both upper-bound the true ε, PRV by at most its error; RDP is the looser bound
    assert tight - PLD_SLACK <= spent <= tight + PRV_SLACK
    assert max(spent, tight) <= rdp_bound


@pytest.mark.parametrize("sigma", [0.7, 2.0, 10.0])
def test_gaussian_release_epsilon_is_the_analytic_gaussian_mechanism(sigma: float) -> None:
    # Prepare: the exact ε of one Gaussian release (medsilo's record count, a validation statistic)
    exact = _analytic_gaussian_epsilon(sigma, DELTA)
    history = [(sigma, 1.0, 1)]

    # Execute
    prv = privacy.epsilon_spent(history=history, delta=DELTA, accountant="prv")
    rdp_bound = privacy.epsilon_spent(history=history, delta=DELTA, accountant="rdp")

    # Assert: the solver agrees with dp_accounting's PLD; PRV is an upper bound within its error; RDP above it
    assert _pld_epsilon(history) == pytest.approx(exact, abs=PLD_SLACK)
    assert exact - 1e-9 <= prv <= exact + PRV_SLACK
    assert rdp_bound >= exact


REFERENCES: dict[str, tuple[Callable[[History], float], float]] = {
    # accountant: (independent ε, how far below the target a calibrated plan may land by it)
    "rdp": (_rdp_epsilon, CALIBRATION_TOLERANCE + 1e-6),
    "prv": (_pld_epsilon, CALIBRATION_TOLERANCE + PRV_SLACK),
}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_spends_the_budget_by_dp_accounting(accountant: str) -> None:
    # Prepare
    reference, tolerance = REFERENCES[accountant]
    q = privacy.sample_rate_for(batch_size=64, num_records=940)
    steps = privacy.planned_steps(rounds=10, local_epochs=2, sample_rate=q)
    per_round = 2 * privacy.steps_per_epoch(sample_rate=q)

    # Execute
    sigma = privacy.calibrate_noise(target_epsilon=TARGET_EPSILON, target_delta=DELTA, sample_rate=q, steps=steps,
                                    accountant=accountant)
    plan = privacy.PrivacyPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=per_round,
                               planned_steps=steps)
    spent = reference(plan.planned_history())

    # Assert
    assert TARGET_EPSILON - tolerance <= spent <= TARGET_EPSILON


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_training_noise_with_releases_spends_the_budget_by_dp_accounting(accountant: str) -> None:
    # Prepare: record count at σ = 10, 10 validation releases at σ = 5
    reference, tolerance = REFERENCES[accountant]
    q = privacy.sample_rate_for(batch_size=64, num_records=940)
    steps = privacy.planned_steps(rounds=10, local_epochs=2, sample_rate=q)
    per_round = 2 * privacy.steps_per_epoch(sample_rate=q)
    fixed = [(10.0, 1.0, 1), (5.0, 1.0, 10)]

    # Execute
    sigma = privacy.calibrate_training_noise(target_epsilon=TARGET_EPSILON, target_delta=DELTA, sample_rate=q,
                                             steps=steps, accountant=accountant, fixed=fixed)
    plan = privacy.PrivacyPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=per_round,
                               planned_steps=steps, count_noise=10.0, validation_noise=5.0, validation_releases=10)
    spent = reference(plan.planned_history())

    # Assert: the plan composes exactly what was calibrated, and spends the budget by dp_accounting
    assert plan.planned_history() == [fixed[0], (sigma, q, steps), fixed[1]]
    assert TARGET_EPSILON - tolerance <= spent <= TARGET_EPSILON


def test_calibrated_training_noise_refuses_releases_that_alone_exceed_the_budget() -> None:
    # Prepare: 20 validation releases at σ = 0.5, by dp_accounting far over ε = 1 on their own
    fixed = [(10.0, 1.0, 1), (0.5, 1.0, 20)]
    assert _pld_epsilon(fixed) > 1.0

    # Execute / Assert
    with pytest.raises(ValueError, match="alone spend"):
        privacy.calibrate_training_noise(target_epsilon=1.0, target_delta=DELTA, sample_rate=PLAN_Q, steps=300,
                                         accountant="prv", fixed=fixed)


@pytest.mark.parametrize(("accountant", "reference", "slack"),
                         [("rdp", _rdp_epsilon, 1e-6), ("prv", _pld_epsilon, PRV_SLACK)], ids=["rdp", "prv"])
def test_would_exceed_refuses_the_round_past_the_budget_by_dp_accounting(
    accountant: str, reference: Callable[[History], float], slack: float,
) -> None:
    # Prepare
    budget, entry = 3.0, (2.0, 0.1, 10)
    history: list[privacy.HistoryEntry] = []
    exceed = False

    # Execute: take rounds until one is refused
    for _ in range(50):
        exceed, _projected = privacy.would_exceed(history=history, next_entry=entry, epsilon=budget, delta=DELTA,
                                                  accountant=accountant)
        if exceed:
            break
        history = privacy.merge_history(history, entry)

    # Assert: the rounds taken fit by dp_accounting; the refused one would not have (up to the accountant's error)
    assert exceed and history
    assert reference(history) <= budget
    assert reference([*history, entry]) > budget - slack


def test_opacus_training_records_the_planned_history_and_its_epsilon() -> None:
    # Prepare
    q = privacy.sample_rate_for(batch_size=50, num_records=200)
    planned = privacy.planned_steps(rounds=2, local_epochs=2, sample_rate=q)

    # Execute: two rounds of real Opacus training, the second continuing the first's history
    round1 = _opacus_run([], 2, sigma=1.1)
    round2 = _opacus_run(round1, 2, sigma=1.1)
    spent = privacy.epsilon_spent(history=round2, delta=DELTA, accountant="rdp")

    # Assert
    assert privacy.merged_history(round2) == [(1.1, q, planned)]
    assert spent == pytest.approx(_rdp_epsilon([(1.1, q, planned)]), rel=1e-6)
    assert spent > privacy.epsilon_spent(history=round1, delta=DELTA, accountant="rdp") > 0


def test_merged_history_adds_up_equal_entries() -> None:
    # Prepare
    history = HISTORIES[3]

    # Execute
    merged = privacy.merged_history(history)

    # Assert
    assert merged == [(1.3, 0.4, 20), (0.9, 0.2, 7)]


@pytest.mark.parametrize(("n", "b"), [(136, 64), (940, 64), (49, 1), (5000, 256)])
def test_sample_rate_and_steps_match_opacus_loader(n: int, b: int) -> None:
    # Prepare
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b))

    # Execute
    q = privacy.sample_rate_for(batch_size=b, num_records=n)

    # Assert
    assert q == loader.sample_rate
    assert privacy.steps_per_epoch(sample_rate=q) == len(loader)


def test_bad_targets_are_explained() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="expected ε > 0"):
        privacy.calibrate_noise(target_epsilon=0, target_delta=DELTA, sample_rate=0.1, steps=10, accountant="rdp")


def test_expanded_weights_clip_exactly_like_opacus_hooks() -> None:
    """The per-record gradient mode medsilo trains with gives Opacus's reference clipped gradients."""
    # Prepare
    try:
        from client.dp.sgd import GRAD_SAMPLE_MODE
    except ImportError:
        from client.trainer import GRAD_SAMPLE_MODE
    from common.datasets import dataset_info
    from common.models import build_model

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 2, (32, 1)).float()
    grads: dict[str, torch.Tensor] = {}

    # Execute
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

    # Assert
    assert grads["hooks"].norm() > 0
    assert torch.allclose(grads["hooks"], grads[GRAD_SAMPLE_MODE], atol=1e-7)
