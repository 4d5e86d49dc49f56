"""PRIVACY-CRITICAL: one round of record-level (or patient-level) DP-SGD at a site.

The mechanism, step by step, each piece from Opacus unless named otherwise:

- **Sampling**: Poisson sampling of the site's records at the run's fixed rate ``q`` (the plan's, from the DP
  record count; Opacus's ``DPDataLoader`` with that rate), from a generator the coordinator can neither know nor
  choose (:mod:`client.dp.rng`). A site whose records changed since the plan still samples at ``q``.
- **Clipping**: every record's gradient to ``max_grad_norm`` (:class:`client.dp.clipping.PerRecordClipper` in one
  backward pass, or Opacus's expanded weights for layers it does not support); per patient with
  :mod:`client.dp.patients`.
- **Noise**: ``N(0, (σ C)²)`` once per step on the clipped sum, with Opacus's floating-point protection
  (``secure_mode`` noise) from an OS-entropy generator; the sum is divided by the plan's expected batch size
  ``q · N̂``, a data-independent normaliser.
- **Every planned step is taken**: an empty Poisson batch still takes its noised step (on a zero clipped sum),
  so the steps the ledger reserved are the steps that ran.

ε is not computed here: the ledger reserved the round's steps before this runs (:mod:`client.dp.ledger`).

A site whose node config sets ``workers`` above 1 runs the same mechanism on several processes
(:mod:`client.dp.distributed`): :func:`make_private` builds each worker's pieces with its ``group`` (and
:func:`patient_round` runs each worker's patient-level round with it), so the sampling, clipping, noise and
normalisation are this module's whether one process trains or several.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from client.dp.accounting import PrivacyPlan
from client.dp.rng import Randomness
from client.trainer import DriftCorrection, augmenter, make_optimizer, round_lr
from common.config import RunConfig
from common.datasets import Task
from common.features import FeatureCache
from common.training import TrainingSet, loss_function, on_fixed_features, retain_freed_memory

if TYPE_CHECKING:
    from client.dp.distributed import SiteCompute, WorkerGroup

log = logging.getLogger(__name__)

#: Per-record gradients for models whose layers :class:`client.dp.clipping.PerRecordClipper` cannot clip
#: (3D convolutions): torch's expanded weights, the same clipped gradients as Opacus's default hooks
#: (checked in tests) at less cost.
GRAD_SAMPLE_MODE = "ew"


class Batches(Protocol):
    """What a round's steps draw from: Opacus's ``DPDataLoader``, or a worker's share of each shared batch."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass
