"""One hospital's training and validation: local DP-SGD and aggregate validation on the site's own records.

What leaves the site per round: the model update (local weights after DP-SGD minus the round's
global weights; masked by SecAgg+ when secure aggregation is on, so the coordinator only sees the
sum), the number of training records, the site's ε/δ so far, and aggregate validation metrics (AUC,
accuracy and a histogram of validation scores per class). No image, label or per-record value.

This module imports torch and Opacus; :mod:`client.app` imports it only when a message needs training
or evaluation, so the SecAgg+ key-exchange stages start in a fraction of a second.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import NumPyClient

from client.data import SiteData, load_site_data
from client.trainer import PrivacyPlan, plan_privacy, train_dp, train_plain
from common import privacy, secure_aggregation
from common.config import RunConfig
from common.datasets import Task
from common.metrics import classification_metrics, score_histogram
from common.models import build_model
from common.training import (
    device,
    ndarrays_to_state,
    predict_proba,
    state_to_ndarrays,
    tensor_dataset,
)

log = logging.getLogger(__name__)

PRIVACY_STATE = "medsilo.privacy"


class SiteClient(NumPyClient):
    """One hospital's training and validation, with the privacy state kept in ``context.state``."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = RunConfig.from_flower(context.run_config)
        self._data: SiteData | None = None

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

    def _load_privacy(self) -> tuple[PrivacyPlan | None, list[privacy.HistoryEntry], float]:
        """The site's privacy plan, accountant history and ε spent so far (``None, [], 0`` at first)."""
        record = self.context.state.get(PRIVACY_STATE)
        if record is None:
            return None, [], 0.0
        rec: Any = record
        plan = PrivacyPlan(
            noise_multiplier=float(rec["noise-multiplier"]),
            sample_rate=float(rec["sample-rate"]),
            steps_per_round=int(rec["steps-per-round"]),
            planned_steps=int(rec["planned-steps"]),
        )
        history = [
            (float(s), float(q), int(t))
            for s, q, t in zip(rec["history-sigma"], rec["history-rate"], rec["history-steps"], strict=True)
        ]
        return plan, history, float(rec["epsilon"])

    def _save_privacy(self, plan: PrivacyPlan, history: list[privacy.HistoryEntry], epsilon: float) -> None:
        self.context.state[PRIVACY_STATE] = ConfigRecord(
            {
                "noise-multiplier": plan.noise_multiplier,
                "sample-rate": plan.sample_rate,
                "steps-per-round": plan.steps_per_round,
                "planned-steps": plan.planned_steps,
                "history-sigma": [h[0] for h in history],
                "history-rate": [h[1] for h in history],
                "history-steps": [h[2] for h in history],
                "epsilon": epsilon,
            }
        )

    # ------------------------------------------------------------------ Flower API
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Train locally and return the update (local minus global weights).

        Under DP, refuse (a zero update of weight 0, with a reason) a round that would break the budget.
        Under secure aggregation, refuse when the site is larger than the range the federation's SecAgg+
        quantization was sized for (its values would saturate).
        """
        cfg = self.config
        data = self.data
        server_round = int(config.get("server-round", 1))
        seed = cfg.seed * 100_003 + server_round * 1_009 + int(self.context.node_config.get("partition-id", 0))
        metrics: dict[str, Any] = {"site": data.name, "refused": 0, "dp": int(cfg.dp)}
        if int(config.get("evaluate-first", 0)):
            # Validate the model just received (the previous round's aggregate) in the same exchange, so a round
            # moves the model once in each direction instead of sending it again for a separate evaluation.
            val_loss, val_n, val = self.evaluate(parameters, {})
            metrics.update({f"val-{k}": v for k, v in val.items() if k != "site"}, **{"val-n": val_n,
                                                                                      "val-loss": val_loss})
        secure = bool(int(config.get("secure-aggregation", 0)))
        policy = policy_refusal(self.context.node_config, cfg)
        if policy:
            log.warning("%s: refusing round %d: %s", data.name, server_round, policy)
            metrics.update(refused=1, reason=policy, epsilon=self._load_privacy()[2], steps=0, train_loss=float("nan"))
            return [np.zeros_like(p) for p in parameters], 0, metrics
        if secure:
            problem = secure_aggregation.site_fits(num_records=len(data.train), max_site_records=cfg.max_site_records)
            if problem:
                log.warning("%s: refusing round %d: %s", data.name, server_round, problem)
                metrics.update(refused=1, reason=problem, epsilon=self._load_privacy()[2], steps=0,
                               train_loss=float("nan"))
                return [np.zeros_like(p) for p in parameters], 0, metrics
        model = self._model(parameters)
        global_params = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
        train_set = tensor_dataset(data.train, data.info)
        if not cfg.dp:
            result = train_plain(
                model, train_set, data.info.task, cfg, seed=seed, server_round=server_round, global_params=global_params
            )
            metrics.update(train_loss=result.train_loss, steps=result.steps, epsilon=0.0)
            return _update(model, parameters, secure=secure), len(train_set), metrics

        plan, history, spent = self._load_privacy()
        if plan is None:
            plan = plan_privacy(cfg, len(train_set))
        next_entry = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        exceed, projected = privacy.would_exceed(
            history=history, next_entry=next_entry, epsilon=cfg.epsilon, delta=cfg.delta,
            accountant=cfg.accountant,
        )
        metrics.update(
            delta=cfg.delta, accountant=cfg.accountant, sampling="poisson",
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
            max_grad_norm=cfg.max_grad_norm,
        )
        if exceed:
            reason = (
                f"round {server_round} would raise ε from {spent:.3f} to {projected:.3f}, "
                f"above this site's budget ε={cfg.epsilon} (δ={cfg.delta}); refusing to train"
            )
            log.warning("%s: %s", data.name, reason)
            metrics.update(refused=1, reason=reason, epsilon=spent, steps=0, train_loss=float("nan"))
            return [np.zeros_like(p) for p in parameters], 0, metrics
        result = train_dp(
            model, train_set, data.info.task, cfg, plan, history, seed=seed, server_round=server_round,
            global_params=global_params, projected_epsilon=projected,
        )
        self._save_privacy(plan, result.history, result.epsilon)
        metrics.update(train_loss=result.train_loss, steps=result.steps, epsilon=result.epsilon)
        return _update(model, parameters, secure=secure), len(train_set), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        """Validate the global model on the site's validation split; share only aggregates."""
        data = self.data
        if len(data.val) == 0:
            return 0.0, 0, {"site": data.name}
        model = self._model(parameters)
        val = tensor_dataset(data.val, data.info)
        x = val.tensors[0]
        probs = predict_proba(model, x, data.info.task)
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


def policy_refusal(node_config: Any, config: RunConfig) -> str | None:
    """Why the site's own policy (node config from ``medsilo client start``) forbids this run, or ``None``."""
    def flag(key: str) -> bool:
        return str(node_config.get(key, "false")).lower() in ("1", "true", "yes")

    if flag("require-dp") and not config.dp:
        return "this site's policy requires record-level DP (require-dp=true) but the run has dp=false"
    budget = node_config.get("epsilon-budget")
    if config.dp and budget is not None and config.epsilon > float(budget):
        return (f"the run asks each site for ε={config.epsilon} but this site's policy allows at most "
                f"ε={float(budget)}; relaunch with -c 'epsilon={float(budget)}' or less")
    delta = node_config.get("delta-budget")
    if config.dp and delta is not None and config.delta > float(delta):
        return f"the run asks for δ={config.delta} but this site's policy allows at most δ={float(delta)}"
    return None


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
