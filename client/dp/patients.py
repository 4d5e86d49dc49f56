"""PRIVACY-CRITICAL: DP-SGD with the patient, not the image, as the unit that is sampled, clipped and counted.

A patient with ``k`` images trained record by record spends about ``k`` times the site's ε. Where the node
knows which images belong to which patient (DICOM: each ingested unit's ``patient_key``; a site file's
``train_patients``), DP-SGD runs over patients instead:

- Poisson sampling draws *patients* at the plan's rate ``q`` (Opacus's :class:`~opacus.data_loader.DPDataLoader`
  over :class:`PatientRecords`, one item per patient);
- a patient's gradient is the gradient of the mean loss over that patient's images
  (:func:`patient_gradients`, ``torch.func``: ``vmap(grad(...))`` over the patient dimension);
- Opacus's :class:`~opacus.optimizers.DPOptimizer` clips each patient's gradient to ``C``, sums, adds
  ``N(0, (σC)²)`` once per step (empty batches included) and divides by the data-independent expected batch
  size; its step hook records every step in the accountant.

Adding or removing one patient then changes at most one summand of norm ``C``: the accountant's ``(σ, q, steps)``
is a guarantee per patient. Patient keys may be PHI; nothing here logs or returns them, only group indices.

On several worker processes (:mod:`client.dp.distributed`) :func:`train_patients_dp` runs on every rank with the
worker's ``group``: rank 0 alone draws each step's patients over *all* the site's patients (the same sampler,
generator and ``q``), each rank computes and clips its share's per-patient gradients with the code above
(:func:`clipped_patient_step`), the ranks' clipped sums are summed and rank 0 alone adds the noise
(:class:`~client.dp.distributed_patients.SharedPatientOptimizer`): the same steps as one process.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset, TensorDataset

from common.datasets import Task

if TYPE_CHECKING:
    from opacus.accountants import IAccountant
    from opacus.optimizers import DPOptimizer

    from client.dp.distributed import WorkerGroup

#: ``loss(logits (K, ...), targets (K, ...)) -> (K,)``: one loss per image.
PerImageLoss = Callable[[Tensor, Tensor], Tensor]


def patient_groups(keys: Sequence[Hashable] | np.ndarray) -> np.ndarray:
    """The patient index of every record: ``0 .. P-1`` in the order patients are first seen.

    Parameters
    ----------
    keys
        One patient identifier per record (ints, strings or any hashable value; numpy scalars compare
        equal to their Python values).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int64 group indices; ``keys[i] == keys[j]`` exactly when ``groups[i] == groups[j]``.

    """
    index: dict[Hashable, int] = {}
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        value = key.item() if isinstance(key, np.generic) else key
        out[i] = index.setdefault(value, len(index))
    return out


class PatientRecords(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """A training set of patients: item ``i`` holds all of patient ``i``'s images.

    Items are ``(x, y, mask)`` of shapes ``(K, *image)``, ``(K, *label)`` and ``(K,)`` (bool), where ``K`` is
    the largest number of images any patient has; a patient with fewer images is padded with zeros whose
    ``mask`` is False. Every item has the same shape, so Opacus's :class:`~opacus.data_loader.DPDataLoader`
    and the default collate batch them (an empty Poisson batch has batch size 0).

    Parameters
    ----------
    records
        The image records: a :class:`~torch.utils.data.TensorDataset` of ``(x, y)`` or the tuple ``(x, y)``.
    groups
        Patient index per record, ``0 .. P-1`` with every index present (:func:`patient_groups`).

    Raises
    ------
    ValueError
        When the lengths differ or ``groups`` is not a complete set of indices ``0 .. P-1``.

    """

    def __init__(self, records: TensorDataset | tuple[Tensor, Tensor], groups: np.ndarray | Sequence[int]) -> None:
        x, y = records.tensors if isinstance(records, TensorDataset) else records
        g = np.asarray(groups)
        if g.ndim != 1 or len(g) != x.shape[0] or len(y) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} image(s), {len(y)} label(s) and {g.shape} patient indices: "
                             "expected one patient index per record")
        if len(g) == 0:
            raise ValueError("no training record: a patient-level training set needs at least one patient")
        if not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError("patient indices must be non-negative integers; build them with patient_groups")
        counts = np.bincount(g)
        if (counts == 0).any():
            raise ValueError(f"patient indices skip {int((counts == 0).sum())} value(s) of 0..{len(counts) - 1}; "
                             "build them with patient_groups")
        self.x, self.y = x, y
        order = np.argsort(g, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        self.members = [torch.from_numpy(order[bounds[i]:bounds[i + 1]].copy()) for i in range(len(counts))]
        #: Images of the patient with the most images (the padded stack's length ``K``).
        self.max_images = int(counts.max())
        #: Images per patient, ``(P,)``.
        self.images_per_patient = counts

    def __len__(self) -> int:
        return len(self.members)

    def empty_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """A batch of no patient: ``(0, K, *image)``, ``(0, K, *label)``, ``(0, K)``, as Opacus's loader serves one."""
        return (self.x.new_zeros((0, self.max_images, *self.x.shape[1:])),
                self.y.new_zeros((0, self.max_images, *self.y.shape[1:])),
                torch.zeros((0, self.max_images), dtype=torch.bool))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = self.members[i]
        k = len(idx)
        xs = self.x.new_zeros((self.max_images, *self.x.shape[1:]))
        ys = self.y.new_zeros((self.max_images, *self.y.shape[1:]))
        xs[:k], ys[:k] = self.x[idx], self.y[idx]
        mask = torch.zeros(self.max_images, dtype=torch.bool)
        mask[:k] = True
        return xs, ys, mask


