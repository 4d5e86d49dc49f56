"""PRIVACY-CRITICAL: a site's privacy decisions for one request, made against its ledger before data is touched.

:class:`SiteBudget` is what :mod:`client.site` asks before every release: the run's plan (drawn once, from the
DP record count), and a charge for each round of DP-SGD and each validation release. Every charge is an atomic
check-and-reserve in the ledger (:meth:`client.dp.ledger.Ledger.charge`) against

- the run's budget: the smaller of what the coordinator asks and what the plan recorded when the run began, so a
  resumed run cannot raise it, at the plan's δ;
- the data source's lifetime budget from the site policy, at the policy's δ, whatever dataset name, run key or
  run the coordinator uses (the ledger is keyed by the data source the hospital configured).

A refusal raises :class:`Refused` with a reason for the coordinator (budgets and ε only: no record, count or score).
"""

from __future__ import annotations

from dataclasses import dataclass

from client.dp import accounting, release
from client.dp.accounting import HistoryEntry, PrivacyPlan
from client.dp.ledger import Charge, Ledger
from client.dp.rng import Randomness
from common.config import RunConfig

#: The ledger's name for each mechanism.
DP_SGD, COUNT, VALIDATION = "dp-sgd", "count", "validation"


class Refused(Exception):
    """The site refuses the request; ``str(exc)`` is the reason it sends."""


@dataclass(frozen=True)
class Limits:
    """What the site allows, from its policy (``None``: no policy, no lifetime cap)."""

    lifetime_epsilon: float | None
    lifetime_delta: float
    min_noise_multiplier: float = 0.0


