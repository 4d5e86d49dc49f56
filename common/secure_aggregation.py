"""Secure-aggregation arithmetic shared by the coordinator and the sites (pure functions, no I/O).

Flower's SecAgg+ clips every value a site sends to ``[-clipping_range, clipping_range]`` before
quantizing it, which would silently saturate an update that leaves that range. medsilo therefore
sends the *update* (local weights minus the round's global weights) and derives the clipping range
from a bound that holds for every update local training can produce, whatever the data and the DP
noise:

* Sites train with Adam. For Adam with bias correction, every coordinate of one step is bounded by
  ``lr * b_t`` where (Cauchy-Schwarz over the moment sums, ``gamma = beta1**2 / beta2 < 1``)::

      b_t = (1 - beta1) / sqrt(1 - beta2) * sqrt((1 - gamma**t) / (1 - gamma))
            * sqrt(1 - beta2**t) / (1 - beta1**t)

  (``b_1 = 1``). The bound does not depend on the gradient, so it holds for clipped and noised
  DP-SGD gradients alike; the proximal step (FedProx) only moves weights towards the global model.
* A round of ``K`` steps therefore moves each weight by at most ``lr * sum(b_1..b_K)``, and a site
  holds at most ``max_site_records`` records, which bounds ``K`` and the site's aggregation weight.

The site multiplies its update by ``records / max_site_records <= 1`` (Flower's weighting), so every
value entering the quantizer is within the range: nothing is saturated (tests check it on real
DP-SGD updates), and the reconstruction error per coordinate is one quantization step per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import RunConfig

#: Adam's moment coefficients, as used by :func:`client.trainer` (torch defaults).
ADAM_BETAS = (0.9, 0.999)


def adam_step_bound(*, step: int, beta1: float = ADAM_BETAS[0], beta2: float = ADAM_BETAS[1]) -> float:
    """Bound on ``|Δθ_i| / lr`` of Adam's ``step``-th update (1-based), for any gradients."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    gamma = beta1**2 / beta2
    return (
        (1 - beta1) / math.sqrt(1 - beta2)
        * math.sqrt((1 - gamma**step) / (1 - gamma))
        * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    )


def update_bound(*, lr: float, steps: int) -> float:
    """Bound on every coordinate of the weight change after ``steps`` Adam steps at learning rate ``lr``."""
    return lr * sum(adam_step_bound(step=t) for t in range(1, steps + 1))


def local_steps(*, num_records: int, batch_size: int, local_epochs: int) -> int:
    """Optimizer steps of one round: ``local_epochs * ceil(records / batch)`` (plain and DP-SGD alike)."""
    return local_epochs * math.ceil(num_records / batch_size)


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run, identical at the coordinator and every site."""

    clipping_range: float
    max_weight: int
    quantization_range: int = 2**24
    modulus_range: int = 2**32

    @property
    def step(self) -> float:
        """One quantization step (the reconstruction error per coordinate and site)."""
        return 2 * self.clipping_range / self.quantization_range


def settings_for(*, lr: float, local_epochs: int, batch_size: int, max_site_records: int) -> SecAggSettings:
    """Clipping range and weight cap for sites of at most ``max_site_records`` training records."""
    steps = local_steps(num_records=max_site_records, batch_size=batch_size, local_epochs=local_epochs)
    return SecAggSettings(clipping_range=update_bound(lr=lr, steps=steps), max_weight=max_site_records)


def run_settings(config: RunConfig) -> SecAggSettings:
    """The settings of a run: its local learning rate (DP-SGD's under DP), epochs, batch size and site cap."""
    return settings_for(
        lr=config.dp_lr if config.dp else config.lr, local_epochs=config.local_epochs,
        batch_size=config.batch_size, max_site_records=config.max_site_records,
    )


def site_fits(*, num_records: int, max_site_records: int, estimated: bool = False) -> str | None:
    """``None`` when a site's update is guaranteed to stay in range, else the reason and the fix.

    ``estimated``: ``num_records`` is the site's DP estimate of its count (a DP run), the only count it may name.
    """
    if num_records > max_site_records:
        count = (f"this site's DP estimate of its training records is {num_records}" if estimated
                 else f"this site has {num_records} training records")
        return (
            f"{count}, more than max-site-records={max_site_records} that the federation's secure-aggregation "
            f"range was sized for; the coordinator must relaunch with -c 'max-site-records={num_records}' "
            f"(or larger, with headroom for the sites' count noise)"
        )
    return None