class PrivateTraining:
    """One round's DP-SGD pieces: the Poisson loader, the noising optimizer, the clipped backward pass.

    ``backward`` turns a batch's loss into the clipped gradient sum the optimizer noises; ``empty_step`` takes
    the noised step of an empty batch. ``how`` is ``"one-pass"`` or Opacus's grad-sample mode. ``steps`` counts
    the noised steps the optimizer took. Call :meth:`close` after the round: the model is a plain module again.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Batches
    backward: Callable[[torch.Tensor], None]
    empty_step: Callable[[], None]
    close: Callable[[], None]
    how: str
    steps: list[int]


def records_dataset(data: TrainingSet) -> Dataset:
    """What the Poisson loader draws from: records held as tensors are served as ``IndexedRecords``.

    :class:`client.dp.clipping.IndexedRecords` notes each batch's record indices, so clipping can look up what it
    computed per record.
    """
    from client.dp.clipping import IndexedRecords

    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return IndexedRecords(*data.tensors)
    return data


def make_private(
    net: nn.Module, optimizer: torch.optim.Optimizer, records: Dataset, *, sample_rate: float,
    noise_multiplier: float, max_grad_norm: float, expected_batch_size: float, randomness: Randomness,
    server_round: int, group: WorkerGroup | None = None,
) -> PrivateTraining:
    """Wrap one round's model and optimizer for DP-SGD with Poisson sampling at ``sample_rate``.

    Where every trainable layer is supported (:func:`client.dp.clipping.unsupported_layers`), the clipped sum
    comes from :class:`~client.dp.clipping.PerRecordClipper` and :class:`~client.dp.clipping.NoisingOptimizer`
    noises it; otherwise Opacus's expanded weights and its ``DPOptimizer``. Both draw noise from the round's
    ``"noise"`` generator in Opacus's secure (floating-point-safe) mode and sample from its ``"sampling"`` one.

    With ``group`` (a worker of a several-process round, :mod:`client.dp.distributed`): only rank 0 creates the
    two generators; the loader serves this rank's share of each batch rank 0 draws, and the optimizer noises the
    sum of the ranks' clipped sums once (:class:`~client.dp.distributed.SharedNoisingOptimizer`). Only models the
    one-pass clipper supports.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    from client.dp.clipping import IndexedRecords, NoisingOptimizer, PerRecordClipper, unsupported_layers

    ModuleValidator.validate(net, strict=True)
    dev = next(net.parameters()).device
    root = group is None or group.rank == 0  # the one process that samples and noises
    sampling = randomness.torch_generator("sampling", server_round=server_round) if root else None
    noise = randomness.torch_generator("noise", server_round=server_round, device=dev) if root else None
    collate = IndexedRecords.collate if isinstance(records, IndexedRecords) else None
    loader: Batches
    if group is None:
        loader = DPDataLoader(records, sample_rate=sample_rate, collate_fn=collate, generator=sampling)
    else:
        loader = group.poisson_batches(records, sample_rate=sample_rate, generator=sampling, collate_fn=collate)
    steps = [0]
    trainable = [p for p in net.parameters() if p.requires_grad]
    private_opt: DPOptimizer
    if group is not None and unsupported_layers(net):
        raise ValueError(f"several DP-SGD workers need the one-pass clipper; this model has layers it cannot clip: "
                         f"{', '.join(unsupported_layers(net))}")
    if unsupported_layers(net):
        private_model = prepare_module(net, GRAD_SAMPLE_MODE, batch_first=True, loss_reduction="mean")
        private_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  expected_batch_size=expected_batch_size, loss_reduction="mean", generator=noise)

        def empty_step() -> None:  # a phantom record with a zero gradient: the clipped sum is 0, the noise is not
            for p in trainable:
                p.grad_sample = torch.zeros((1, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
            private_opt.step()

        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
        close: Callable[[], None] = getattr(private_model, "remove_hooks", lambda: None)
        how = GRAD_SAMPLE_MODE
    else:
        private_model = net
        clipper = PerRecordClipper(net, max_grad_norm=max_grad_norm,
                                   records=records if isinstance(records, IndexedRecords) else None)
        if group is None:
            private_opt = NoisingOptimizer(optimizer, clipper=clipper, noise_multiplier=noise_multiplier,
                                           max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                           loss_reduction="mean", generator=noise)
        else:
            from client.dp.distributed import SharedNoisingOptimizer

            private_opt = SharedNoisingOptimizer(optimizer, group=group, clipper=clipper,
                                                 noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                                 expected_batch_size=expected_batch_size, loss_reduction="mean",
                                                 generator=noise)

        def empty_step() -> None:
            for p in trainable:
                p.grad = torch.zeros_like(p)
            clipper.clipped = True  # the zero sum is the clipped sum of no record
            private_opt.step()

        backward, close, how = clipper.backward, clipper.close, "one-pass"
    # Opacus's floating-point-safe noise (the sum of four draws, halved). Its constructor's secure_mode also wants
    # torchcsprng, which is unmaintained; the generator above is seeded from the OS's entropy instead.
    private_opt.secure_mode = True
    private_opt.attach_step_hook(lambda _opt: steps.__setitem__(0, steps[0] + 1))
    return PrivateTraining(private_model, private_opt, loader, backward=backward, empty_step=empty_step,
                           close=close, how=how, steps=steps)


@dataclass
class RoundResult:
    """What one local round produced (weights stay in the model). The loss never leaves the site."""

    train_loss: float
    steps: int


def dp_epoch(
    private: PrivateTraining, loss_fn: nn.Module, *, proximal: tuple[list[torch.Tensor], float, float] | None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
) -> float:
    """One pass of the Poisson loader: every batch, empty ones included, is one noised step. Returns the loss."""
    total, count = dp_epoch_sums(private, loss_fn, proximal=proximal, augment=augment)
    return total / max(count, 1)


def dp_epoch_sums(
    private: PrivateTraining, loss_fn: nn.Module, *, proximal: tuple[list[torch.Tensor], float, float] | None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[float, int]:
    """:func:`dp_epoch`'s pass; returns the loss summed over the records it trained on, and their number."""
    retain_freed_memory()
    model, optimizer = private.model, private.optimizer
    dev = next(model.parameters()).device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for batch in private.loader:
        optimizer.zero_grad(set_to_none=True)
        if not batch or batch[0].shape[0] == 0:
            private.empty_step()
        else:
            x, y = batch[0].to(dev), batch[1].to(dev)
            if augment is not None:
                x = augment(x)
            loss = loss_fn(model(x), y)
            private.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
        if proximal is not None:  # FedProx's pull: data-independent, after the noised step
            global_params, mu, lr = proximal
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.sub_(lr * mu * (p - g))
    return total, count


def train_dp(
    model: nn.Module, dataset: TrainingSet, task: Task, config: RunConfig, plan: PrivacyPlan, *,
    randomness: Randomness, server_round: int, global_params: list[torch.Tensor] | None = None,
    features: FeatureCache | None = None, drift: DriftCorrection | None = None, patients: np.ndarray | None = None,
    compute: SiteCompute | None = None,
) -> RoundResult:
    """``config.local_epochs`` epochs of DP-SGD under ``plan``; the model is trained in place.

    ``compute`` (the node's setting, :func:`client.dp.distributed.site_compute`) with ``workers`` above 1 runs
    the round on that many processes (:func:`client.dp.worker_job.train_workers`), the same mechanism; rounds
    that cannot (:func:`~client.dp.distributed.single_process_reason`) run in this process, and the log says why.

    ``features`` is the site's cache of a fixed-feature model's features (:func:`common.training.on_fixed_features`).
    ``drift`` (SCAFFOLD) corrects the clipped and noised gradient of every step and collects their mean, on one
    process or several (every worker corrects its steps alike; rank 0's record comes back into ``drift``). Raises
    :class:`RuntimeError` when the noised steps taken differ from the plan's (nothing is then sent).
    """
    several = compute is not None and compute.workers > 1
    if patients is not None:
        return _train_patients(model, dataset, task, config, plan, randomness=randomness, server_round=server_round,
                               patients=patients, drift=drift, global_params=global_params, features=features,
                               compute=compute)
    aug = augmenter(config, randomness.torch_generator("augment", server_round=server_round), task)
    net, data = on_fixed_features(model, dataset, augmented=aug is not None, cache=features)
    if several and compute is not None:
        from client.dp.distributed import single_process_reason
        from client.dp.worker_job import train_workers

        reason = single_process_reason(net, patients=False)
        if reason is None:
            _check_steps(int(1 / plan.sample_rate), config, plan)
            loss, steps = train_workers(net, data, task, config, plan, randomness=randomness,
                                        server_round=server_round, compute=compute, global_params=global_params,
                                        augment=aug is not None, drift=drift)
            if steps != plan.steps_per_round:
                raise RuntimeError(f"DP-SGD took {steps} noised steps; the plan reserved {plan.steps_per_round}")
            return RoundResult(train_loss=loss, steps=steps)
        log.warning("this round runs in one process: %s", reason)
    lr = round_lr(config.dp_lr, config, server_round)
    opt = make_optimizer(net, lr, config.weight_decay, drift)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        private = make_private(
            net, opt, records_dataset(data), sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
            expected_batch_size=plan.expected_batch_size, randomness=randomness, server_round=server_round,
        )
    try:
        _check_steps(len(private.loader), config, plan)
    except RuntimeError:
        private.close()
        raise
    prox = (global_params, config.proximal_mu, lr) if global_params and config.proximal_mu > 0 else None
    loss = 0.0
    try:
        for _ in range(config.local_epochs):
            loss = dp_epoch(private, loss_function(task), proximal=prox, augment=aug)
    finally:
        private.close()  # the caller's model is a plain module again
    if private.steps[0] != plan.steps_per_round:
        raise RuntimeError(f"DP-SGD took {private.steps[0]} noised steps; the plan reserved {plan.steps_per_round}")
    return RoundResult(train_loss=loss, steps=private.steps[0])


def _check_steps(per_epoch: int, config: RunConfig, plan: PrivacyPlan) -> None:
    """Raise :class:`RuntimeError` unless the loader's steps over the round are the plan's."""
    if per_epoch * config.local_epochs != plan.steps_per_round:
        raise RuntimeError(
            f"Opacus's loader takes {per_epoch} steps per epoch at q={plan.sample_rate}; the privacy plan "
            f"reserved {plan.steps_per_round} per round of {config.local_epochs} epochs"
        )


def _train_patients(
    model: nn.Module, dataset: TrainingSet, task: Task, config: RunConfig, plan: PrivacyPlan, *,
    randomness: Randomness, server_round: int, patients: np.ndarray, drift: DriftCorrection | None,
    global_params: list[torch.Tensor] | None, features: FeatureCache | None, compute: SiteCompute | None = None,
) -> RoundResult:
    """DP-SGD with the patient as the unit (:mod:`client.dp.patients`): patients sampled, each gradient clipped.

    On ``compute.workers`` processes where it can (:func:`client.dp.distributed.single_process_reason`), the same
    round: :func:`patient_round` on every worker.
    """
    net, data = on_fixed_features(model, dataset, augmented=False, cache=features)
    if not isinstance(data, TensorDataset):
        raise RuntimeError("patient-level DP-SGD trains on whole records (classification), not volume samples")
    several = compute is not None and compute.workers > 1
    if several:
        from client.dp.distributed import single_process_reason

        reason = single_process_reason(net, patients=True)
        if reason is not None:
            log.warning("this round runs in one process: %s", reason)
            several = False
    if several and compute is not None:
        from client.dp.worker_job import train_workers

        _check_steps(int(1 / plan.sample_rate), config, plan)
        loss, steps = train_workers(net, data, task, config, plan, randomness=randomness, server_round=server_round,
                                    compute=compute, global_params=global_params, patients=patients, drift=drift)
    else:
        loss, steps = patient_round(net, data, task, config, plan, randomness=randomness, server_round=server_round,
                                    patients=patients, drift=drift, global_params=global_params)
    if steps != plan.steps_per_round:
        raise RuntimeError(f"patient-level DP-SGD took {steps} noised steps; the plan reserved {plan.steps_per_round}")
    return RoundResult(train_loss=loss, steps=steps)


def patient_round(
    net: nn.Module, data: TensorDataset, task: Task, config: RunConfig, plan: PrivacyPlan, *,
    randomness: Randomness, server_round: int, patients: np.ndarray, drift: DriftCorrection | None = None,
    global_params: list[torch.Tensor] | None = None, group: WorkerGroup | None = None,
) -> tuple[float, int]:
    """One round of patient-level DP-SGD on ``net`` (in place), on ``data``'s records grouped by ``patients``.

    The round's optimizer, FedProx pull and generators around :func:`client.dp.patients.train_patients_dp`; with
    ``group`` (a worker of a several-process round, :mod:`client.dp.distributed`) only rank 0 creates the two
    generators. Returns (mean loss, steps taken).
    """
    from opacus.accountants import create_accountant

    from client.dp.patients import PatientRecords, train_patients_dp

    lr = round_lr(config.dp_lr, config, server_round)
    opt = make_optimizer(net, lr, config.weight_decay, drift)
    params = [p for p in net.parameters() if p.requires_grad]
    after_step = None
    if global_params and config.proximal_mu > 0:
        def after_step() -> None:  # FedProx's data-independent pull, after each noised step
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.sub_(lr * config.proximal_mu * (p - g))
    dev = next(net.parameters()).device
    root = group is None or group.rank == 0  # the one process that samples and noises
    return train_patients_dp(
        net, PatientRecords(data, patients), task=task, optimizer=opt,
        accountant=create_accountant(mechanism=config.accountant), sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
        expected_batch_size=plan.expected_batch_size, epochs=config.local_epochs,
        sampling_generator=randomness.torch_generator("sampling", server_round=server_round) if root else None,
        noise_generator=randomness.torch_generator("noise", server_round=server_round, device=dev) if root else None,
        after_step=after_step, group=group,
    )


def plan_for_records(config: RunConfig, records: int) -> PrivacyPlan:
    """The DP-SGD plan for ``records`` known exactly, without the count and validation releases.

    For benchmarks and tests of the training step; a site's plan always comes from
    :meth:`client.dp.budget.SiteBudget.plan`, which releases the count under DP first.
    """
    from client.dp.accounting import plan_run

    return plan_run(epsilon=config.epsilon, delta=config.delta, accountant=config.accountant,
                    batch_size=config.batch_size, rounds=config.rounds, local_epochs=config.local_epochs,
                    records_estimate=records, count_noise=0.0, validation_noise=0.0, validation_releases=0)