class SiteBudget:
    """The site's plan and charges for one run (see the module docstring)."""

    def __init__(self, ledger: Ledger, limits: Limits, randomness: Randomness, config: RunConfig) -> None:
        self.ledger = ledger
        self.limits = limits
        self.randomness = randomness
        self.config = config

    # ------------------------------------------------------------------ the plan
    def validation_noise(self) -> float:
        """σ of this run's validation releases: the run config's, else the default for its ε."""
        cfg = self.config
        return cfg.validation_noise or release.default_validation_noise(epsilon=cfg.epsilon)

    def count_noise(self) -> float:
        """σ of the record-count release: :data:`client.dp.release.COUNT_NOISE`, more for small budgets."""
        return release.count_noise_for(epsilon=self.config.epsilon)

    def plan(self, run: int, *, records: int, validation_releases: int | None = None) -> PrivacyPlan:
        """The run's plan, made on its first request: the count released (charged first), σ calibrated, recorded.

        ``records`` is the site's exact number of privacy units; only its DP estimate leaves this function (in the
        plan). Another process that planned the same run first wins, and its plan is the one used.
        ``validation_releases`` (default: the run config's) is how many validation releases the plan keeps budget
        for (a personalisation, :mod:`client.personalise`, plans none).
        """
        existing = self.ledger.plan(run)
        if existing is not None:
            return self._allowed(existing)
        cfg = self.config
        count_noise = self.count_noise()
        charge = self._charge(run, 0, COUNT, (count_noise, 1.0, 1), epsilon=cfg.epsilon, delta=cfg.delta)

        def make() -> PrivacyPlan:
            estimate = release.noisy_count(records, sigma=count_noise,
                                           rng=self.randomness.numpy_generator("count", server_round=0))
            try:
                return accounting.plan_run(
                    epsilon=cfg.epsilon, delta=cfg.delta, accountant=cfg.accountant, batch_size=cfg.batch_size,
                    rounds=cfg.rounds, local_epochs=cfg.local_epochs, records_estimate=estimate,
                    count_noise=count_noise, validation_noise=self.validation_noise(),
                    validation_releases=cfg.validation_releases if validation_releases is None else validation_releases,
                )
            except ValueError as exc:
                raise Refused(f"no privacy plan fits this run's budget ε={cfg.epsilon}: {exc}") from None

        try:
            plan = self.ledger.plan_or_record(run, make)
        finally:
            # Drawn (or about to be): the count release is spent even if no plan came of it, so that a retry is
            # charged again instead of drawing N̂ afresh under the same reservation.
            self.ledger.complete(run, 0, COUNT, steps=1, epsilon_run=charge.epsilon_run,
                                 epsilon_lifetime=charge.epsilon_lifetime)
        return self._allowed(plan)

    def _allowed(self, plan: PrivacyPlan) -> PrivacyPlan:
        """``plan``, unless the policy's minimum noise multiplier refuses it.

        Checked at every request of the run, so a node restarted with a stricter policy applies it.
        """
        if plan.noise_multiplier < self.limits.min_noise_multiplier:
            raise Refused(f"site policy: noise multiplier {plan.noise_multiplier:.3f} for this run is below "
                          f"min-noise-multiplier={self.limits.min_noise_multiplier} (ask for a smaller ε or fewer "
                          "rounds)")
        return plan

    # ------------------------------------------------------------------ charges
    def charge_round(self, run: int, server_round: int, plan: PrivacyPlan) -> Charge:
        """Reserve one round of DP-SGD (or find its open reservation); raises :class:`Refused` past a budget."""
        return self._charge(run, server_round, DP_SGD, plan.training_entry, epsilon=self._run_epsilon(plan),
                            delta=plan.delta or self.config.delta)

    def charge_validation(self, run: int, validated_round: int, plan: PrivacyPlan) -> Charge:
        """Reserve one validation release of the model of ``validated_round``."""
        return self._charge(run, validated_round, VALIDATION, plan.validation_entry,
                            epsilon=self._run_epsilon(plan), delta=plan.delta or self.config.delta)

    def spent(self, run: int, plan: PrivacyPlan | None) -> tuple[float, float]:
        """(ε of ``run``, lifetime ε of the data source) as the ledger has them now."""
        cfg = self.config
        delta = plan.delta if plan is not None and plan.delta else cfg.delta
        return (self.ledger.spent(delta=delta, accountant=cfg.accountant, run=run),
                self.ledger.spent(delta=self.limits.lifetime_delta, accountant=cfg.accountant))

    def _run_epsilon(self, plan: PrivacyPlan) -> float:
        return min(self.config.epsilon, plan.epsilon) if plan.epsilon else self.config.epsilon

    def _charge(self, run: int, server_round: int, mechanism: str, entry: HistoryEntry, *, epsilon: float,
                delta: float) -> Charge:
        charge = self.ledger.charge(
            run=run, server_round=server_round, mechanism=mechanism, entry=entry, epsilon=epsilon, delta=delta,
            lifetime_epsilon=self.limits.lifetime_epsilon, lifetime_delta=self.limits.lifetime_delta,
            accountant=self.config.accountant,
        )
        if not charge.granted:
            raise Refused(charge.reason or f"the {mechanism} release of round {server_round} is over budget")
        return charge


def budget_problems(config: RunConfig) -> list[str]:
    """Why no site could plan a DP run of ``config`` (empty when one can): ε too small for its fixed releases.

    A site releases its record count and ``validation_releases`` validation statistics under DP before it trains
    (:meth:`client.dp.budget.SiteBudget.plan`, with the same noise for ε); when those alone spend the run's ε, by
    ``config.accountant`` or by the RDP bound the noise calibration brackets with
    (:func:`client.dp.accounting.calibrate_training_noise`), every site refuses the run in its first round.
    """
    eps = config.epsilon
    fixed: list[HistoryEntry] = [(release.count_noise_for(epsilon=eps), 1.0, 1)]
    noise = config.validation_noise or release.default_validation_noise(epsilon=eps)
    if config.validation_releases and noise > 0:
        fixed.append((noise, 1.0, config.validation_releases))
    floor = max(accounting.epsilon_spent(history=fixed, delta=config.delta, accountant=name)
                for name in dict.fromkeys((config.accountant, "rdp")))
    if floor < eps:
        return []
    fewer = " (or fewer --validation-releases)" if config.validation_releases else ""
    return [f"--epsilon {eps:g}: too small for a run: a site's record-count and validation releases alone spend "
            f"ε={floor:.3f} of it, leaving nothing to train with; use ε above {floor:.2f}{fewer}"]
