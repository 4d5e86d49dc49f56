"""Local training at a site: plain, or record-level DP-SGD with Opacus and Poisson sampling.

The noise multiplier is calibrated once, from the whole planned run (rounds x local epochs x
steps per epoch), so the site's ε after the last round meets its target; the accountant's
history is carried between rounds by the caller and every round's ε is reported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import accounting as privacy
from common.config import RunConfig
from common.datasets import Task
from common.features import FeatureCache
from client.dp.accounting import PrivacyPlan
from common.training import TrainingSet, cosine_lr, loss_function, on_fixed_features, train_epoch

if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

log = logging.getLogger(__name__)

#: Per-record gradients, for models whose layers :class:`client.dp.clipping.PerRecordClipper` cannot clip
#: (3D convolutions): torch's expanded weights, the same clipped gradients as Opacus's default hooks
#: (checked in tests) at less cost.
GRAD_SAMPLE_MODE = "ew"


@dataclass
class PrivateTraining:
    """One round's DP-SGD: Opacus's Poisson loader, noising optimizer and accountant hook, and a backward pass.

    ``backward`` turns a batch's loss into the clipped gradient sum the optimizer noises. ``how`` is
    ``"one-pass"`` (:class:`client.dp.clipping.PerRecordClipper`: Opacus's clipping in one backward pass) or
    Opacus's grad-sample mode. Call :meth:`close` after the round: the model is a plain module again.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DPDataLoader
    backward: Callable[[torch.Tensor], None]
    close: Callable[[], None]
    how: str


def records_loader(data: TrainingSet, batch_size: int) -> DataLoader:
    """The loader Opacus turns into its Poisson loader.

    Records held as tensors are served as :class:`client.dp.clipping.IndexedRecords`, so that clipping can
    look up what it computed per record.
    """
    from client.dp.clipping import IndexedRecords

    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        records = IndexedRecords(*data.tensors)
        return DataLoader(records, batch_size=batch_size, shuffle=False, collate_fn=IndexedRecords.collate)
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_private(
    net: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, engine: PrivacyEngine, *,
    noise_multiplier: float, max_grad_norm: float,
) -> PrivateTraining:
    """Wrap one round's model, optimizer and loader for DP-SGD with Poisson sampling.

    Where every trainable layer is supported (:func:`client.dp.clipping.unsupported_layers`), the clipped sum
    comes from :class:`~client.dp.clipping.PerRecordClipper` and Opacus builds the rest as its
    ``make_private`` does for ghost clipping: the Poisson loader, the optimizer that noises the clipped
    sum (``DPOptimizerFastGradientClipping``, via :class:`~client.dp.clipping.NoisingOptimizer`) and the
    accountant's step hook. Otherwise Opacus's ``make_private`` with :data:`GRAD_SAMPLE_MODE`.
    """
    from opacus.data_loader import DPDataLoader

    from client.dp.clipping import IndexedRecords, NoisingOptimizer, PerRecordClipper, unsupported_layers

    if unsupported_layers(net):
        private_model, private_opt, private_loader = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE,
        )
        return PrivateTraining(private_model, private_opt, private_loader, backward=torch.Tensor.backward,
                               close=getattr(private_model, "remove_hooks", lambda: None), how=GRAD_SAMPLE_MODE)
    engine.validate(module=net, optimizer=optimizer, data_loader=loader)
    poisson = DPDataLoader.from_data_loader(loader)
    sample_rate = 1 / len(poisson)
    records = poisson.dataset if isinstance(poisson.dataset, IndexedRecords) else None
    clipper = PerRecordClipper(net, max_grad_norm=max_grad_norm, records=records)
    noising = NoisingOptimizer(
        optimizer, clipper=clipper, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(len(poisson.dataset) * sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
    )
    noising.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(net, noising, poisson, backward=clipper.backward, close=clipper.close, how="one-pass")


@dataclass
class RoundResult:
    """What one local round produced (weights stay in the model)."""

    train_loss: float
    steps: int
    history: list[privacy.HistoryEntry] = field(default_factory=list)
    epsilon: float = 0.0


def plan_privacy(config: RunConfig, num_records: int) -> PrivacyPlan:
    """Calibrate σ so that ``rounds * local_epochs`` epochs of DP-SGD spend exactly the budget."""
    q = privacy.sample_rate_for(batch_size=config.batch_size, num_records=num_records)
    per_round = config.local_epochs * privacy.steps_per_epoch(sample_rate=q)
    total = config.rounds * per_round
    sigma = privacy.calibrate_noise(
        target_epsilon=config.epsilon,
        target_delta=config.delta,
        sample_rate=q,
        steps=total,
        accountant=config.accountant,
    )
    return PrivacyPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=per_round, planned_steps=total)


class DriftCorrection:
    """SCAFFOLD at one site for one round (see :mod:`common.control_variates`).

    ``correction`` maps trainable parameters to ``c - c_i``. At every optimizer step, after DP-SGD has
    clipped and noised the gradient, :meth:`apply` records the gradient (its mean over the round is the
    site's next ``c_i``) and then adds the correction, so Adam steps on the corrected gradient.
    """

    def __init__(self, correction: Mapping[nn.Parameter, torch.Tensor]) -> None:
        self.correction = dict(correction)
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.steps = 0

    def apply(self, params: Iterable[nn.Parameter]) -> None:
        """Record each parameter's gradient of this step, then add its correction."""
        self.steps += 1
        for p in params:
            if p.grad is None:
                continue
            if p in self.sums:
                self.sums[p].add_(p.grad.detach())
            else:
                self.sums[p] = p.grad.detach().clone()
            c = self.correction.get(p)
            if c is not None:
                p.grad.add_(c.to(p.grad.device, p.grad.dtype))

    def mean_gradients(self) -> dict[nn.Parameter, torch.Tensor]:
        """The round's mean gradient per parameter (empty when no step was taken)."""
        return {p: s / self.steps for p, s in self.sums.items()} if self.steps else {}


