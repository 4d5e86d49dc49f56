"""PRIVACY-CRITICAL: a site's personalised model, the federation's global model fine-tuned on the site's own records.

A hospital whose own model beats the federated one asks what joining gives it. Personalisation answers at the
site: the global model the coordinator published is fine-tuned on the site's training records with the site's own
DP-SGD (:func:`client.dp.sgd.train_dp`: Poisson sampling, per-record or per-patient clipping, secure Gaussian
noise, generators seeded from the OS's entropy) and charged to the site's privacy ledger before a record is
touched. Nothing leaves the site: the personalised model is written owner-only on the node.

The guarantee, precisely. Personalisation is a run of its own in the data source's ledger (a fresh random run key):

- it releases the training record count once by a Gaussian mechanism (σ :func:`client.dp.release.count_noise_for`
  of the personalisation ε; ``mechanism="count"``), from which the sampling rate ``q = 1 / ceil(N̂ / B)`` and the
  step count ``T = epochs · int(1 / q)`` follow;
- it then reserves ``T`` DP-SGD steps at ``(σ, q)`` (``mechanism="personalise"``), σ calibrated so that the count
  release and the ``T`` steps together spend exactly the personalisation ε at the site's δ by the site's
  accountant (:func:`client.dp.accounting.plan_run` with one round and no validation release).

The personalised model is therefore ``(ε_p, δ)``-DP with respect to the site's training records (add/remove one
record, or one patient where the site knows its patients). Everything the site ever released from the same data
source, the federation's rounds included, composes with it in the same accountant: the ledger's lifetime ε of the
data source is the site's total, and the site policy's ``epsilon-lifetime`` caps it. A personalisation that would
take that total past the cap is refused before anything is charged or trained (and, atomically, again at the
reservation).

The coordinator's checkpoint is untrusted: it is read from safetensors only (no pickle), must carry exactly the
model's tensors with the model's shapes, and its weights must be finite and bounded (:func:`load_global_model`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.data import SiteData
from client.dp import accounting, release
from client.dp.accounting import PrivacyPlan
from client.dp.budget import Limits, Refused, SiteBudget
from client.dp.ledger import Ledger
from client.dp.rng import Randomness
from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import DatasetInfo
from common.errors import ConfigError, DataError
from common.features import FeatureCache
from common.models import build_model, resolve_model_name
from common.site_policy import SitePolicy, violations
from common.training import device, training_dataset

#: The ledger's name for personalisation's DP-SGD steps (its record count is a ``count`` release of the same run).
PERSONALISE = "personalise"

#: The largest weight magnitude accepted in a coordinator's checkpoint: :data:`client.site.MAX_RECEIVED_WEIGHT`.
MAX_WEIGHT = 1e4

#: Fine-tuning epochs over the site's records unless the site says otherwise.
DEFAULT_EPOCHS = 5

#: Fine-tuning learning rate as a fraction of the recipe's DP-SGD rate: the global model is a good start, and a
#: full-size step on it re-learns what the federation found (the federation's last rounds ran at 5 % of it).
DEFAULT_LR_FRACTION = 0.25


@dataclass(frozen=True)
class Personalised:
    """The outcome of :func:`personalise`; the model is fine-tuned in place.

    Attributes
    ----------
    run
        The personalisation's run key in the ledger.
    plan
        Its DP-SGD plan (σ, q, steps, the DP record count ``records_estimate``).
    steps
        Noised DP-SGD steps taken (every planned step; empty Poisson batches included).
    epsilon
        ε of the personalisation alone (count release + DP-SGD) at ``delta``, from the ledger.
    epsilon_lifetime
        The data source's ε over everything it ever released, this personalisation included, at ``delta_lifetime``.
    delta, delta_lifetime
        The δ of the two.

    """

    run: int
    plan: PrivacyPlan
    steps: int
    epsilon: float
    epsilon_lifetime: float
    delta: float
    delta_lifetime: float

    def record(self) -> dict[str, Any]:
        """The privacy statement as JSON values (for ``personalised.json``, ``summary.json``)."""
        return {"run": self.run, "epsilon": self.epsilon, "delta": self.delta,
                "epsilon_lifetime": self.epsilon_lifetime, "delta_lifetime": self.delta_lifetime,
                "noise_multiplier": self.plan.noise_multiplier, "sample_rate": self.plan.sample_rate,
                "steps": self.steps, "records_estimate": self.plan.records_estimate,
                "count_noise": self.plan.count_noise}


def personalisation_config(base: RunConfig, *, epsilon: float, epochs: int = DEFAULT_EPOCHS,
                           lr: float | None = None) -> RunConfig:
    """The site's recipe (``base``) as one round of ``epochs`` DP-SGD epochs within ``epsilon``.

    No SCAFFOLD, no proximal term: the fine-tuning is the site's alone (and :func:`personalise` plans no validation
    release, whatever ``validation_releases`` says). ``lr`` defaults to :data:`DEFAULT_LR_FRACTION` of the
    recipe's DP-SGD learning rate.
    """
    problems = []
    if not epsilon > 0:
        problems.append(f"personalisation ε={epsilon}: expected ε > 0, e.g. 2")
    if epochs < 1:
        problems.append(f"personalisation epochs={epochs}: expected at least 1, e.g. {DEFAULT_EPOCHS}")
    if lr is not None and not lr > 0:
        problems.append(f"personalisation learning rate {lr}: expected > 0")
    if problems:
        raise ConfigError(problems)
    return base.replace(dp=True, epsilon=float(epsilon), rounds=1, local_epochs=int(epochs), scaffold=False,
                        proximal_mu=0.0,
                        dp_lr=float(lr) if lr is not None else base.dp_lr * DEFAULT_LR_FRACTION)


def new_run_key() -> int:
    """A fresh 63-bit ledger run key for one personalisation (from the OS's entropy: never a coordinator's)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def privacy_units(data: SiteData) -> int:
    """What DP-SGD counts at this site: its patients where it knows them, else its training records."""
    return data.num_patients if data.num_patients is not None else len(data.train)


