"""One hospital's training and validation: local DP-SGD and aggregate validation on the site's own records.

What leaves the site per round: the model update (local weights after DP-SGD minus the round's
global weights; masked by SecAgg+ when secure aggregation is on, so the coordinator only sees the
sum), under SCAFFOLD the site's control variate beside it (the mean of the round's DP-SGD gradients, masked
with the update), the number of training records, the site's ε/δ for the run and over its lifetime on the dataset,
aggregate validation metrics (AUC, accuracy and a histogram of validation scores per class), and refusal
reasons. No image, label or per-record value.

This module imports torch and Opacus; :mod:`client.app` imports it only when a message needs training
or evaluation, so the SecAgg+ key-exchange stages start in a fraction of a second.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.client import NumPyClient

from client.control_store import STORE_FOLDER, ControlStore
from client.data import SiteData, load_site_data, site_name
from client.dp.ledger import Ledger
from client.policy import site_policy, state_dir
from client.trainer import DriftCorrection, plan_privacy, train_dp, train_plain
from client.dp import accounting as privacy
from common import control_variates, secure_aggregation
from common.audit import digest
from common.config import RunConfig
from common.datasets import Task, dataset_info
from common.errors import DataError
from common.features import CACHE_FOLDER, FeatureCache
from common.metrics import classification_metrics, score_histogram
from common.models import build_model, resolve_model_name
from common.segmentation_metrics import summarize, volume_metrics
from common.site_policy import violations
from common.training import (
    device,
    ndarrays_to_state,
    on_fixed_features,
    predict_labels,
    predict_proba,
    state_to_ndarrays,
    tensor_dataset,
    training_dataset,
)

log = logging.getLogger(__name__)

#: Where a site keeps its SCAFFOLD control variate ``c_i`` between rounds (``context.state``, per run).
CONTROL_RECORD = "medsilo.control-variate"


class SiteClient(NumPyClient):
    """One hospital's training and validation; its privacy spending lives in a durable :class:`Ledger`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = RunConfig.from_flower(context.run_config)
        self._data: SiteData | None = None
        self.policy = site_policy(context.node_config, context.run_config)
        folder = state_dir(context.node_config, context.run_config)
        if folder is None:
            raise DataError("this node has no state folder for its privacy ledger: start it with "
                            "--node-config 'state-dir=\"/path\"' (medsilo client start does)")
        self.ledger = Ledger(folder, self.config.dataset)
        #: Fixed features of this site's records (scattering models), kept between rounds and runs.
        self.features = FeatureCache(folder / CACHE_FOLDER)
        #: SCAFFOLD's ``c_i`` of this site, kept between rounds for a node that restarts.
        self.controls = ControlStore(folder / STORE_FOLDER, self.config.dataset)
        #: The run's key in the ledger: the coordinator's ``run-key`` (kept when it resumes a run), else this run.
        self.run_key = int(context.run_id)
        #: The federation's control variate ``c`` received with this training request (SCAFFOLD runs only).
        self._control: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def data(self) -> SiteData:
        if self._data is None:
            self._data = load_site_data(self.context.node_config, self.config)
        return self._data

    def _model(self, parameters: list[np.ndarray]) -> torch.nn.Module:
        model = build_model(self.config.model, self.data.info)
        ndarrays_to_state(model, parameters)
        return model.to(device())

    @property
    def _delta(self) -> float:
        """δ at which the lifetime ε is stated: the policy's, else the run's."""
        return self.policy.delta if self.policy else self.config.delta

    def _spent(self) -> tuple[float, float]:
        """(ε of this run, lifetime ε on this dataset) from the ledger."""
        cfg = self.config
        return (self.ledger.spent(delta=cfg.delta, accountant=cfg.accountant, run=self.run_key),
                self.ledger.spent(delta=self._delta, accountant=cfg.accountant))

    def _violations(self, parameters: list[np.ndarray], *, secure: bool, training: bool) -> str | None:
        """The site policy's refusal reason for this request (every broken rule), or ``None``."""
        if self.policy is None:
            return None
        cfg = self.config
        broken = violations(self.policy, cfg, model_name=resolve_model_name(cfg.model, dataset_info(cfg.dataset)),
                            parameters=parameters, secure=secure, training=training)
        return "site policy: " + "; ".join(broken) if broken else None

    def _refuse(self, parameters: list[np.ndarray], metrics: dict[str, Any], reason: str,
                server_round: int) -> tuple[list[np.ndarray], int, dict]:
        log.warning("%s: refusing round %d: %s", metrics["site"], server_round, reason)
        run_eps, life_eps = self._spent() if self.config.dp else (0.0, 0.0)
        metrics.update(refused=1, reason=reason, epsilon=run_eps, epsilon_lifetime=life_eps, steps=0,
                       train_loss=float("nan"))
        return [np.zeros_like(p) for p in parameters + (self._control or [])], 0, metrics

    # ------------------------------------------------------------------ Flower API
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Train locally and return the update (local minus global weights).

        Before touching the training data: check the request against the site policy, and under DP
        against the run's and the site's lifetime budget; then durably reserve the round in the ledger.
        Every refusal returns a zero update of weight 0 with its reason. Under secure aggregation, a site
        larger than the range the federation's SecAgg+ quantization was sized for refuses too.
        With ``scaffold``, ``parameters`` ends with the federation's control variate and the reply with the
        site's new one (:mod:`common.control_variates`).
        """
        cfg = self.config
        if cfg.scaffold:
            parameters, self._control = control_variates.split(
                parameters, model_arrays=len(build_model(cfg.model, dataset_info(cfg.dataset)).state_dict()))
        server_round = int(config.get("server-round", 1))
        secure = bool(int(config.get("secure-aggregation", 0)))
        self.run_key = int(config.get("run-key", self.context.run_id))
        metrics: dict[str, Any] = {"site": site_name(self.context.node_config), "refused": 0, "dp": int(cfg.dp)}
        broken = self._violations(parameters, secure=secure, training=True)
        if broken:
            return self._refuse(parameters, metrics, broken, server_round)
        data = self.data
        seed = cfg.seed * 100_003 + server_round * 1_009 + int(self.context.node_config.get("partition-id", 0))
        if int(config.get("evaluate-first", 0)):
            # Validate the model just received (the previous round's aggregate) in the same exchange, so a round
            # moves the model once in each direction instead of sending it again for a separate evaluation.
            val_loss, val_n, val = self.evaluate(parameters, {})
            metrics.update({f"val-{k}": v for k, v in val.items() if k != "site"}, **{"val-n": val_n,
                                                                                      "val-loss": val_loss})
        if secure:
            problem = secure_aggregation.site_fits(num_records=len(data.train), max_site_records=cfg.max_site_records)
            if problem:
                return self._refuse(parameters, metrics, problem, server_round)
        model = self._model(parameters)
        global_params = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
        train_set = training_dataset(data.train, data.info, resolve_model_name(cfg.model, data.info), seed=seed)
        drift = self._drift(model, server_round)
        if not cfg.dp:
            result = train_plain(
                model, train_set, data.info.task, cfg, seed=seed, server_round=server_round,
                global_params=global_params, features=self.features, drift=drift,
            )
            metrics.update(train_loss=result.train_loss, steps=result.steps, epsilon=0.0, epsilon_lifetime=0.0)
            update = self._reply(model, parameters, drift, secure=secure, server_round=server_round)
            return update, len(train_set), metrics
        return self._fit_dp(model, parameters, train_set, metrics, secure=secure, seed=seed,
                            server_round=server_round, global_params=global_params, drift=drift)

    # ------------------------------------------------------------------ SCAFFOLD
    def _drift(self, model: torch.nn.Module, server_round: int) -> DriftCorrection | None:
        """The round's correction ``c - c_i`` per trainable parameter (``None`` unless ``scaffold``).

        ``c_i`` is kept in ``context.state``; a site whose node lost it (restarted, or the run resumed) reads it
        from its :class:`ControlStore`. A site without ``c_i`` (its first round) steps uncorrected, as SCAFFOLD's
        ``c_i = c`` start does, and reports the mean gradient it saw.
        """
        if self._control is None:
            return None
        federation = control_variates.decode(self._control, config=self.config)
        own = self.context.state.array_records.get(CONTROL_RECORD)
        site = (own.to_numpy_ndarrays() if own is not None
                else self.controls.load(self.run_key, before_round=server_round) or federation)
        if [a.shape for a in site] != [c.shape for c in federation]:
            site = federation
        correction = {
            p: torch.from_numpy(c - ci)
            for p, c, ci in zip(_state_parameters(model), federation, site, strict=True) if p is not None
        }
        return DriftCorrection(correction)

    def _reply(self, model: torch.nn.Module, parameters: list[np.ndarray], drift: DriftCorrection | None,
               *, secure: bool, server_round: int) -> list[np.ndarray]:
        """The update, followed under SCAFFOLD by the site's new ``c_i`` (kept in ``context.state`` and on disk)."""
        update = _update(model, parameters, secure=secure)
        if drift is None:
            return update
        means = drift.mean_gradients()
        mine = [
            means[p].detach().cpu().numpy() if p is not None and p in means else np.zeros(v.shape, dtype=np.float32)
            for p, v in zip(_state_parameters(model), model.state_dict().values(), strict=True)
        ]
        wire = control_variates.encode(mine, config=self.config, dtype=np.float64 if secure else np.float32)
        kept = control_variates.decode(wire, config=self.config)  # what the coordinator averages
        self.controls.save(self.run_key, server_round, kept)
        self.context.state.array_records[CONTROL_RECORD] = ArrayRecord(kept)
        return update + wire

    def _fit_dp(self, model: torch.nn.Module, parameters: list[np.ndarray], train_set: Any, metrics: dict[str, Any],
                *, secure: bool, seed: int, server_round: int, global_params: list[torch.Tensor] | None,
                drift: DriftCorrection | None) -> tuple[list[np.ndarray], int, dict]:
        cfg, run = self.config, self.run_key
        state = self.ledger.round_state(run, server_round)
        model_digest = digest(*[np.ascontiguousarray(p).tobytes() for p in parameters])
        pending = (run, server_round) if state == "reserved" else None
        plan = self.ledger.plan(run)
        if plan is None:
            plan = plan_privacy(cfg, len(train_set))
            self.ledger.record_plan(run, plan)
        metrics.update(
            delta=cfg.delta, accountant=cfg.accountant, sampling="poisson", noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate, max_grad_norm=cfg.max_grad_norm,
            delta_lifetime=self._delta, privacy_unit=privacy_unit(self.data.info.task),
        )
        if state == "completed":
            kept = self.ledger.replay(run, server_round, model_digest)
            if kept is not None:  # the coordinator restarted: send the same update again, no new privacy cost
                log.info("%s: round %d of run %d already trained on this model; replaying its update",
                         metrics["site"], server_round, run)
                update, n, kept_metrics = kept
                metrics.update(kept_metrics)
                return _update_dtype(update, secure=secure), n, metrics
        if self.policy is not None and plan.noise_multiplier < self.policy.min_noise_multiplier:
            return self._refuse(parameters, metrics, (
                f"site policy: noise multiplier {plan.noise_multiplier:.3f} for this run is below "
                f"min-noise-multiplier={self.policy.min_noise_multiplier} (ask for a smaller ε or fewer rounds)"
            ), server_round)
        entry = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        history = self.ledger.history(run, pending=pending)
        exceed, projected = privacy.would_exceed(
            history=history, next_entry=entry, epsilon=cfg.epsilon, delta=cfg.delta, accountant=cfg.accountant,
        )
        if exceed:
            spent = self.ledger.spent(delta=cfg.delta, accountant=cfg.accountant, run=run)
            return self._refuse(parameters, metrics, (
                f"round {server_round} would raise this run's ε from {spent:.3f} to {projected:.3f}, above its "
                f"budget ε={cfg.epsilon} (δ={cfg.delta})"
            ), server_round)
        lifetime_projected = privacy.epsilon_spent(
            history=privacy.merge_history(self.ledger.history(pending=pending), entry), delta=self._delta,
            accountant=cfg.accountant,
        )
        if self.policy is not None and lifetime_projected > self.policy.epsilon_lifetime:
            return self._refuse(parameters, metrics, (
                f"round {server_round} would raise this site's lifetime ε on {cfg.dataset} to "
                f"{lifetime_projected:.3f}, above the policy's epsilon-lifetime={self.policy.epsilon_lifetime} "
                f"(δ={self._delta}); the budget is spent"
            ), server_round)
        # Durably count the round as spent before the data is touched: a crash from here on over-states ε.
        # An open reservation of this round (the node died while training it) already counts it.
        if pending is None:
            self.ledger.reserve(run, server_round, entry)
        result = train_dp(
            model, train_set, self.data.info.task, cfg, plan, history, seed=seed, server_round=server_round,
            global_params=global_params, projected_epsilon=projected, features=self.features, drift=drift,
        )
        run_eps, life_eps = projected, lifetime_projected
        update = self._reply(model, parameters, drift, secure=secure, server_round=server_round)
        produced = dict(train_loss=result.train_loss, steps=result.steps, epsilon=run_eps, epsilon_lifetime=life_eps)
        self.ledger.keep_for_replay(run, server_round, model_digest, update, len(train_set), produced)
        self.ledger.complete(run, server_round, steps=result.steps, epsilon_run=run_eps, epsilon_lifetime=life_eps)
        metrics.update(produced)
        return update, len(train_set), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        """Validate the global model on the site's validation split; share only aggregates."""
        broken = self._violations(parameters, secure=False, training=False)
        if broken:
            log.warning("refusing validation: %s", broken)
            return 0.0, 0, {"site": site_name(self.context.node_config), "refused": 1, "reason": broken}
        data = self.data
        if len(data.val) == 0:
            return 0.0, 0, {"site": data.name}
        model = self._model(parameters)
        val = tensor_dataset(data.val, data.info)
        if data.info.task is Task.SEGMENTATION:
            return 0.0, len(data.val), _segmentation_report(data, predict_labels(model, val.tensors[0]))
        net, scored = on_fixed_features(model, val, augmented=False, cache=self.features)
        probs = predict_proba(net, scored.tensors[0], data.info.task)
        labels = data.val.labels
        m = classification_metrics(labels, probs, task=data.info.task)
        loss = float(torch.nn.functional.binary_cross_entropy(
            torch.as_tensor(probs).clamp(1e-7, 1 - 1e-7), torch.as_tensor(labels, dtype=torch.float64)
        )) if data.info.task is Task.BINARY else float("nan")
        out: dict[str, Any] = {"site": data.name}
        out.update({k: (0.0 if not np.isfinite(v) else v) for k, v in m.items() if k != "n"})
        out["auc_defined"] = int(np.isfinite(m["auc"]))
        if data.info.task is Task.BINARY:
            hist = score_histogram(labels, probs)
            out["hist"] = ",".join(str(int(v)) for v in hist.ravel())
        return loss if np.isfinite(loss) else 0.0, len(data.val), out