class _CorrectedAdam(torch.optim.Adam):
    """Adam whose steps go through a :class:`DriftCorrection` first (Opacus calls this after its noise)."""

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float,
                 drift: DriftCorrection) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.drift = drift

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        self.drift.apply(p for group in self.param_groups for p in group["params"])
        return super().step(closure)


def _optimizer(
    model: nn.Module, lr: float, weight_decay: float, drift: DriftCorrection | None = None
) -> torch.optim.Optimizer:
    if drift is not None:
        return _CorrectedAdam(model.parameters(), lr=lr, weight_decay=weight_decay, drift=drift)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def augmenter(
    config: RunConfig, generator: torch.Generator, task: Task
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Random affine + intensity augmentation of 2D image batches when the run asks for it (``augment``).

    Not for segmentation (the masks would have to move with the images) nor for volumes.
    """
    if not config.augment or task is Task.SEGMENTATION:
        return None
    from client.preprocessing import augment

    return lambda x: augment(x, generator=generator) if x.ndim == 4 else x


def round_lr(base_lr: float, config: RunConfig, server_round: int) -> float:
    """The local learning rate of ``server_round`` (cosine decay over the planned rounds)."""
    return cosine_lr(base_lr, step=server_round, total=config.rounds)


def train_plain(
    model: nn.Module, dataset: TrainingSet, task: Task, config: RunConfig, *, seed: int,
    server_round: int = 1, global_params: list[torch.Tensor] | None = None, features: FeatureCache | None = None,
    drift: DriftCorrection | None = None,
) -> RoundResult:
    """Local epochs without DP (sites that opted out); ``features`` keeps a fixed-feature model's features.

    ``drift`` corrects every step (SCAFFOLD) and collects the round's mean gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    aug = augmenter(config, gen, task)
    net, data = on_fixed_features(model, dataset, augmented=aug is not None, cache=features)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=gen)
    lr = round_lr(config.lr, config, server_round)
    opt = _optimizer(net, lr, config.weight_decay, drift)
    prox = (global_params, config.proximal_mu, lr) if global_params and config.proximal_mu > 0 else None
    loss = 0.0
    for _ in range(config.local_epochs):
        loss = train_epoch(net, loader, opt, loss_function(task), proximal=prox, augment=aug)
    return RoundResult(train_loss=loss, steps=config.local_epochs * len(loader))


def train_dp(
    model: nn.Module,
    dataset: TrainingSet,
    task: Task,
    config: RunConfig,
    plan: PrivacyPlan,
    history: list[privacy.HistoryEntry],
    *,
    seed: int,
    server_round: int = 1,
    global_params: list[torch.Tensor] | None = None,
    projected_epsilon: float | None = None,
    features: FeatureCache | None = None,
    drift: DriftCorrection | None = None,
) -> RoundResult:
    """Local epochs of DP-SGD continuing the accountant ``history``; the model is trained in place.

    ``projected_epsilon`` is ε of ``history`` plus this round's planned steps, already computed
    by the caller's budget check; it is reused when the accountant recorded exactly those steps.
    ``features`` is the site's cache of a fixed-feature model's features (:func:`on_fixed_features`).
    ``drift`` (SCAFFOLD) corrects the clipped and noised gradient of every step and collects their mean.
    """
    torch.manual_seed(seed)
    aug = augmenter(config, torch.Generator().manual_seed(seed + 1), task)
    net, data = on_fixed_features(model, dataset, augmented=aug is not None, cache=features)
    loader = records_loader(data, config.batch_size)
    lr = round_lr(config.dp_lr, config, server_round)
    opt = _optimizer(net, lr, config.weight_decay, drift)
    with warnings.catch_warnings():
        # Opacus warns that its cryptographically secure RNG is off (see README, limitations).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        from opacus import PrivacyEngine  # on first use: see client.dp.accounting

        engine = PrivacyEngine(accountant=config.accountant)
        engine.accountant.history = [tuple(h) for h in history]
        private = make_private(net, opt, loader, engine, noise_multiplier=plan.noise_multiplier,
                               max_grad_norm=config.max_grad_norm)
    private_loader = private.loader
    if abs(private_loader.sample_rate - plan.sample_rate) > 1e-12 or len(private_loader) * config.local_epochs != (
        plan.steps_per_round
    ):
        raise RuntimeError(
            f"Opacus sampled at q={private_loader.sample_rate} with {len(private_loader)} steps per epoch, "
            f"the privacy plan assumed q={plan.sample_rate} and {plan.steps_per_round} steps per round"
        )
    prox = (global_params, config.proximal_mu, lr) if global_params and config.proximal_mu > 0 else None
    loss = 0.0
    try:
        for _ in range(config.local_epochs):
            loss = train_epoch(private.model, private_loader, private.optimizer, loss_function(task), proximal=prox,
                               augment=aug, backward=private.backward)
    finally:
        private.close()  # the caller's model is a plain module again
    new_history = [(float(s), float(q), int(t)) for s, q, t in engine.accountant.history]
    planned = privacy.merge_history(history, (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))
    if projected_epsilon is not None and new_history == planned:
        eps = projected_epsilon
    else:  # fewer steps than planned (an empty Poisson batch): account what really happened
        eps = privacy.epsilon_spent(history=new_history, delta=config.delta, accountant=config.accountant)
    steps = sum(t for _, _, t in new_history) - sum(t for _, _, t in history)
    return RoundResult(train_loss=loss, steps=steps, history=new_history, epsilon=eps)
