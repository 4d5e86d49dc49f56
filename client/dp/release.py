"""PRIVACY-CRITICAL: the values a site releases beside its DP-SGD update, each by a Gaussian mechanism.

- The **record count** ``N̂ = N + N(0, σ_N²)`` (sensitivity 1 under add/remove), rounded and at least 1, once per
  run. The run's sampling rate, its noise multiplier and the FedAvg weight are computed from ``N̂``, so none of
  them reveals the exact count (which alone tells neighbouring datasets apart under add/remove).
- The **validation statistic**: the sum over validation records of one row each of L2 norm at most 1
  (:class:`common.wire.ValidationLayout`), plus ``N(0, σ_V² I)``, once per validated model.

Each release is an entry ``(σ, 1.0, 1)`` of the site's accountant history (a Gaussian mechanism is a Poisson
subsampled one with ``q = 1`` and one step), composed with DP-SGD's steps in the same accountant and ledger.
Noise is drawn with :func:`client.dp.rng.secure_gaussian`; released values are rounded (post-processing).
"""

from __future__ import annotations

import numpy as np

from client.dp.rng import secure_gaussian

#: σ of the record-count release, in records: it moves the expected batch and the FedAvg weight by about
#: σ_N / N, and costs little ε composed with DP-SGD (:mod:`client.dp.accounting`).
COUNT_NOISE = 10.0

#: Default σ of one validation release at ε = 8, in records; scaled by 8 / ε for smaller budgets.
VALIDATION_NOISE_AT_EPS8 = 3.0


#: Standard deviations of count noise a range sized with :func:`count_headroom` leaves room for: a site's
#: estimate exceeds its true count by more with probability below 3e-7 per run.
COUNT_HEADROOM_SIGMAS = 5.0


def count_noise_for(*, epsilon: float) -> float:
    """σ of a run's record-count release at per-run budget ``epsilon``: :data:`COUNT_NOISE`, more below ε = 8."""
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon}: expected a per-run budget > 0")
    return COUNT_NOISE * max(1.0, 8.0 / epsilon) ** 0.5


def count_headroom(*, epsilon: float) -> int:
    """Records to add to a site's true count so that its DP estimate ``N̂`` (what its checks use) stays below.

    A coordinator (or a simulation) that sizes SecAgg+'s ``max-site-records`` from known counts adds this, else a
    site whose noise came out positive refuses the run for an estimate above the range.
    """
    return int(np.ceil(COUNT_HEADROOM_SIGMAS * count_noise_for(epsilon=epsilon)))


def noisy_count(records: int, *, sigma: float, rng: np.random.Generator) -> int:
    """``records`` plus Gaussian noise of ``sigma``, rounded, at least 1."""
    if records < 0:
        raise ValueError(f"records={records}: expected a count >= 0")
    return max(1, round(records + float(secure_gaussian((), sigma=sigma, rng=rng))))


def default_validation_noise(*, epsilon: float) -> float:
    """σ of a validation release when the run config leaves it to the site (0): larger for smaller budgets."""
    return VALIDATION_NOISE_AT_EPS8 * max(1.0, 8.0 / epsilon)


def noisy_sum(rows: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The sum of ``rows`` (one per record, each of L2 norm at most 1) plus N(0, σ²) per coordinate.

    A row of larger norm is scaled down to norm 1 (it never happens for :class:`common.wire.ValidationLayout`
    rows; the bound is what the mechanism's sensitivity rests on, so it is enforced here, not assumed).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"rows of shape {rows.shape}: expected (records, size)")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.maximum(norms, 1.0)
    total = rows.sum(axis=0)
    return np.round(total + secure_gaussian(total.shape, sigma=sigma, rng=rng), 3)