def _state_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter | None]:
    """The parameter behind each ``state_dict`` entry, in ``state_dict`` order (``None`` for buffers)."""
    params = dict(model.named_parameters())
    return [params.get(name) for name in model.state_dict()]


def _update_dtype(update: list[np.ndarray], *, secure: bool) -> list[np.ndarray]:
    return [np.asarray(u, dtype=np.float64) for u in update] if secure else update


def privacy_unit(task: Task) -> str:
    """What one DP-SGD record is: a patient's volume (segmentation) or one image/volume record."""
    return "patient" if task is Task.SEGMENTATION else "record"


def _segmentation_report(data: SiteData, predictions: np.ndarray) -> dict[str, Any]:
    """Mean Dice and HD95 per class over the site's validation volumes: aggregates only."""
    labels = np.asarray(data.val.labels)
    per_volume = [volume_metrics(labels[i], predictions[i], data.info.num_outputs) for i in range(len(labels))]
    summary = summarize(per_volume, data.info.labels)
    out: dict[str, Any] = {"site": data.name}
    for key in ("dice", "hd95"):
        for label, value in summary[key].items():
            out[f"{key}-{label}"] = float(value) if np.isfinite(value) else 0.0
    defined = bool(np.isfinite(summary["dice_mean"]))
    out["dice_mean"] = float(summary["dice_mean"]) if defined else 0.0
    out["dice_defined"] = int(defined)
    return out


def _update(model: torch.nn.Module, global_weights: list[np.ndarray], *, secure: bool) -> list[np.ndarray]:
    """Local weights minus the round's global weights: the only model data a site sends.

    Under SecAgg+ the update is handed to the quantizer in float64 (it never leaves the site in that
    form): with a 2**24-level quantization float32 would lose up to a step to rounding.
    """
    dtype = np.float64 if secure else None
    return [
        np.asarray(local, dtype=dtype) - np.asarray(glob, dtype=dtype)
        for local, glob in zip(state_to_ndarrays(model), global_weights, strict=True)
    ]