def load_global_model(path: str | Path, config: RunConfig, info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """The coordinator's model from a ``.safetensors`` file, checked to be exactly ``config.model`` for ``info``.

    Raises
    ------
    DataError
        Naming the file and what does not fit: not safetensors, missing or extra tensors, other shapes or dtypes,
        non-finite weights or weights above :data:`MAX_WEIGHT` in magnitude.

    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(f"checkpoint {path}: personalisation reads only .safetensors files (no pickle); pass the "
                        "coordinator's model-best.safetensors or model-final.safetensors")
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found; pass the global model the coordinator published")
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, TypeError) as exc:
        raise DataError(f"checkpoint {path} is not a valid safetensors file ({exc}); ask the coordinator for the "
                        "published model file") from None
    meta = _checkpoint_meta(path)
    model_name = resolve_model_name(config.model, info)
    model = build_model(config.model, info)
    own = model.state_dict()
    problems = []
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        problems.append(f"missing tensors {missing[:5]}" if missing else "")
        problems.append(f"unexpected tensors {extra[:5]}" if extra else "")
    else:
        for name, value in own.items():
            got = tensors[name]
            if got.shape != value.shape or got.dtype != value.dtype:
                problems.append(f"{name} is {tuple(got.shape)} {got.dtype}, the model's is "
                                f"{tuple(value.shape)} {value.dtype}")
            elif got.is_floating_point() and got.numel() and not (
                    torch.isfinite(got).all() and got.abs().max() <= MAX_WEIGHT):
                problems.append(f"{name} has non-finite weights or weights above {MAX_WEIGHT:g} in magnitude")
    problems = [p for p in problems if p]
    if problems:
        raise DataError(f"checkpoint {path} does not fit model {model_name} for {info.name}: "
                        f"{'; '.join(problems[:5])}; pass the global model of this federation (same --model and "
                        "dataset)")
    model.load_state_dict(tensors, strict=True)
    return model, meta


def _lifetime_precheck(ledger: Ledger, limits: Limits, config: RunConfig, records: int) -> None:
    """Refuse before anything is charged when the planned personalisation would exceed the lifetime budget.

    The check plans with the exact count (the decision is the site operator's, who holds the records; nothing
    leaves the site); the reservation itself re-checks atomically with the DP count's plan.
    """
    if limits.lifetime_epsilon is None:
        return
    plan = accounting.plan_run(
        epsilon=config.epsilon, delta=config.delta, accountant=config.accountant, batch_size=config.batch_size,
        rounds=1, local_epochs=config.local_epochs, records_estimate=records,
        count_noise=release.count_noise_for(epsilon=config.epsilon), validation_noise=0.0, validation_releases=0)
    now = accounting.epsilon_spent(history=ledger.history(), delta=limits.lifetime_delta,
                                   accountant=config.accountant)
    after = accounting.epsilon_spent(history=[*ledger.history(), *plan.planned_history()],
                                     delta=limits.lifetime_delta, accountant=config.accountant)
    if after > limits.lifetime_epsilon * (1 + accounting.BUDGET_TOLERANCE):
        raise Refused(
            f"personalisation at ε={config.epsilon:g} would raise the lifetime ε of data source {ledger.source.key} "
            f"from {now:.3f} to about {after:.3f}, above the site's lifetime budget ε={limits.lifetime_epsilon:g} "
            f"(δ={limits.lifetime_delta:g}); nothing was charged: ask for a smaller --epsilon, or have the "
            "hospital's privacy officer decide on the site policy's epsilon-lifetime")


def site_limits(policy: SitePolicy | None, config: RunConfig) -> Limits:
    """The lifetime budget and noise floor of ``policy`` (``None``: no lifetime cap, at ``config``'s δ)."""
    if policy is None:
        return Limits(lifetime_epsilon=None, lifetime_delta=config.delta)
    return Limits(lifetime_epsilon=policy.epsilon_lifetime, lifetime_delta=policy.delta,
                  min_noise_multiplier=policy.min_noise_multiplier)


def personalise(
    model: nn.Module, data: SiteData, config: RunConfig, *, ledger: Ledger, policy: SitePolicy | None,
    randomness: Randomness, features: FeatureCache | None = None, run: int | None = None,
) -> Personalised:
    """Fine-tune ``model`` in place on ``data``'s training records under DP-SGD, charged to ``ledger`` first.

    Parameters
    ----------
    model
        The global model (checked with :func:`load_global_model` when it comes from a coordinator).
    data
        The site's records; only the training split is used.
    config
        :func:`personalisation_config` of the site's recipe: ``epsilon`` is the personalisation's budget.
    ledger, policy
        The data source's ledger and the site's policy: its rules (ε per run, δ, clipping bound, datasets, models,
        epochs) apply to the personalisation as to a federated run, its lifetime ε caps the source's total
        (``None``: a simulated site without a policy, no cap).
    randomness
        Where sampling and noise come from: :func:`client.dp.rng.os_entropy` at a node.
    features
        The site's fixed-feature cache (scattering models), if it has one.
    run
        The ledger run key (a fresh :func:`new_run_key` when ``None``).

    Raises
    ------
    Refused
        When the site policy forbids it, the personalisation's own budget admits no plan, or the lifetime budget
        would be exceeded (before anything is charged where it can be known, else at the reservation; nothing is
        trained).

    """
    from client.dp.sgd import train_dp  # Opacus

    if policy is not None:
        broken = violations(policy, config, model_name=resolve_model_name(config.model, data.info),
                            parameters=None, secure=True, training=True)  # secure: no update leaves the site
        if broken:
            raise Refused("site policy: " + "; ".join(broken))
    limits = site_limits(policy, config)
    run = new_run_key() if run is None else run
    records = privacy_units(data)
    _lifetime_precheck(ledger, limits, config, records)
    # the federated run's planning, as one round with no validation release: the count charged first, σ calibrated
    plan = SiteBudget(ledger, limits, randomness, config).plan(run, records=records, validation_releases=0)
    charge = ledger.charge(run=run, server_round=1, mechanism=PERSONALISE, entry=plan.training_entry,
                           epsilon=config.epsilon, delta=config.delta, lifetime_epsilon=limits.lifetime_epsilon,
                           lifetime_delta=limits.lifetime_delta, accountant=config.accountant)
    if not charge.granted:
        raise Refused(charge.reason or "the personalisation is over budget")
    steps = 0
    try:
        model.to(device())
        train_set = training_dataset(data.train, data.info, resolve_model_name(config.model, data.info),
                                     seed=randomness.seed_int("patches", server_round=1))
        result = train_dp(model, train_set, data.info.task, config, plan, randomness=randomness, server_round=1,
                          features=features, patients=data.train_patients)
        steps = result.steps
        if not all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()):
            raise Refused("personalisation produced non-finite weights; nothing was written and the ε stays "
                          "charged (lower the learning rate)")
    finally:  # the records were touched: the reservation is spent whatever happened
        ledger.complete(run, 1, PERSONALISE, steps=steps, epsilon_run=charge.epsilon_run,
                        epsilon_lifetime=charge.epsilon_lifetime)
    return Personalised(
        run=run, plan=plan, steps=steps,
        epsilon=ledger.spent(delta=config.delta, accountant=config.accountant, run=run),
        epsilon_lifetime=ledger.spent(delta=limits.lifetime_delta, accountant=config.accountant),
        delta=config.delta, delta_lifetime=limits.lifetime_delta,
    )


def save_personalised(out: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the personalised model owner-only and atomically as ``OUT/model-personalised.safetensors``."""
    path = Path(out) / "model-personalised.safetensors"
    save_checkpoint(path, model.state_dict(), meta)
    return path


def file_digest(path: Path) -> str:
    """SHA-256 of a file, for the record of which global model was personalised."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    """The medsilo metadata of a safetensors file (``{}`` when it has none); :class:`DataError` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("medsilo", "{}"))
    except Exception as exc:  # safetensors raises its own errors, OS and JSON errors
        raise DataError(f"--checkpoint {checkpoint} is not a valid medsilo safetensors file ({exc}); pass the "
                        "coordinator's model-best.safetensors") from None
    return meta if isinstance(meta, dict) else {}


def site_personalise(
    *, kit: str | Path, data: str, labels: str | None, checkpoint: str | Path, epsilon: float, delta: float | None,
    epochs: int, lr: float | None, dataset: str | None, model: str | None, out: str | Path,
) -> tuple[Path, dict[str, Any]]:
    """``medsilo site personalise``: fine-tune the coordinator's model at a deployed node; nothing leaves the site.

    The data source and its ledger are the ones ``medsilo client start --kit KIT --data DATA`` uses; the recipe
    is the dataset's (as the federation resolved it), with :func:`personalisation_config` on top. Every input
    problem is reported at once, before any record is read; a refusal raises :class:`DataError` with its reason.

    Returns
    -------
    tuple
        The model file and the record written beside it (``OUT/personalised.json``).

    """
    from client.data import load_site_data
    from client.dp.ledger import data_source
    from client.dp.rng import os_entropy
    from client.node import load_kit
    from client.policy import site_policy
    from common import recipes
    from common.datasets import dataset_info
    from common.errors import Problems
    from common.features import CACHE_FOLDER
    from common.io import atomic_write_json, private_dir

    problems = Problems()
    url = data.startswith(("http://", "https://"))
    problems.check(url or Path(data).exists(),
                   f"--data {data}: no such file or folder; give the site's data as `medsilo client start` does")
    problems.check(labels is None or Path(labels).is_file(), f"--labels {labels}: no such file")
    checkpoint, out = Path(checkpoint), Path(out)
    meta: dict[str, Any] = {}
    if checkpoint.suffix != ".safetensors" or not checkpoint.is_file():
        problems.add(f"--checkpoint {checkpoint}: expected an existing .safetensors file (the coordinator's "
                     "model-best.safetensors)")
    else:
        try:
            meta = _checkpoint_meta(checkpoint)
        except DataError as exc:
            problems.add(str(exc))
    problems.check(epsilon > 0, f"--epsilon {epsilon}: expected ε > 0, e.g. 2")
    problems.check(epochs >= 1, f"--epochs {epochs}: expected at least 1, e.g. {DEFAULT_EPOCHS}")
    problems.check(lr is None or lr > 0, f"--lr {lr}: expected a learning rate > 0")
    problems.check(not out.is_file(), f"--out {out} is a file; give a folder for the personalised model")
    site_kit = None
    try:
        site_kit = load_kit(kit, insecure=True)  # no connection is made: the node key is not needed
    except ConfigError as exc:
        for item in exc.problems:
            problems.add(item)
    task = dataset or meta.get("dataset")
    problems.check(isinstance(task, str), f"--checkpoint {checkpoint} names no dataset: pass --dataset")
    problems.raise_if_any()
    assert site_kit is not None and isinstance(task, str)
    node_config: dict[str, Any] = {
        "site-name": site_kit.site, "data-path": data if url else str(Path(data).absolute()),
        "policy-path": str(site_kit.policy_path.absolute()), "state-dir": str(site_kit.state.absolute()),
        **({"labels-path": str(Path(labels).absolute())} if labels else {}),
    }
    policy = site_policy(node_config, {})
    delta = delta if delta is not None else (policy.delta if policy else RunConfig.delta)
    flower: dict[str, Any] = {RunConfig.key(n): recipes.AUTO for n in recipes.RECIPE_FIELDS}
    flower.update({"dataset": task, "model": str(model or meta.get("model") or recipes.AUTO), "dp": True,
                   "epsilon": float(epsilon), "delta": float(delta)})
    config = personalisation_config(recipes.from_flower(flower), epsilon=epsilon, epochs=epochs, lr=lr)
    if config.problems():
        raise ConfigError(config.problems())
    info = dataset_info(config.dataset, resolution=config.resolution)
    net, _ = load_global_model(checkpoint, config, info)  # checked before any record is read
    ledger = Ledger(site_kit.state, data_source(node_config, {}))
    site_data = load_site_data(node_config, config)
    try:
        result = personalise(net, site_data, config, ledger=ledger, policy=policy, randomness=os_entropy(),
                             features=FeatureCache(site_kit.state / CACHE_FOLDER))
    except Refused as refusal:
        raise DataError(f"personalisation refused: {refusal}") from None
    threshold = meta.get("threshold", 0.5)
    record: dict[str, Any] = {
        "dataset": info.name, "task": info.task.value, "labels": list(info.labels),
        "model": resolve_model_name(config.model, info),
        "threshold": float(threshold) if isinstance(threshold, (int, float)) and 0 <= threshold <= 1 else 0.5,
        "dp": True, "global_model_sha256": file_digest(checkpoint), "global_round": meta.get("round"),
        "data_source": ledger.source.key, "epochs": config.local_epochs, "lr": config.dp_lr,
        "accountant": config.accountant, "personalised": result.record(),
    }
    if isinstance(meta.get("decision"), dict):
        record["decision"] = meta["decision"]
    private_dir(out)
    path = save_personalised(out, net, record)
    atomic_write_json(out / "personalised.json", record)
    return path, record
