"""PRIVACY-CRITICAL: one site's DP-SGD round on several worker processes (CPU cores or GPUs), one mechanism.

A hospital with several GPUs (or many cores) sets its node's compute (``workers = N``, ``devices``; the node
config, never the coordinator's run config: :func:`site_compute`). A DP-SGD round then runs in ``N`` processes
(``torch.distributed``: gloo on CPU, NCCL on CUDA) that together take the *same* steps the single-process round
takes (:func:`client.dp.sgd.make_private` builds both; nothing of the mechanism is forked here):

- **Sampling, once per step, by rank 0**: rank 0 alone holds the round's ``"sampling"`` generator (OS entropy,
  :mod:`client.dp.rng`) and draws the step's Poisson batch with Opacus's own sampler
  (``UniformWithReplacementSampler``: every record independently with probability ``q``) over *all* the site's
  records; the inclusion mask is broadcast and each rank takes a contiguous share of the drawn indices. The batch
  is exactly the single-process batch (same sampler, same generator, same ``q``, same ``N``); how it is split
  changes which process computes a record's clipped gradient, not the sum. Sharding the records and having each
  rank sample its shard at rate ``q`` would give the same distribution (Poisson sampling is independent per
  record, so the union of independent per-shard Poisson samples at ``q`` is a Poisson sample at ``q``), but it
  needs ``N`` OS-entropy generators whose independence the guarantee then rests on, and shard boundaries to get
  right; one draw by one process keeps the sampling the single-process code, line for line.
- **Clipping, per record, per rank**: each rank clips each of its records' gradients with
  :class:`~client.dp.clipping.PerRecordClipper` (a rank with an empty share contributes a zero sum and still steps).
- **Sum, then noise exactly once**: the per-rank clipped sums are all-reduced (SUM), so every rank holds the batch's
  clipped sum; rank 0 alone holds the ``"noise"`` generator and adds ``N(0, (σC)²)`` (Opacus's secure-mode draw)
  to it, then broadcasts the noised sum; every rank divides it by the plan's ``q · N̂`` and takes the same optimizer
  step, so the model stays identical on every rank (checked at the end of the round). The other ranks have no
  noise generator at all: noise cannot be added twice.
- **Every planned step is taken** (empty batches included), and the ledger is untouched: the node reserved the round
  before the workers start, and checks their step count after.

A worker that fails or dies fails the round: the others are stopped, :class:`WorkerFailure` is raised, nothing is
sent; the reservation stays on the ledger (:mod:`client.dp.ledger`). The workers meet through a file store in an
owner-only temporary folder (no listening port for the rendezvous) and talk over loopback only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import queue
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, default_collate

from client.dp.accounting import PrivacyPlan
from client.dp.clipping import IndexedRecords, NoisingOptimizer, PerRecordClipper, unsupported_layers
from client.dp.rng import Randomness
from common.config import RunConfig
from common.datasets import Task
from common.errors import ConfigError, MedsiloError
from common.training import TrainingSet

log = logging.getLogger(__name__)

#: The node-config keys of a site's compute (``medsilo client start --workers N --devices ...``).
WORKERS_KEY, DEVICES_KEY = "workers", "devices"

#: How long a worker waits in one collective (a peer that hangs) before it fails the round.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class WorkerFailure(MedsiloError):
    """A DP-SGD worker process failed or died: the round failed, nothing was sent."""


# ---------------------------------------------------------------------------------------------- the setting
@dataclass(frozen=True)
class SiteCompute:
    """What a node trains on: ``workers`` processes over ``devices`` (``("auto",)``: every GPU, else the CPU).

    The hospital's setting, from its node config (:func:`site_compute`); a coordinator's run config has no such key.
    """

    workers: int = 1
    devices: tuple[str, ...] = ("auto",)

    def resolved(self) -> list[str]:
        """The device of each worker: rank ``r`` uses ``devices[r % len(devices)]``.

        Raises :class:`~common.errors.ConfigError` for a CUDA device this machine does not have.
        """
        names = list(self.devices)
        if names == ["auto"]:
            names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        for name in names:
            dev = torch.device(name)
            if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
                raise ConfigError([f"the node's devices setting names {name}, but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s); fix --devices (or use auto)"])
        return [names[r % len(names)] for r in range(self.workers)]

    def backend(self) -> str:
        """``"nccl"`` when every worker is on a CUDA device, ``"gloo"`` when every one is on the CPU."""
        kinds = {torch.device(d).type for d in self.resolved()}
        if kinds == {"cpu"}:
            return "gloo"
        if kinds == {"cuda"}:
            return "nccl"
        raise ConfigError([f"the node's devices {', '.join(self.devices)} mix CPU and CUDA; expected all of one "
                          "kind: fix --devices"])


def site_compute(node_config: Mapping[str, Any]) -> SiteCompute:
    """The node's compute: ``workers`` (an integer >= 1, default 1) and ``devices`` (``auto`` or a comma list).

    Read from the node config only (``medsilo client start --workers N --devices cuda:0,cuda:1``); raises
    :class:`~common.errors.ConfigError` naming the bad value.
    """
    raw_workers = node_config.get(WORKERS_KEY, 1)
    try:
        workers = int(str(raw_workers))
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError([f"the node's workers={raw_workers!r} is not an integer >= 1; fix --workers"])
    text = str(node_config.get(DEVICES_KEY, "auto")).strip() or "auto"
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    for name in devices:
        if name == "auto":
            if len(devices) > 1:
                raise ConfigError([f"the node's devices={text!r} mixes auto with devices; expected auto or a list"])
            continue
        try:
            kind = torch.device(name).type
        except RuntimeError:
            kind = "?"
        if kind not in ("cpu", "cuda"):
            raise ConfigError([f"the node's devices setting names {name!r}; expected auto, cpu or cuda:N"])
    return SiteCompute(workers=workers, devices=devices)


# ---------------------------------------------------------------------------------------------- in a worker
@dataclass
class WorkerGroup:
    """A worker's place in the round: its rank among ``world`` and the group CPU control messages go through."""

    rank: int
    world: int
    device: torch.device
    control: Any = None  # a gloo group for CPU tensors when the default group is NCCL; None: the default group

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place, in one collective."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unflatten(flat, tensors)

    def broadcast_from_root(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's, in one collective."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        _unflatten(flat, tensors)

    def poisson_batches(self, records: Dataset, *, sample_rate: float, generator: torch.Generator | None,
                        collate_fn: Callable[[Any], Any] | None) -> SharedPoissonBatches:
        """The rank's share of each step's Poisson batch (rank 0 draws it with ``generator``)."""
        return SharedPoissonBatches(self, records, sample_rate=sample_rate, generator=generator, collate_fn=collate_fn)


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class SharedPoissonBatches:
    """Each step's Poisson batch, drawn once by rank 0 with Opacus's sampler, this rank's contiguous share served.

    As many steps per pass as Opacus's ``DPDataLoader`` takes (``int(1 / q)``). An empty share is served as ``()``:
    :func:`client.dp.sgd.dp_epoch` then takes the rank's empty step (a zero clipped sum), so every rank steps.
    """

    def __init__(self, group: WorkerGroup, records: Dataset, *, sample_rate: float,
                 generator: torch.Generator | None, collate_fn: Callable[[Any], Any] | None) -> None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.group, self.records, self.collate_fn = group, records, collate_fn
        self.size = len(records)  # type: ignore[arg-type]
        if group.rank == 0 and generator is None:
            raise ValueError("rank 0 samples the batches: it needs the round's sampling generator")
        self.sampler = UniformWithReplacementSampler(num_samples=self.size, sample_rate=sample_rate,
                                                     generator=generator) if group.rank == 0 else None
        self.steps = int(1 / sample_rate)  # as Opacus's sampler has it
        #: A test-only hook: called with the rank at the start of every step.
        self.on_step: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        drawn = iter(self.sampler) if self.sampler is not None else None
        for _ in range(self.steps):
            if self.on_step is not None:
                self.on_step(self.group.rank)
            mask = torch.zeros(self.size, dtype=torch.uint8)
            if drawn is not None:
                mask[torch.as_tensor(next(drawn), dtype=torch.long)] = 1
            dist.broadcast(mask, src=0, group=self.group.control)
            indices = mask.nonzero().reshape(-1)
            share = torch.tensor_split(indices, self.group.world)[self.group.rank].tolist()
            yield self._batch(share) if share else ()

    def _batch(self, share: list[int]) -> Any:
        if isinstance(self.records, IndexedRecords):
            return IndexedRecords.collate(self.records.__getitems__(share))
        collate = self.collate_fn or default_collate
        return collate([self.records[i] for i in share])


class SharedNoisingOptimizer(NoisingOptimizer):
    """:class:`~client.dp.clipping.NoisingOptimizer` over the ranks: clipped sums all-reduced, noised once by rank 0.

    Ranks other than 0 are built without a noise generator; their :meth:`add_noise` receives rank 0's noised sum.
    Scaling by ``q · N̂`` and the step are the parent class's, on every rank alike.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, group: WorkerGroup, clipper: PerRecordClipper,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 loss_reduction: str = "mean", generator: torch.Generator | None = None) -> None:
        if (generator is not None) != (group.rank == 0):
            raise ValueError(f"rank {group.rank}: only rank 0 holds the noise generator")
        super().__init__(optimizer, clipper=clipper, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=generator)
        self.group = group

    def accumulate(self) -> None:
        """The rank's clipped sum (refused unless clipped), then the sum over all ranks: the batch's clipped sum."""
        super().accumulate()
        self.group.all_reduce_sum([p.summed_grad for p in self.params])  # type: ignore[misc]

    def add_noise(self) -> None:
        """Rank 0 adds the step's one Gaussian draw to the clipped sum; every rank receives that noised sum."""
        from opacus.optimizers.optimizer import _mark_as_processed

        if self.group.rank == 0:
            super().add_noise()
        else:
            for p in self.params:
                p.grad = p.summed_grad.clone().view_as(p)  # type: ignore[union-attr]  # replaced by rank 0's below
                _mark_as_processed(p.summed_grad)  # type: ignore[arg-type]
        self.group.broadcast_from_root([p.grad for p in self.params])  # type: ignore[misc]


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


# ---------------------------------------------------------------------------------------------- the round
def single_process_reason(net: nn.Module, *, patients: bool, drift: bool) -> str | None:
    """Why a round cannot run on several workers (it then runs in one process), or ``None`` when it can."""
    if patients:
        return "patient-level DP-SGD runs in one process"
    if drift:
        return "SCAFFOLD's drift correction runs in one process"
    unsupported = unsupported_layers(net)
    if unsupported:
        return f"layers the one-pass clipper cannot clip ({', '.join(unsupported)}) run in one process"
    return None


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


def train_workers(
    net: nn.Module, data: TrainingSet, task: Task, config: RunConfig, plan: PrivacyPlan, *, randomness: Randomness,
    server_round: int, compute: SiteCompute, global_params: list[torch.Tensor] | None = None, augment: bool = False,
) -> tuple[float, int]:
    """Train ``net`` in place for one round of DP-SGD on ``compute.workers`` processes; returns (loss, steps).

    ``data`` is what the round trains on (fixed features already computed, :func:`common.training.
    on_fixed_features`). Raises :class:`WorkerFailure` when a worker fails or dies (every worker is then stopped)
    and :class:`RuntimeError` when the steps taken differ from the plan's.
    """
    import torch.multiprocessing as mp

    devices, backend = compute.resolved(), compute.backend()
    cores = os.cpu_count() or 1
    threads = max(1, cores // compute.workers)  # the cores shared among the workers, not oversubscribed
    shipped = copy.deepcopy(net).cpu()
    params = [g.detach().cpu() for g in global_params] if global_params is not None else None
    with tempfile.TemporaryDirectory(prefix="medsilo-workers-") as folder:
        os.chmod(folder, 0o700)
        job = _Job(shipped, data, task, config, plan, randomness, server_round, params, augment, devices, backend,
                   str(Path(folder) / "rendezvous"), threads, TEST_HOOKS)
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
    return float(result["loss"]), int(result["steps"])


def _worker(rank: int, job: _Job, results: Any) -> None:
    """One worker's round (the entry point spawn runs); rank 0 puts the trained state on ``results``."""
    from client.dp.sgd import dp_epoch_sums, make_private, records_dataset
    from client.trainer import augmenter, make_optimizer, round_lr
    from common.training import loss_function

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
        group = WorkerGroup(rank=rank, world=len(job.devices), device=dev, control=control)
        # Spawn hands every worker the same shared-memory weights: each trains its own copy (the records stay shared).
        net, config, plan = copy.deepcopy(job.net).to(dev), job.config, job.plan
        lr = round_lr(config.dp_lr, config, job.server_round)
        aug = augmenter(config, job.randomness.torch_generator("augment", server_round=job.server_round),
                        job.task) if job.augment else None
        private = make_private(
            net, make_optimizer(net, lr, config.weight_decay), records_dataset(job.data),
            sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
            expected_batch_size=plan.expected_batch_size, randomness=job.randomness, server_round=job.server_round,
            group=group,
        )
        if job.hooks is not None and isinstance(private.loader, SharedPoissonBatches):
            private.loader.on_step = job.hooks.on_step
        globals_ = [g.to(dev) for g in job.global_params] if job.global_params is not None else None
        prox = (globals_, config.proximal_mu, lr) if globals_ and config.proximal_mu > 0 else None
        sums = torch.zeros(2, dtype=torch.float64)
        try:
            for _ in range(config.local_epochs):
                total, count = dp_epoch_sums(private, loss_function(job.task), proximal=prox, augment=aug)
                sums = torch.tensor([total, float(count)], dtype=torch.float64)
        finally:
            private.close()
        dist.all_reduce(sums, group=control)  # the last epoch's loss over the whole batch, as one process has it
        _check_identical(net, control)
        if rank == 0:
            buffer = io.BytesIO()
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            torch.save({"state": state, "loss": float(sums[0]) / max(float(sums[1]), 1.0), "steps": private.steps[0]},
                       buffer)
            if job.hooks is not None and job.hooks.gradient_file:
                torch.save([p.grad.detach().cpu() for p in net.parameters() if p.grad is not None],
                           job.hooks.gradient_file)
            results.put(buffer.getvalue())
    finally:
        dist.destroy_process_group()


def _check_identical(net: nn.Module, control: Any) -> None:
    """Every rank ends the round with the same weights (their checksums agree), or the round fails."""
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in net.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=control)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=control)
    if not torch.equal(low, high):
        raise RuntimeError("the DP-SGD workers' models diverged during the round; expected identical steps")
