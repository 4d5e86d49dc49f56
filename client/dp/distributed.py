"""PRIVACY-CRITICAL: one site's DP-SGD round on several worker processes (CPU cores or GPUs), one mechanism.

A hospital with several GPUs (or many cores) sets its node's compute (``workers = N``, ``devices``; the node
config, never the coordinator's run config: :func:`site_compute`). A DP-SGD round then runs in ``N`` processes
(``torch.distributed``: gloo on CPU, NCCL on CUDA) that together take the *same* steps the single-process round
takes, whatever the privacy unit: the record (:func:`client.dp.sgd.make_private` builds both) or the patient
(:func:`client.dp.patients.train_patients_dp` runs both; its pieces for several ranks are in
:mod:`client.dp.distributed_patients`). Nothing of the mechanism is forked here:

- **Sampling, once per step, by rank 0**: rank 0 alone holds the round's ``"sampling"`` generator (OS entropy,
  :mod:`client.dp.rng`) and draws the step's Poisson batch with Opacus's own ``DPDataLoader`` (its
  ``UniformWithReplacementSampler``: every unit independently with probability ``q``) over the indices of *all*
  the site's units: its records, or its patients (one item per patient, :class:`~client.dp.patients.PatientRecords`);
  the inclusion mask is broadcast and each rank takes a contiguous share of the drawn units (a patient, with all of
  their images, goes to one rank). The batch is exactly the single-process batch (the same loader, generator,
  ``q`` and ``N``: batch for batch the draws of one process's ``DPDataLoader``); how it is split changes which
  process computes a unit's clipped gradient, not the sum. Sharding the units and having each rank sample its
  shard at rate ``q`` would give the same distribution (Poisson sampling is independent per unit, so the union of
  independent per-shard Poisson samples at ``q`` is a Poisson sample at ``q``), but it needs ``N`` OS-entropy
  generators whose independence the guarantee then rests on, and shard boundaries to get right; one draw by one
  process keeps the sampling the single-process code, line for line.
- **Clipping, per unit, per rank**: each rank clips each of its records' gradients with
  :class:`~client.dp.clipping.PerRecordClipper`, or each of its patients' gradients (the gradient of the mean loss
  over the patient's images, :func:`client.dp.patients.patient_gradients`) with Opacus's ``DPOptimizer``, as one
  process does. A rank with an empty share contributes a zero sum and still steps.
- **Sum, then noise exactly once** (:class:`NoisedOnceOptimizer`, for both units): the per-rank clipped sums are
  all-reduced (SUM), so every rank holds the batch's clipped sum; rank 0 alone holds the ``"noise"`` generator and
  adds ``N(0, (σC)²)`` (Opacus's secure-mode draw) to it, then broadcasts the noised sum; every rank divides it by
  the plan's ``q · N̂`` (``N̂``: the site's estimated records, or patients) and takes the same optimizer step, so
  the model stays identical on every rank (checked at the end of the round). The other ranks have no noise
  generator at all: noise cannot be added twice.
- **SCAFFOLD's drift correction, on every rank alike**: each rank's optimizer records the step's noised gradient
  (the broadcast noised sum over ``q · N̂``) and adds the same ``c - c_i`` to it before Adam steps, as one
  process's does; the mean of rank 0's record is the site's next ``c_i`` (post-processing of the noised gradients,
  no collective added: :mod:`client.dp.worker_job`).
- **Every planned step is taken** (empty batches included), and the ledger is untouched: the node reserved the round
  (the same plan, ``q`` over the same units, as one process) before the workers start, and checks their step
  count after.

A round runs in one process instead where :func:`single_process_reason` says so: with the record as the unit,
layers the one-pass clipper cannot clip (patients' gradients come from ``torch.func``, not from that clipper).
The processes themselves (spawning them, what each receives, the end-of-round check that every rank's model is
the same, what rank 0 returns, a worker's failure failing the round) are :mod:`client.dp.worker_job`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from client.dp.clipping import IndexedRecords, NoisingOptimizer, unsupported_layers
from common.errors import ConfigError

log = logging.getLogger(__name__)

#: The node-config keys of a site's compute (``medsilo client start --workers N --devices ...``).
WORKERS_KEY, DEVICES_KEY = "workers", "devices"


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
    #: A test-only hook (:class:`~client.dp.worker_job.WorkerHooks`): called with the rank at the start of every step.
    on_step: Callable[[int], None] | None = None

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

    def all_reduce_cpu_sum(self, tensor: torch.Tensor) -> None:
        """Sum a CPU tensor (bookkeeping, never a gradient) over the ranks, in place, through the control group."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control)

    def poisson_batches(self, records: Dataset, *, sample_rate: float, generator: torch.Generator | None,
                        collate_fn: Callable[[Any], Any] | None, empty: Any = ()) -> SharedPoissonBatches:
        """The rank's share of each step's Poisson batch over ``records`` (rank 0 draws it with ``generator``).

        ``records`` are the units sampled: records, or patients (:class:`~client.dp.patients.PatientRecords`).
        ``empty`` is what an empty share is served as.
        """
        return SharedPoissonBatches(self, records, sample_rate=sample_rate, generator=generator, collate_fn=collate_fn,
                                    empty=empty)


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class SharedPoissonBatches:
    """Each step's Poisson batch, drawn once by rank 0 with Opacus's loader, this rank's contiguous share served.

    Rank 0 iterates Opacus's ``DPDataLoader`` over the units' indices with the round's sampling generator: the
    draws are one process's (the loader also takes its iterator's seed from the generator), batch for batch.
    As many steps per pass as that loader takes (``int(1 / q)``). An empty share is served as
    ``empty`` (``()`` for records: :func:`client.dp.sgd.dp_epoch` then takes the rank's empty step, a zero clipped
    sum; zero-size tensors for patients), so every rank steps.
    """

    def __init__(self, group: WorkerGroup, records: Dataset, *, sample_rate: float,
                 generator: torch.Generator | None, collate_fn: Callable[[Any], Any] | None, empty: Any = ()) -> None:
        from opacus.data_loader import DPDataLoader

        self.group, self.records, self.collate_fn, self.empty = group, records, collate_fn, empty
        self.size = len(records)  # type: ignore[arg-type]
        if group.rank == 0 and generator is None:
            raise ValueError("rank 0 samples the batches: it needs the round's sampling generator")
        self.draws = DPDataLoader(TensorDataset(torch.arange(self.size)), sample_rate=sample_rate,
                                  generator=generator) if group.rank == 0 else None
        self.steps = int(1 / sample_rate)  # as Opacus's loader has it
        #: A test-only hook: called with the rank at the start of every step.
        self.on_step: Callable[[int], None] | None = group.on_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        drawn = iter(self.draws) if self.draws is not None else None
        for _ in range(self.steps):
            if self.on_step is not None:
                self.on_step(self.group.rank)
            mask = torch.zeros(self.size, dtype=torch.uint8)
            if drawn is not None:
                mask[next(drawn)[0].long()] = 1
            dist.broadcast(mask, src=0, group=self.group.control)
            indices = mask.nonzero().reshape(-1)
            share = torch.tensor_split(indices, self.group.world)[self.group.rank].tolist()
            yield self._batch(share) if share else self.empty

    def _batch(self, share: list[int]) -> Any:
        if isinstance(self.records, IndexedRecords):
            return IndexedRecords.collate(self.records.__getitems__(share))
        collate = self.collate_fn or default_collate
        return collate([self.records[i] for i in share])