def per_image_loss(task: Task) -> PerImageLoss:
    """The training loss of :func:`common.training.loss_function`, one value per image.

    Binary and multi-label: logistic loss averaged over the outputs; multi-class and ordinal: cross-entropy.
    The mean over a patient's images is then what the site's record-level training minimises per record.

    Raises
    ------
    ValueError
        For segmentation, whose records already are patients (:class:`common.training.PatientSamples`).

    """
    if task is Task.SEGMENTATION:
        raise ValueError("segmentation records are patients already; train them with record-level DP-SGD")
    if task is Task.BINARY or task is Task.MULTILABEL:
        def logistic(logits: Tensor, targets: Tensor) -> Tensor:
            per = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            return per.flatten(1).mean(1)

        return logistic

    def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, targets, reduction="none")

    return cross_entropy


def _gradients_and_losses(
    model: nn.Module, loss_fn_per_image: PerImageLoss, x: Tensor, y: Tensor, mask: Tensor,
    params: Sequence[nn.Parameter], chunk_size: int | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Per-patient gradients of ``params`` and per-patient mean losses ``(B,)``."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"parameter(s) {missing} of the {len(params)} given are not parameters of the model")
    if x.shape[0] == 0:  # an empty Poisson batch: no patient, no gradient (the step is still noised)
        return [p.new_zeros((0, *p.shape)) for p in params], x.new_zeros((0,))
    wanted = {names[id(p)] for p in params}
    trainable = {names[id(p)]: p.detach() for p in params}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def patient_loss(weights: dict[str, Tensor], xs: Tensor, ys: Tensor, ms: Tensor) -> tuple[Tensor, Tensor]:
        # One patient's K images run as a batch of K: every layer (GroupNorm included) treats images apart,
        # so the padded images change nothing but their own (masked-out) losses.
        logits = functional_call(model, (weights, frozen, buffers), (xs,))
        w = ms.to(logits.dtype)
        loss = (loss_fn_per_image(logits, ys) * w).sum() / w.sum().clamp(min=1.0)
        return loss, loss.detach()

    per_patient = vmap(grad(patient_loss, has_aux=True), in_dims=(None, 0, 0, 0), chunk_size=chunk_size,
                       randomness="different")
    grads, losses = per_patient(trainable, x, y, mask)
    return [grads[names[id(p)]] for p in params], losses


def patient_gradients(
    model: nn.Module, loss_fn_per_image: PerImageLoss, x: Tensor, y: Tensor, mask: Tensor,
    params: Sequence[nn.Parameter], *, chunk_size: int | None = None,
) -> list[Tensor]:
    """Each patient's gradient of the mean of their own images' losses, for every parameter in ``params``.

    Parameters
    ----------
    model
        The network; its parameters not in ``params`` and its buffers are held fixed.
    loss_fn_per_image
        ``(logits (K, ...), targets (K, ...)) -> (K,)`` (:func:`per_image_loss`).
    x, y, mask
        A batch of :class:`PatientRecords` items: ``(B, K, *image)``, ``(B, K, *label)``, ``(B, K)`` bool;
        images whose mask is False are excluded from their patient's mean.
    params
        The trainable parameters (e.g. the optimizer's), in the order of the returned list.
    chunk_size
        Patients per vectorised chunk (``None``: all at once); bounds memory, not the result.

    Returns
    -------
    list of torch.Tensor
        ``(B, *p.shape)`` per parameter ``p``: row ``b`` is patient ``b``'s gradient (``B = 0`` for an empty
        batch).

    """
    return _gradients_and_losses(model, loss_fn_per_image, x, y, mask, params, chunk_size)[0]


def clipped_patient_step(
    model: nn.Module, dp: DPOptimizer, loss_fn_per_image: PerImageLoss, x: Tensor, y: Tensor, mask: Tensor, *,
    chunk_size: int | None = None,
) -> Tensor:
    """One DP-SGD step on a batch of patients: their gradients, clipped per patient, summed, noised, stepped.

    Each patient's gradient (:func:`patient_gradients`) goes to ``p.grad_sample``; ``dp.step()`` (Opacus's
    :class:`~opacus.optimizers.DPOptimizer`, or its several-rank form) clips each to ``C``, sums them, adds the
    step's noise once, divides by the expected batch size and steps. An empty batch (``B = 0``) is a step of noise
    alone. Returns the patients' mean losses ``(B,)``.
    """
    params: list[nn.Parameter] = list(dp.params)
    dev = params[0].device
    dp.zero_grad(set_to_none=True)
    grads, losses = _gradients_and_losses(model, loss_fn_per_image, x.to(dev), y.to(dev), mask.to(dev), params,
                                          chunk_size)
    for p, g in zip(params, grads, strict=True):
        p.grad_sample = g  # type: ignore[attr-defined]
    dp.step()  # clip per patient, sum (over the ranks), noise once, divide, account; empty batch: noise only
    return losses


def train_patients_dp(
    model: nn.Module,
    records: PatientRecords,
    *,
    task: Task,
    optimizer: torch.optim.Optimizer,
    accountant: IAccountant,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    epochs: int,
    sampling_generator: torch.Generator | None,
    noise_generator: torch.Generator | None,
    chunk_size: int | None = None,
    after_step: Callable[[], None] | None = None,
    group: WorkerGroup | None = None,
) -> tuple[float, int]:
    """``epochs`` epochs of patient-level DP-SGD on ``model`` (trained in place); every planned step is taken.

    Each epoch draws ``int(1 / sample_rate)`` Poisson batches of patients. At every step each sampled patient's
    gradient is clipped to ``max_grad_norm`` (``C``), the clipped gradients are summed, ``N(0, (σC)²)`` is added
    once (Opacus's floating-point-attack-resistant draw from ``noise_generator``) and the result is divided by
    ``expected_batch_size``; an empty batch is a step of noise alone. Opacus's step hook records each step in
    ``accountant`` as ``(noise_multiplier, sample_rate)``.

    Parameters
    ----------
    model
        The network; the optimizer's parameters must be among its parameters.
    records
        The site's patients (:class:`PatientRecords`), on any device (batches move to the parameters' device).
    task
        The dataset's task (the loss of :func:`per_image_loss`).
    optimizer
        A plain torch optimizer over the trainable parameters; it is wrapped here for this call only.
    accountant
        The Opacus accountant the site's history continues in.
    sample_rate, noise_multiplier, max_grad_norm, expected_batch_size
        The privacy plan's ``q``, ``σ``, the clipping norm ``C`` and ``q * patients_estimate``.
    epochs
        Local epochs.
    sampling_generator, noise_generator
        Randomness of Poisson sampling and of the noise (the noise generator on the parameters' device); with
        ``group``, rank 0's alone (``None`` on every other rank).
    chunk_size
        Patients per vectorised chunk of :func:`patient_gradients`.
    after_step
        Called after every optimizer step (e.g. FedProx's proximal pull); it must not read the records.
    group
        This worker's place in a several-process round (:mod:`client.dp.distributed`), or ``None`` (one process):
        rank 0 draws every step's patients over all of ``records``, this rank trains its share of them, the
        ranks' clipped sums are summed and rank 0 adds the noise
        (:class:`~client.dp.distributed_patients.SharedPatientOptimizer`). Every rank returns the same result.

    Returns
    -------
    tuple of (float, int)
        Mean training loss over non-empty batches (0 when every batch was empty) and the optimizer steps taken.

    Raises
    ------
    ValueError
        On an out-of-range sampling rate, noise, clipping norm or expected batch size, no trainable parameter, or
        a generator missing (one process, rank 0) or held by a rank other than 0.

    """
    if not (0 < sample_rate <= 1) or noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
        raise ValueError(f"q={sample_rate}, σ={noise_multiplier}, C={max_grad_norm}, "
                         f"expected batch size {expected_batch_size}: expected 0 < q <= 1, σ >= 0, C > 0, size > 0")
    root = group is None or group.rank == 0  # the one process that samples and noises
    if (sampling_generator is not None, noise_generator is not None) != (root, root):
        raise ValueError(f"{'one process' if group is None else f'rank {group.rank}'} received "
                         f"{'no ' if sampling_generator is None else ''}sampling and "
                         f"{'no ' if noise_generator is None else ''}noise generator; expected both on the process "
                         "that samples and noises (one process, or rank 0), neither on any other rank")
    if not any(p.requires_grad for group_ in optimizer.param_groups for p in group_["params"]):
        raise ValueError("the optimizer has no trainable parameter: nothing to train under DP-SGD")
    loader, dp = _private_patients(records, optimizer, sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                                   max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                   sampling_generator=sampling_generator, noise_generator=noise_generator, group=group)
    dp.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    params: list[nn.Parameter] = list(dp.params)
    loss_fn = per_image_loss(task)
    model.train()
    per_step: list[tuple[float, float]] = []  # (sum of this rank's patients' losses, their number) per step
    try:
        for _ in range(epochs):
            for x, y, mask in loader:
                losses = clipped_patient_step(model, dp, loss_fn, x, y, mask, chunk_size=chunk_size)
                per_step.append((float(losses.double().sum()), float(len(losses))))
                if after_step is not None:
                    after_step()
    finally:
        for p in params:  # leave plain parameters behind (their .grad holds the last noised gradient)
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    sums = torch.tensor(per_step, dtype=torch.float64).reshape(-1, 2)
    if group is not None:
        group.all_reduce_cpu_sum(sums)  # each step's losses over all the ranks: the whole batch's
    nonempty = sums[:, 1] > 0
    loss = float((sums[nonempty, 0] / sums[nonempty, 1]).mean()) if nonempty.any() else 0.0
    return loss, len(per_step)


def _private_patients(
    records: PatientRecords, optimizer: torch.optim.Optimizer, *, sample_rate: float, noise_multiplier: float,
    max_grad_norm: float, expected_batch_size: float, sampling_generator: torch.Generator | None,
    noise_generator: torch.Generator | None, group: WorkerGroup | None,
) -> tuple[Any, DPOptimizer]:
    """The Poisson loader over patients and the clipping, noising optimizer: one process's, or this rank's."""
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    settings: dict[str, Any] = {
        "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
        "expected_batch_size": expected_batch_size,  # Opacus only divides by it
        "loss_reduction": "mean", "generator": noise_generator, "secure_mode": False,
    }
    loader: Any
    dp: DPOptimizer
    if group is None:
        loader = DPDataLoader(records, sample_rate=sample_rate, generator=sampling_generator)
        dp = DPOptimizer(optimizer, **settings)
    else:
        from torch.utils.data import default_collate

        from client.dp.distributed_patients import SharedPatientOptimizer

        loader = group.poisson_batches(records, sample_rate=sample_rate, generator=sampling_generator,
                                       collate_fn=default_collate, empty=records.empty_batch())
        dp = SharedPatientOptimizer(optimizer, group=group, **settings)
    dp.secure_mode = True  # Opacus's floating-point-attack-resistant noise (the constructor would ask for torchcsprng)
    return loader, dp
