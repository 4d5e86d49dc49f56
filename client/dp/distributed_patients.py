"""PRIVACY-CRITICAL: patient-level DP-SGD on several worker processes: the optimizer its ranks share.

With the patient as the unit (:mod:`client.dp.patients`), every rank of a several-process round
(:mod:`client.dp.distributed`, which has the design) runs :func:`client.dp.patients.train_patients_dp` with its
``group``, the one-process code with two pieces changed:

- the loader: rank 0 alone draws each step's patients (Opacus's sampler over all the site's patients, the round's
  ``"sampling"`` generator, the plan's ``q``); every rank receives a contiguous share of the drawn patients, each
  with all of their images (:class:`~client.dp.distributed.SharedPoissonBatches`; an empty share is a batch of no
  patient, so the rank still steps);
- the optimizer, :class:`SharedPatientOptimizer`: Opacus's ``DPOptimizer`` clips each of the rank's patients'
  gradients to ``C`` and sums them (its own ``clip_and_accumulate``); the ranks' sums are then all-reduced, so every
  rank holds the batch's clipped sum; rank 0 alone adds ``N(0, (σC)²)`` with the round's ``"noise"`` generator and
  broadcasts the noised sum; every rank divides it by ``q · P̂`` and takes the same step (under SCAFFOLD, through
  the same drift correction on every rank, as one process's: :mod:`client.dp.worker_job`).

Adding or removing one patient changes one summand, of norm at most ``C``, on one rank: the sum over the ranks,
noised once, is the one-process step, so the accountant's ``(σ, q, steps)`` over patients and the node's plan and
ledger entries are one process's.
"""

from __future__ import annotations

from client.dp.distributed import NoisedOnceOptimizer


class SharedPatientOptimizer(NoisedOnceOptimizer):
    """Opacus's ``DPOptimizer`` over the ranks (patients): per-patient clipped sums all-reduced, noised once by rank 0.

    Built with the same settings as one process's (:func:`client.dp.patients.train_patients_dp`); only rank 0 holds
    the noise generator.
    """

    def clip_and_accumulate(self) -> None:
        """Opacus's per-patient clipping and sum of this rank's patients, then the sum over all ranks."""
        super().clip_and_accumulate()
        self.sum_over_ranks()