class NoisedOnceOptimizer(DPOptimizer):
    """An Opacus optimizer over the ranks: the ranks' clipped sums summed, noised once by rank 0, for either unit.

    Mixed in before the single-process optimizer it shares (:class:`SharedNoisingOptimizer` for records,
    :class:`~client.dp.distributed_patients.SharedPatientOptimizer` for patients): that class computes the rank's
    clipped sum, :meth:`sum_over_ranks` makes it the batch's, and :meth:`add_noise` is that class's own draw, on
    rank 0 only. Ranks other than 0 are built without a noise generator; their :meth:`add_noise` receives rank 0's
    noised sum. Scaling by ``q · N̂`` and the step are the parent class's, on every rank alike.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, group: WorkerGroup,
                 generator: torch.Generator | None = None, **settings: Any) -> None:
        if (generator is not None) != (group.rank == 0):
            raise ValueError(f"rank {group.rank}: only rank 0 holds the noise generator")
        super().__init__(optimizer, generator=generator, **settings)
        self.group = group

    def sum_over_ranks(self) -> None:
        """Replace this rank's clipped sum (``p.summed_grad``) with the sum over all ranks: the batch's clipped sum."""
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


class SharedNoisingOptimizer(NoisedOnceOptimizer, NoisingOptimizer):
    """:class:`~client.dp.clipping.NoisingOptimizer` over the ranks (records): clipped sums all-reduced, noised once."""

    def accumulate(self) -> None:
        """The rank's clipped sum (refused unless clipped), then the sum over all ranks: the batch's clipped sum."""
        super().accumulate()
        self.sum_over_ranks()


# ---------------------------------------------------------------------------------------------- the round
def single_process_reason(net: nn.Module, *, patients: bool) -> str | None:
    """Why a round cannot run on several workers (it then runs in one process), or ``None`` when it can.

    ``patients``: the patient is the unit (:mod:`client.dp.patients`), whose per-patient gradients come from
    ``torch.func`` on any layer, so the one-pass clipper's layer support does not apply to it. SCAFFOLD's drift
    correction runs on several workers (:mod:`client.dp.worker_job`), so it is no reason.
    """
    unsupported = [] if patients else unsupported_layers(net)
    if unsupported:
        return f"layers the one-pass clipper cannot clip ({', '.join(unsupported)}) run in one process"
    return None
