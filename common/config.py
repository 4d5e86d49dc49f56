"""Typed run configuration shared by the ServerApp, the ClientApp and the CLI.

Flower carries the configuration as a flat ``run_config`` of kebab-case keys; this module is
the one place that turns it into a validated, frozen :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.errors import Problems

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam")
ACCOUNTANTS = ("prv", "rdp")
#: What a site trains of a model started from ``init_checkpoint`` (the rest is frozen): see ``fine_tune``.
FINE_TUNE = ("all", "decoder", "norm+head", "head")


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs, identical at the coordinator and every site.

    Attributes
    ----------
    dataset
        Dataset name from :data:`common.datasets.CATALOG` (the task and the server's test split).
    model
        Model name from :data:`common.models.MODELS`, or ``auto`` (see
        :func:`common.models.resolve_model_name`: the scattering model for small 2D datasets, else the
        compact CNN, 2D or 3D; segmentation: the slice-wise U-Net).
    strategy
        ``fedavg``, ``fedavgm`` (server momentum ``server_momentum``; it accumulates the signal
        of several rounds' noisy DP updates), ``fedprox`` (uses ``proximal_mu``) or ``fedadam``
        (uses ``server_lr``).
    scaffold
        SCAFFOLD's drift correction (:mod:`common.control_variates`) on top of ``strategy``: every local
        step is corrected by the federation's mean gradient minus the site's, which keeps label-skewed
        sites from pulling the model towards their own label mix. Doubles what a round sends.
    rounds, local_epochs
        Federation rounds and local epochs per round.
    batch_size
        Expected batch size (Poisson sampling rate ``batch_size / n_site`` under DP).
    lr, dp_lr
        Local Adam learning rate without and with DP-SGD.
    dp
        Record-level DP-SGD at every site; ``epsilon``/``delta`` is each site's budget for the run.
    max_grad_norm
        Per-record gradient clipping bound.
    accountant
        Opacus accountant: ``prv`` (tight) or ``rdp``.
    server_eval
        The coordinator also scores each round on the dataset's public test split, read from its own disk. Off by
        default: the sites' federated validation selects the model and sets the decision threshold, so a
        coordinator holds no patient data; ``medsilo simulate`` turns it on (the researcher holds the test split).
    secure_aggregation
        SecAgg+ masking of every site update (on by default; the simulator turns it off unless asked).
    secagg_threshold
        Fraction of a round's sites whose key shares must arrive to unmask the sum (dropout tolerance).
    max_site_records
        Largest training set a site may hold; sizes the SecAgg+ quantization range (see
        :mod:`common.secure_aggregation`).
    round_timeout
        Seconds the coordinator waits for sites at each stage of a round (0: no limit); a site that
        does not answer in time is treated as dropped out.
    validation_releases
        How many global models the sites validate (spread over the run, the last one always). Under DP each
        validation is a Gaussian release charged to every site's ε (:mod:`client.dp.release`), planned for in
        the site's noise calibration; a request beyond the plan is charged too.
    validation_noise
        σ of each DP validation release, in records (0: the site's default for the run's ε).
    resolution
        Input side in pixels for 2D classification: 28, 64, 128 or 224 (the MedMNIST+ sizes), or 0 for the dataset's
        own size. MedMNIST files hold 28-pixel images, which a run at 64 upsamples (the model card and the summary
        say so: ``source_resolution`` vs ``resolution``); DICOM sites resize from their images' native resolution.
        Models with a fixed scattering front (``scatnet``, ``scatcnn``) train at 28 only.
    init_checkpoint
        Start every arm of the run (the federation and the pooled and local-only references) from this checkpoint
        (``medsilo pretrain`` writes one; :func:`common.checkpoint.initial_model`).
    fine_tune
        What every site trains of the model, the rest frozen at the checkpoint's values (no gradient, no update,
        and under DP-SGD no clipping or noise: the mechanism applies to exactly the parameters trained, so the
        setting changes how much noise the signal meets, never the guarantee). ``all``; ``decoder`` (a U-Net's
        decoder and head); ``norm+head`` (normalisation affine parameters and the output layer); ``head`` (the
        output layer). Anything but ``all`` needs ``init_checkpoint``. The references, trained without DP, train all.
    public_records
        How many records of the training split the federation declares public (a fixed seeded subset,
        :func:`common.volumes.public_indices`): no site holds them, and ``medsilo pretrain`` trains on them.
    resume
        Continue the run whose checkpoint (``resume-state.safetensors``) is in ``out_dir`` after its last
        aggregated round, instead of starting a new one (see :mod:`server.resume`).

    """

    dataset: str = "pneumoniamnist"
    model: str = "auto"
    strategy: str = "fedavgm"
    scaffold: bool = False
    rounds: int = 10
    local_epochs: int = 3
    batch_size: int = 64
    lr: float = 0.002
    dp_lr: float = 0.005
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    augment: bool = False
    server_lr: float = 0.01
    server_momentum: float = 0.7
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0
    min_sites: int = 2
    fraction_fit: float = 1.0
    server_eval: bool = False
    out_dir: str = ""
    site_data_dir: str = ""
    init_checkpoint: str = ""
    fine_tune: str = "all"
    public_records: int = 0
    secure_aggregation: bool = True
    secagg_threshold: float = 0.75
    max_site_records: int = 10000
    round_timeout: float = 0.0
    validation_releases: int = 1
    validation_noise: float = 0.0
    resolution: int = 0
    resume: bool = False

    @property
    def aggregation(self) -> str:
        """The aggregation rule as reports name it: the strategy, ``+ scaffold`` when SCAFFOLD corrects drift."""
        return f"{self.strategy} + scaffold" if self.scaffold else self.strategy

    def validated_rounds(self) -> tuple[int, ...]:
        """The rounds whose global model the sites validate: ``validation_releases``, spread, the last among them."""
        n = min(self.validation_releases, self.rounds)
        return tuple(sorted({max(1, round(self.rounds * k / n)) for k in range(1, n + 1)}))

    # ------------------------------------------------------------------ conversion
    @staticmethod
    def key(field_name: str) -> str:
        """Flower run-config key of a field (``local_epochs`` -> ``local-epochs``)."""
        return field_name.replace("_", "-")

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case mapping, as Flower's ``run_config`` carries it."""
        return {self.key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from a Flower ``run_config``; unknown keys and bad values are all reported."""
        problems = Problems()
        known = {cls.key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            field = known.get(key)
            if field is None:
                problems.add(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
                continue
            default = field.default
            try:
                values[field.name] = _coerce(raw, type(default))
            except (TypeError, ValueError):
                problems.add(f"{key}={raw!r} is not a {type(default).__name__}")
        problems.raise_if_any()
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> RunConfig:
        """Copy with ``changes`` applied and validated."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every invalid setting, each with the value and the fix (empty when valid)."""
        from common.datasets import CATALOG, resolution_problems
        p = Problems()
        p.check(self.dataset.lower() in CATALOG,
                f"dataset={self.dataset!r} is unknown; use one of: {', '.join(sorted(CATALOG))}")
        p.check(bool(self.model), "model='' is empty; use auto or a model name (`medsilo simulate --help` lists them)")
        p.check(self.strategy in STRATEGIES,
                f"strategy={self.strategy!r} is unknown; use one of: {', '.join(STRATEGIES)}")
        p.check(self.fine_tune in FINE_TUNE,
                f"fine-tune={self.fine_tune!r} is unknown; use one of: {', '.join(FINE_TUNE)}")
        p.check(self.fine_tune == "all" or bool(self.init_checkpoint),
                f"fine-tune={self.fine_tune} freezes the rest of the model at its random initialisation; set "
                "init-checkpoint to a pretrained checkpoint (`medsilo pretrain`), or use fine-tune=all")
        p.check(self.public_records >= 0, f"public-records={self.public_records} must be >= 0")
        p.check(self.accountant in ACCOUNTANTS,
                f"accountant={self.accountant!r} is unknown; use one of: {', '.join(ACCOUNTANTS)}")
        p.check(self.rounds >= 1, f"rounds={self.rounds} must be at least 1")
        p.check(self.local_epochs >= 1, f"local-epochs={self.local_epochs} must be at least 1")
        p.check(self.batch_size >= 1, f"batch-size={self.batch_size} must be at least 1")
        for name in ("lr", "dp_lr", "server_lr", "max_grad_norm"):
            value = getattr(self, name)
            p.check(math.isfinite(value) and value > 0, f"{self.key(name)}={value} must be > 0")
        p.check(self.weight_decay >= 0, f"weight-decay={self.weight_decay} must be >= 0")
        p.check(self.proximal_mu >= 0, f"proximal-mu={self.proximal_mu} must be >= 0")
        p.check(0 <= self.server_momentum < 1, f"server-momentum={self.server_momentum} must be in [0, 1)")
        if self.dp:
            p.check(math.isfinite(self.epsilon) and self.epsilon > 0,
                    f"epsilon={self.epsilon} must be > 0 (or turn DP off explicitly with dp=false)")
            p.check(0 < self.delta < 1, f"delta={self.delta} must be in (0, 1); 1e-5 is typical")
        p.check(self.min_sites >= 1, f"min-sites={self.min_sites} must be at least 1")
        p.check(0 < self.fraction_fit <= 1, f"fraction-fit={self.fraction_fit} must be in (0, 1]")
        p.check(0.5 < self.secagg_threshold <= 1,
                f"secagg-threshold={self.secagg_threshold} must be in (0.5, 1]: SecAgg+ is safe against a coordinator "
                "that lies about dropouts only with a majority threshold (sites refuse less); 0.75 tolerates 25% "
                "dropouts")
        p.check(self.max_site_records >= 1, f"max-site-records={self.max_site_records} must be at least 1")
        p.check(self.validation_releases >= 1,
                f"validation-releases={self.validation_releases} must be at least 1 (the final model is validated)")
        p.check(math.isfinite(self.validation_noise) and self.validation_noise >= 0,
                f"validation-noise={self.validation_noise} must be >= 0 (0: the sites' default for the run's ε)")
        p.check(self.round_timeout >= 0, f"round-timeout={self.round_timeout} must be >= 0 (0: wait forever)")
        for item in resolution_problems(CATALOG.get(self.dataset.lower()), self.resolution):
            p.add(item)
        return p.items

    def validate(self) -> None:
        """Raise :class:`common.errors.ConfigError` listing every problem."""
        p = Problems()
        for item in self.problems():
            p.add(item)
        p.raise_if_any()


def _coerce(raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise ValueError(raw)
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw)
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        return float(raw)
    return str(raw)
