"""PRIVACY-CRITICAL: the worker processes of a several-process DP-SGD round: what they receive, run and return.

:mod:`client.dp.distributed` has the mechanism (rank 0 alone samples and adds the noise, once; every rank steps
on the broadcast noised gradient) and the pieces a worker builds it from. This module runs it:
:func:`train_workers` spawns the node's ``N`` processes with one :class:`_Job` (pickled once per worker by
spawn, as the node's own processes: never sent over a network), each runs :func:`_worker` as its rank of the
group, every rank checks at the end that the models are identical, and rank 0 alone returns the trained state.

**SCAFFOLD** (:class:`client.trainer.DriftCorrection`) runs on every rank, as one process runs it. The job
carries the round's correction ``c - c_i`` by the position of each parameter in the model (a worker's model is a
copy, so the correction is keyed anew by that copy's parameters). At every step, after the ranks' clipped sums
were summed, noised once by rank 0, broadcast and divided by ``q · N̂``, each rank's optimizer records that
noised gradient and adds the correction before Adam steps (:class:`client.trainer._CorrectedAdam`, as in one
process). Every rank holds the same noised gradient and the same correction, so each computes the same corrected
gradient and the same record of gradients, without a collective; a rank that stepped otherwise would fail the
end-of-round check that the models are identical. Rank 0 returns its record (the sum of the noised gradients it
stepped on, and the step count); :func:`train_workers` adds it to the caller's ``drift``, whose
:meth:`~client.trainer.DriftCorrection.mean_gradients` is then the site's next ``c_i``, as after one process's
round. Nothing here touches a gradient before its noise: the correction and the mean are post-processing of the
noised gradients, and the ledger's plan (``σ``, ``q``, steps) is one process's.

A worker that fails or dies fails the round: the others are stopped, :class:`WorkerFailure` is raised, nothing
is sent; the reservation stays on the ledger (:mod:`client.dp.ledger`). The workers meet through a file store in
an owner-only temporary folder (no listening port for the rendezvous) and talk over loopback only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import queue
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from client.dp.accounting import PrivacyPlan
from client.dp.distributed import SiteCompute, WorkerGroup
from client.dp.rng import Randomness
from client.trainer import DriftCorrection
from common.config import RunConfig
from common.datasets import Task
from common.errors import MedsiloError
from common.training import TrainingSet

#: How long a worker waits in one collective (a peer that hangs) before it fails the round.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class WorkerFailure(MedsiloError):
    """A DP-SGD worker process failed or died: the round failed, nothing was sent."""


# ---------------------------------------------------------------------------------------------- test hooks
@dataclass
class WorkerHooks:
    """Test-only hooks (picklable callables), never a setting: :data:`TEST_HOOKS`."""

    #: Called in every worker as it starts, with the rank.
    on_start: Callable[[int], None] | None = None
    #: Called in every worker at the start of each step, with the rank.
    on_step: Callable[[int], None] | None = None
    #: Rank 0 saves the last step's noised, normalised gradient here (``torch.save`` of a list of tensors).
    gradient_file: str | None = None


#: Set by tests only (monkeypatch); a deployed node never sets it.
TEST_HOOKS: WorkerHooks | None = None


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class _Job:
    """What every worker receives (pickled once per worker by spawn)."""

    net: nn.Module
    data: TrainingSet
    task: Task
    config: RunConfig
    plan: PrivacyPlan
    randomness: Randomness
    server_round: int
    global_params: list[torch.Tensor] | None
    augment: bool
    devices: list[str]
    backend: str
    store: str
    threads: int
    hooks: WorkerHooks | None
    patients: np.ndarray | None  # the patient index of every record (the patient is the unit), or None
    #: SCAFFOLD's ``c - c_i`` for each of ``net``'s parameters in order (``None``: none for it), or None.
    drift: list[torch.Tensor | None] | None = None


def _shipped_drift(net: nn.Module, drift: DriftCorrection | None) -> list[torch.Tensor | None] | None:
    """``drift``'s correction by the position of each of ``net``'s parameters: what the workers receive."""
    if drift is None:
        return None
    return [drift.correction[p].detach().cpu().clone() if p in drift.correction else None for p in net.parameters()]


def _worker_drift(net: nn.Module, shipped: list[torch.Tensor | None] | None) -> DriftCorrection | None:
    """The job's correction keyed by this worker's copy of the model: a fresh record of the round's gradients."""
    if shipped is None:
        return None
    return DriftCorrection({p: c for p, c in zip(net.parameters(), shipped, strict=True) if c is not None})


