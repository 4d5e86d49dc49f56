"""Local training at a site without DP, and what DP-SGD shares with it (optimizer, SCAFFOLD, augmentation).

DP-SGD itself lives in :mod:`client.dp.sgd` (the privacy-critical package); this module never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.datasets import Task
from common.features import FeatureCache
from common.training import TrainingSet, cosine_lr, loss_function, on_fixed_features, train_epoch

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one local round produced (weights stay in the model). The loss never leaves the site."""

    train_loss: float
    steps: int


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

    def absorb(self, sums: Mapping[nn.Parameter, torch.Tensor], steps: int) -> None:
        """Take the record of ``steps`` steps another process took with this correction on a copy of the model.

        ``sums``: that process's sum of each parameter's recorded gradients, keyed by this side's parameter. A
        DP-SGD round on several workers (:mod:`client.dp.worker_job`) leaves its rank 0's record here, as if
        :meth:`apply` had run in this process.
        """
        self.steps += steps
        for p, s in sums.items():
            if p in self.sums:
                self.sums[p].add_(s)
            else:
                self.sums[p] = s.detach().clone()

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


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, drift: DriftCorrection | None = None
) -> torch.optim.Optimizer:
    """Adam over the trained parameters (through ``drift`` under SCAFFOLD), with DP-SGD or without.

    Frozen parameters (``requires_grad=False``, :func:`fine_tune`) are not given to the optimizer: no step, and
    no weight decay, ever moves them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if drift is not None:
        return _CorrectedAdam(params, lr=lr, weight_decay=weight_decay, drift=drift)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def fine_tune(model: nn.Module, config: RunConfig) -> list[str]:
    """Freeze what the run's ``fine-tune`` setting does not train; return the names of the trained parameters.

    A site calls this on every model it trains, with DP-SGD or without: the coordinator's setting decides which
    parameters move, while DP-SGD still clips and noises every parameter that does.
    """
    from common.checkpoint import freeze_for_fine_tuning

    return freeze_for_fine_tuning(model, config.fine_tune)


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

    ``drift`` corrects every step (SCAFFOLD) and collects the round's mean gradient. Only what the run's
    ``fine-tune`` names is trained (:func:`fine_tune`).
    """
    fine_tune(model, config)
    if global_params is not None:  # FedProx pulls the trained parameters only (``train_epoch`` pairs them up)
        global_params = [g for p, g in zip(model.parameters(), global_params, strict=True) if p.requires_grad]
    gen = torch.Generator().manual_seed(seed % 2**64)
    aug = augmenter(config, gen, task)
    net, data = on_fixed_features(model, dataset, augmented=aug is not None, cache=features)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=gen)
    lr = round_lr(config.lr, config, server_round)
    opt = make_optimizer(net, lr, config.weight_decay, drift)
    prox = (global_params, config.proximal_mu, lr) if global_params and config.proximal_mu > 0 else None
    loss = 0.0
    for _ in range(config.local_epochs):
        loss = train_epoch(net, loader, opt, loss_function(task), proximal=prox, augment=aug)
    return RoundResult(train_loss=loss, steps=config.local_epochs * len(loader))