# ---------------------------------------------------------------------------------------------- the round
def train_workers(
    net: nn.Module, data: TrainingSet, task: Task, config: RunConfig, plan: PrivacyPlan, *, randomness: Randomness,
    server_round: int, compute: SiteCompute, global_params: list[torch.Tensor] | None = None, augment: bool = False,
    patients: np.ndarray | None = None, drift: DriftCorrection | None = None,
) -> tuple[float, int]:
    """Train ``net`` in place for one round of DP-SGD on ``compute.workers`` processes; returns (loss, steps).

    ``data`` is what the round trains on (fixed features already computed, :func:`common.training.
    on_fixed_features`). ``patients`` (the patient index of every record, :func:`client.dp.patients.patient_groups`)
    makes the patient the unit, as :func:`client.dp.sgd.patient_round` does in one process; ``plan`` is then over
    patients. ``drift`` (SCAFFOLD, keyed by ``net``'s parameters) corrects every rank's steps and receives rank 0's
    record of the noised gradients stepped on, as one process's round leaves it. Raises :class:`WorkerFailure`
    when a worker fails or dies (every worker is then stopped) and :class:`ValueError` for patients with
    augmentation (patient-level DP-SGD trains without it).
    """
    import torch.multiprocessing as mp

    if patients is not None and augment:
        raise ValueError("patient-level DP-SGD trains without augmentation; expected augment=False with patients")
    devices, backend = compute.resolved(), compute.backend()
    cores = os.cpu_count() or 1
    threads = max(1, cores // compute.workers)  # the cores shared among the workers, not oversubscribed
    shipped = copy.deepcopy(net).cpu()
    params = [g.detach().cpu() for g in global_params] if global_params is not None else None
    with tempfile.TemporaryDirectory(prefix="medsilo-workers-") as folder:
        os.chmod(folder, 0o700)
        job = _Job(shipped, data, task, config, plan, randomness, server_round, params, augment, devices, backend,
                   str(Path(folder) / "rendezvous"), threads, TEST_HOOKS, patients, _shipped_drift(net, drift))
        spawn = mp.get_context("spawn")
        results = spawn.Queue()
        context = mp.start_processes(_worker, args=(job, results), nprocs=compute.workers, join=False,
                                     start_method="spawn")
        payload: bytes | None = None
        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    payload = results.get(timeout=0.1)
                try:
                    finished = context.join(timeout=0.1)
                except mp.ProcessExitedException as exc:
                    raise WorkerFailure(
                        f"DP-SGD worker {exc.error_index} of {compute.workers} died ({exc}) in round {server_round}; "
                        "the round failed and nothing was sent (its reservation stays on the ledger); check the "
                        "node's memory and devices, or lower --workers") from None
                except mp.ProcessRaisedException as exc:
                    raise WorkerFailure(
                        f"DP-SGD worker {exc.error_index} of {compute.workers} failed in round {server_round}; the "
                        "round failed and nothing was sent (its reservation stays on the ledger); the node's log has "
                        f"the worker's traceback") from exc
                if finished:
                    break
            if payload is None:
                with contextlib.suppress(queue.Empty):
                    payload = results.get(timeout=5)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            results.close()
            results.join_thread()
    if payload is None:
        raise WorkerFailure(f"the DP-SGD workers of round {server_round} ended without a result; nothing was sent")
    result = torch.load(io.BytesIO(payload), weights_only=True)
    net.load_state_dict(result["state"])
    if drift is not None:  # rank 0's record of the noised gradients it stepped on: the site's next c_i
        own = list(net.parameters())
        drift.absorb({own[i]: s.to(own[i].device) for i, s in result["drift_sums"].items()},
                     int(result["drift_steps"]))
    return float(result["loss"]), int(result["steps"])


def _worker(rank: int, job: _Job, results: Any) -> None:
    """One worker's round (the entry point spawn runs); rank 0 puts the trained state on ``results``."""
    if job.hooks is not None and job.hooks.on_start is not None:
        job.hooks.on_start(rank)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the workers talk over loopback only
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torch.set_num_threads(job.threads)
    dev = torch.device(job.devices[rank])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.FileStore(job.store, len(job.devices))
    dist.init_process_group(job.backend, store=store, rank=rank, world_size=len(job.devices),
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        control = dist.new_group(backend="gloo") if job.backend != "gloo" else None
        group = WorkerGroup(rank=rank, world=len(job.devices), device=dev, control=control,
                            on_step=job.hooks.on_step if job.hooks is not None else None)
        # Spawn hands every worker the same shared-memory weights: each trains its own copy (the records stay shared).
        net = copy.deepcopy(job.net).to(dev)
        globals_ = [g.to(dev) for g in job.global_params] if job.global_params is not None else None
        drift = _worker_drift(net, job.drift)  # every rank corrects and records its steps alike
        if job.patients is not None:  # the one-process patient round, as this rank of the group
            from client.dp.sgd import patient_round

            if not isinstance(job.data, TensorDataset):
                raise TypeError("patient-level DP-SGD trains on whole records (a TensorDataset), not volume samples")
            loss, steps = patient_round(net, job.data, job.task, job.config, job.plan, randomness=job.randomness,
                                        server_round=job.server_round, patients=job.patients,
                                        global_params=globals_, group=group, drift=drift)
        else:
            loss, steps = _record_round(net, job, group, globals_, drift)
        _check_identical(net, control)
        if rank == 0:
            buffer = io.BytesIO()
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            sums = ({i: drift.sums[p].detach().cpu() for i, p in enumerate(net.parameters()) if p in drift.sums}
                    if drift is not None else {})
            torch.save({"state": state, "loss": loss, "steps": steps, "drift_sums": sums,
                        "drift_steps": drift.steps if drift is not None else 0}, buffer)
            if job.hooks is not None and job.hooks.gradient_file:
                torch.save([p.grad.detach().cpu() for p in net.parameters() if p.grad is not None],
                           job.hooks.gradient_file)
            results.put(buffer.getvalue())
    finally:
        dist.destroy_process_group()


def _record_round(net: nn.Module, job: _Job, group: WorkerGroup, global_params: list[torch.Tensor] | None,
                  drift: DriftCorrection | None) -> tuple[float, int]:
    """The rank's part of a record-level round (:func:`client.dp.sgd.make_private`); returns (loss, steps)."""
    from client.dp.sgd import dp_epoch_sums, make_private, records_dataset
    from client.trainer import augmenter, make_optimizer, round_lr
    from common.training import loss_function

    config, plan = job.config, job.plan
    lr = round_lr(config.dp_lr, config, job.server_round)
    aug = augmenter(config, job.randomness.torch_generator("augment", server_round=job.server_round),
                    job.task) if job.augment else None
    private = make_private(
        net, make_optimizer(net, lr, config.weight_decay, drift), records_dataset(job.data),
        sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
        expected_batch_size=plan.expected_batch_size, randomness=job.randomness, server_round=job.server_round,
        group=group,
    )
    prox = (global_params, config.proximal_mu, lr) if global_params and config.proximal_mu > 0 else None
    sums = torch.zeros(2, dtype=torch.float64)
    try:
        for _ in range(config.local_epochs):
            total, count = dp_epoch_sums(private, loss_function(job.task), proximal=prox, augment=aug)
            sums = torch.tensor([total, float(count)], dtype=torch.float64)
    finally:
        private.close()
    group.all_reduce_cpu_sum(sums)  # the last epoch's loss over the whole batch, as one process has it
    return float(sums[0]) / max(float(sums[1]), 1.0), private.steps[0]


def _check_identical(net: nn.Module, control: Any) -> None:
    """Every rank ends the round with the same weights (their checksums agree), or the round fails."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in net.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=control)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=control)
    if not torch.equal(low, high):
        raise RuntimeError("the DP-SGD workers' models diverged during the round; expected identical steps")
