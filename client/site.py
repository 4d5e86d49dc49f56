"""One hospital's training and validation requests, answered on its own records.

What leaves the site is exactly what :mod:`common.wire` allows: the model update (local weights after DP-SGD
minus the round's global weights; masked by SecAgg+ when secure aggregation is on), under SCAFFOLD the site's
control variate beside it (masked with the update), the DP estimate of the site's record count as the FedAvg
weight, the validation statistic released by a Gaussian mechanism, the site's ε, and refusal reasons. Every DP
decision (plan, budget, charge, randomness) is made in :mod:`client.dp`; this module composes them.

This module imports torch; :mod:`client.app` imports it only when a message needs training or evaluation, so
the SecAgg+ key-exchange stages start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.client import NumPyClient

from client.control_store import STORE_FOLDER, ControlStore
from client.data import SiteData, load_site_data, site_name
from client.dp import release
from client.dp.accounting import PrivacyPlan
from client.dp.budget import DP_SGD, VALIDATION, Limits, Refused, SiteBudget
from client.dp.ledger import Charge, Ledger, LedgerError, data_source
from client.dp.rng import Randomness, os_entropy
from client.policy import site_policy, state_dir
from client.secagg_guard import cohort_of, unmasked_marker
from client.trainer import DriftCorrection, fine_tune, train_plain
from common import control_variates, recipes, secure_aggregation
from common.audit import digest
from common.datasets import Task, dataset_info
from common.errors import DataError
from common.features import CACHE_FOLDER, FeatureCache
from common.models import build_model, resolve_model_name
from common.segmentation_metrics import volume_metrics
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
from common.wire import SiteReport, ValidationLayout, encode_values

log = logging.getLogger(__name__)

#: What the coordinator is told when the site's ledger cannot be read, locked or understood (the node logs why).
LEDGER_UNUSABLE = ("this site's privacy ledger cannot be used (unreadable, locked by another process, or written by "
                   "a newer medsilo); the site refuses every request until its operator fixes it (see the node's log)")

#: What the coordinator is told when a request failed at the site (the node logs the exception and its traceback).
REQUEST_FAILED = ("this site could not process the request (its data or settings do not fit the run); the "
                  "hospital's operator finds the reason in the node's log")

#: What the coordinator is told about weights no training could have produced (the check needs no data).
IMPLAUSIBLE_WEIGHTS = ("the model received has non-finite weights or weights above {bound:g} in magnitude; this site "
                       "trains and scores only models whose weights are finite and bounded")

#: What the coordinator is told when local training diverged: constant, so that it says nothing of which records did.
DIVERGED = ("local training produced non-finite values; nothing was sent and the round stays charged (lower the "
            "learning rate or the clipping bound)")

#: The largest weight magnitude a site accepts from the coordinator: far above what training produces, and low enough
#: that no layer of medsilo's models (GroupNorm between convolutions) overflows float32 on the site's records.
MAX_RECEIVED_WEIGHT = 1e4

#: Where a site keeps its SCAFFOLD control variate ``c_i`` between rounds (``context.state``, per run).
CONTROL_RECORD = "medsilo.control-variate"



class SiteClient(NumPyClient):
    """One hospital's training and validation; its privacy decisions are :class:`client.dp.budget.SiteBudget`'s.

    ``randomness`` is where the DP mechanisms draw from: the operating system's entropy unless a simulation
    composes a reproducible research client (:mod:`simulations.reproducible`).
    """

    def __init__(self, context: Context, randomness: Randomness | None = None) -> None:
        self.context = context
        self.config = recipes.from_flower(context.run_config)
        self.randomness = randomness or os_entropy()
        self._data: SiteData | None = None
        self.policy = site_policy(context.node_config, context.run_config)
        folder = state_dir(context.node_config, context.run_config)
        if folder is None:
            raise DataError("this node has no state folder for its privacy ledger: start it with "
                            "--node-config 'state-dir=\"/path\"' (medsilo client start does)")
        self.state_folder = folder
        self.ledger = Ledger(folder, data_source(context.node_config, context.run_config))
        delta = self.policy.delta if self.policy else self.config.delta
        self.budget = SiteBudget(self.ledger, Limits(
            lifetime_epsilon=self.policy.epsilon_lifetime if self.policy else None, lifetime_delta=delta,
            min_noise_multiplier=self.policy.min_noise_multiplier if self.policy else 0.0,
        ), self.randomness, self.config)
        #: Fixed features of this site's records (scattering models), kept between rounds and runs.
        self.features = FeatureCache(folder / CACHE_FOLDER)
        #: SCAFFOLD's ``c_i`` of this site, kept between rounds for a node that restarts.
        self.controls = ControlStore(folder / STORE_FOLDER, self.config.dataset)
        #: The run's key in the ledger: the coordinator's ``run-key`` (bound to this Flower run), else this run.
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
        fine_tune(model, self.config)  # what the run's fine-tune setting does not train is frozen (DP covers the rest)
        return model.to(device())

    def _report(self) -> SiteReport:
        cfg = self.config
        report = SiteReport(site=site_name(self.context.node_config), dp=cfg.dp, randomness=self.randomness.mode)
        if not cfg.dp:
            return report
        return dataclasses.replace(
            report, epsilon_budget=cfg.epsilon, delta=cfg.delta, delta_lifetime=self.budget.limits.lifetime_delta,
            accountant=cfg.accountant, max_grad_norm=cfg.max_grad_norm,
        )

    def _with_plan(self, report: SiteReport, run: int) -> SiteReport:
        """``report`` with the run's ε so far and the plan's (DP-derived) σ and q, when there is a plan."""
        plan = self.ledger.plan(run)
        run_eps, life_eps = self.budget.spent(run, plan)
        if plan is None:
            return dataclasses.replace(report, epsilon=run_eps, epsilon_lifetime=life_eps)
        return dataclasses.replace(report, epsilon=run_eps, epsilon_lifetime=life_eps,
                                   noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                   privacy_unit=privacy_unit(self.data))

    def _release_digest(self, parameters: list[np.ndarray]) -> str:
        """What a kept update is replayed for: the same model, and under SecAgg+ the same cohort of sites.

        An update replayed into another cohort would let the coordinator difference two sums (the sites of one
        minus those of the other); a different cohort is a new release, trained afresh and charged.
        """
        cohort = cohort_of(self.context.state)
        if not cohort:
            return _digest(parameters)
        return digest(_digest(parameters).encode(), ",".join(map(str, cohort)).encode())

    def _violations(self, parameters: list[np.ndarray], *, secure: bool, training: bool) -> str | None:
        """The site policy's refusal reason for this request (every broken rule), or ``None``."""
        if self.policy is None:
            return None
        cfg = self.config
        broken = violations(self.policy, cfg, model_name=resolve_model_name(cfg.model, dataset_info(cfg.dataset)),
                            parameters=parameters, secure=secure, training=training)
        return "site policy: " + "; ".join(broken) if broken else None

    def _refuse(self, parameters: list[np.ndarray], report: SiteReport, reason: str,
                server_round: int) -> tuple[list[np.ndarray], int, dict]:
        log.warning("%s: refusing round %d: %s", report.site, server_round, reason)
        if self.config.dp:
            with contextlib.suppress(LedgerError):  # when it is, the reason already says so
                report = self._with_plan(report, self.run_key)
        report = dataclasses.replace(report, refused=True, reason=reason, steps=0)
        return [np.zeros_like(p) for p in parameters + (self._control or [])], 0, report.to_metrics()

    # ------------------------------------------------------------------ Flower API
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """:meth:`_fit`, refused (not failed) when the ledger cannot be used: nothing is trained or written."""
        server_round = int(config.get("server-round", 1))
        try:
            return self._fit(parameters, config)
        except LedgerError as exc:
            log.error("%s", exc)  # the node's operator sees the file and the fix; the coordinator only the refusal
            return self._refuse(parameters, self._report(), LEDGER_UNUSABLE, server_round)
        except Exception:
            # An exception's text can carry what the data looked like (a count in a shape, a label in a manifest
            # line): the node logs it, the coordinator gets a constant reason.
            log.exception("%s: round %d failed", site_name(self.context.node_config), server_round)
            return self._refuse(parameters, self._report(), REQUEST_FAILED, server_round)

    def _fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Train locally and return the update (local minus global weights).

        Before touching the training data: check the request against the site policy, bind the coordinator's
        run key to this Flower run, and under DP charge the round to the run's and the data source's lifetime
        budget (an atomic reservation in the ledger). Every refusal returns a zero update of weight 0 with its
        reason. With ``validate-round`` set, the model received (that round's aggregate) is first validated
        and its DP statistic rides with the reply. With ``scaffold``, ``parameters`` ends with the federation's
        control variate and the reply with the site's new one (:mod:`common.control_variates`).
        """
        cfg = self.config
        if cfg.scaffold:
            parameters, self._control = control_variates.split(
                parameters, model_arrays=len(build_model(cfg.model, dataset_info(cfg.dataset)).state_dict()))
        server_round = int(config.get("server-round", 1))
        secure = bool(int(config.get("secure-aggregation", 0)))
        self.run_key = int(config.get("run-key", self.context.run_id))
        report = self._report()
        broken = self._violations(parameters, secure=secure, training=True) or _implausible(parameters)
        if broken:
            return self._refuse(parameters, report, broken, server_round)
        if cfg.dp:
            rotated = self.ledger.bind_run(int(self.context.run_id), self.run_key)
            if rotated:
                return self._refuse(parameters, report, rotated, server_round)
        validate = int(config.get("validate-round", -1))
        if validate >= 0:
            report = self._validation(parameters, report, validated_round=validate)
        try:
            if not cfg.dp:
                return self._fit_plain(parameters, report, secure=secure, server_round=server_round)
            return self._fit_dp(parameters, report, secure=secure, server_round=server_round)
        except Refused as refusal:
            return self._refuse(parameters, report, str(refusal), server_round)

    def _fit_plain(self, parameters: list[np.ndarray], report: SiteReport, *, secure: bool,
                   server_round: int) -> tuple[list[np.ndarray], int, dict]:
        cfg, data = self.config, self.data
        if secure:
            problem = secure_aggregation.site_fits(num_records=len(data.train), max_site_records=cfg.max_site_records)
            if problem:
                raise Refused(problem)
        model = self._model(parameters)
        global_params = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
        seed = self.randomness.seed_int("augment", server_round=server_round)
        train_set = training_dataset(data.train, data.info, resolve_model_name(cfg.model, data.info), seed=seed)
        drift = self._drift(model, server_round)
        result = train_plain(model, train_set, data.info.task, cfg, seed=seed, server_round=server_round,
                             global_params=global_params, features=self.features, drift=drift)
        update = self._reply(model, parameters, drift, secure=secure, server_round=server_round)
        _check_finite(update)
        return update, len(train_set), dataclasses.replace(report, steps=result.steps).to_metrics()

    # ------------------------------------------------------------------ DP-SGD
    def _fit_dp(self, parameters: list[np.ndarray], report: SiteReport, *, secure: bool,
                server_round: int) -> tuple[list[np.ndarray], int, dict]:
        cfg, run, data = self.config, self.run_key, self.data
        plan = self.budget.plan(run, records=privacy_units(data))
        report = dataclasses.replace(report, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                     privacy_unit=privacy_unit(data))
        model_digest = self._release_digest(parameters)
        # Under SecAgg+, a kept update is replayed only if no sum holding it was unmasked: a second sum over fewer
        # sites would otherwise give the coordinator the difference.
        sealed = secure and unmasked_marker(self.state_folder, run=run, server_round=server_round).exists()
        if not sealed and self.ledger.round_state(run, server_round, DP_SGD) == "completed":
            kept = self.ledger.replay(run, server_round, DP_SGD, model_digest)
            if kept is not None:  # the coordinator restarted: the same update again reveals nothing new
                log.info("%s: round %d of run %d already trained on this model; replaying its update",
                         report.site, server_round, run)
                update, n, kept_metrics = kept
                report = dataclasses.replace(report, steps=int(kept_metrics.get("steps", 0)))
                return _update_dtype(update, secure=secure), n, self._with_plan(report, run).to_metrics()
        if secure:
            problem = secure_aggregation.site_fits(num_records=plan.records_estimate,
                                                   max_site_records=cfg.max_site_records, estimated=True)
            if problem:
                raise Refused(problem)
        from client.dp.distributed import site_compute  # Opacus: only for DP rounds

        site_compute(self.context.node_config).backend()  # a bad compute setting fails before the charge
        charge = self.budget.charge_round(run, server_round, plan)  # durably counted before the data is touched
        try:
            return self._train_charged(parameters, report, plan, charge, secure=secure, server_round=server_round)
        except BaseException:
            # The data was touched: whatever happened next, the round is spent, and a retry is charged anew.
            self.ledger.complete(run, server_round, DP_SGD, steps=0, epsilon_run=charge.epsilon_run,
                                 epsilon_lifetime=charge.epsilon_lifetime)
            raise

    def _train_charged(self, parameters: list[np.ndarray], report: SiteReport, plan: PrivacyPlan, charge: Charge, *,
                       secure: bool, server_round: int) -> tuple[list[np.ndarray], int, dict]:
        """The DP-SGD round ``charge`` paid for: train, check, keep for replay, complete, reply."""
        from client.dp.distributed import site_compute
        from client.dp.sgd import train_dp  # Opacus: only for DP rounds

        cfg, run, data = self.config, self.run_key, self.data
        model_digest = self._release_digest(parameters)
        model = self._model(parameters)
        global_params = ([p.detach().clone() for p in model.parameters() if p.requires_grad]  # DP-SGD's params
                         if cfg.proximal_mu > 0 else None)
        train_set = training_dataset(data.train, data.info, resolve_model_name(cfg.model, data.info),
                                     seed=self.randomness.seed_int("patches", server_round=server_round))
        drift = self._drift(model, server_round)
        result = train_dp(model, train_set, data.info.task, cfg, plan, randomness=self.randomness,
                          server_round=server_round, global_params=global_params, features=self.features,
                          drift=drift, patients=data.train_patients, compute=site_compute(self.context.node_config))
        update = self._reply(model, parameters, drift, secure=secure, server_round=server_round)
        _check_finite(update)  # the round stays charged: it trained, but nothing leaves
        n = plan.records_estimate
        self.ledger.keep_for_replay(run, server_round, DP_SGD, model_digest, update, n, {"steps": result.steps})
        self.ledger.complete(run, server_round, DP_SGD, steps=result.steps, epsilon_run=charge.epsilon_run,
                             epsilon_lifetime=charge.epsilon_lifetime)
        report = dataclasses.replace(report, steps=result.steps, epsilon=charge.epsilon_run,
                                     epsilon_lifetime=charge.epsilon_lifetime)
        return update, n, report.to_metrics()

    # ------------------------------------------------------------------ validation
    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        """Validate the global model on the site's validation split; release only the DP statistic."""
        try:
            return self._evaluate(parameters, config)
        except LedgerError as exc:
            log.error("%s", exc)
            return 0.0, 0, dataclasses.replace(self._report(), refused=True, reason=LEDGER_UNUSABLE).to_metrics()
        except Exception:
            log.exception("%s: validation failed", site_name(self.context.node_config))
            return 0.0, 0, dataclasses.replace(self._report(), refused=True, reason=REQUEST_FAILED).to_metrics()

    def _evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        report = self._report()
        broken = self._violations(parameters, secure=False, training=False) or _implausible(parameters)
        if broken:
            log.warning("refusing validation: %s", broken)
            return 0.0, 0, dataclasses.replace(report, refused=True, reason=broken).to_metrics()
        self.run_key = int(config.get("run-key", self.context.run_id))
        if self.config.dp:
            rotated = self.ledger.bind_run(int(self.context.run_id), self.run_key)
            if rotated:
                return 0.0, 0, dataclasses.replace(report, refused=True, reason=rotated).to_metrics()
        validated = int(config.get("validate-round", config.get("server-round", 0)))
        return 0.0, 0, self._validation(parameters, report, validated_round=validated).to_metrics()

    def _validation(self, parameters: list[np.ndarray], report: SiteReport, *, validated_round: int) -> SiteReport:
        """``report`` with the validation statistic of the model ``parameters`` (or why there is none).

        Under DP the release is charged before the model is scored; the same model asked for again in the same
        run gets the statistic released the first time (no new cost).
        """
        data, run = self.data, self.run_key
        if not self.config.dp:
            if len(data.val) == 0:
                return dataclasses.replace(report, validation_refused="this site has no validation records")
            rows = self._validation_rows(parameters)
            return dataclasses.replace(report, validated_round=validated_round,
                                       validation=encode_values(rows.sum(axis=0)))
        if data.train_patients is not None and data.val_patients is None and len(data.val):
            # Per image, a patient's k validation images would move the statistic by k, not the 1 it is charged for.
            return dataclasses.replace(report, validation_refused=(
                "this site trains with the patient as the unit but names no patients for its validation records "
                "(add val_patients to its site file); it releases no validation statistic"))
        model_digest = _digest(parameters)
        try:
            plan = self.budget.plan(run, records=privacy_units(data))
            if self.ledger.round_state(run, validated_round, VALIDATION) == "completed":
                kept = self.ledger.replay(run, validated_round, VALIDATION, model_digest)
                if kept is not None:
                    return dataclasses.replace(report, validated_round=validated_round,
                                               validation=encode_values(kept[0][0]),
                                               validation_noise=plan.validation_noise)
            charge = self.budget.charge_validation(run, validated_round, plan)
        except Refused as refusal:
            log.warning("%s: no validation of round %d: %s", report.site, validated_round, refusal)
            return dataclasses.replace(self._with_plan(report, run), validation_refused=str(refusal))
        try:
            rows = self._validation_rows(parameters)
            released = release.noisy_sum(rows, sigma=plan.validation_noise, rng=self.randomness.numpy_generator(
                "validation", server_round=validated_round))
        except BaseException:
            self.ledger.complete(run, validated_round, VALIDATION, steps=0, epsilon_run=charge.epsilon_run,
                                 epsilon_lifetime=charge.epsilon_lifetime)  # touched: spent, never reused
            raise
        self.ledger.keep_for_replay(run, validated_round, VALIDATION, model_digest, [released], 0, {})
        self.ledger.complete(run, validated_round, VALIDATION, steps=1, epsilon_run=charge.epsilon_run,
                             epsilon_lifetime=charge.epsilon_lifetime)
        return dataclasses.replace(report, validated_round=validated_round, validation=encode_values(released),
                                   validation_noise=plan.validation_noise, epsilon=charge.epsilon_run,
                                   epsilon_lifetime=charge.epsilon_lifetime)

    def _validation_rows(self, parameters: list[np.ndarray]) -> np.ndarray:
        """One row per validation record (L2 norm at most 1), in the dataset's :class:`common.wire.ValidationLayout`.

        A site without validation records has no rows: under DP it still releases (pure) noise, so that whether
        it has any is not revealed.
        """
        data = self.data
        layout = ValidationLayout.for_dataset(data.info)
        if len(data.val) == 0:
            return np.zeros((0, layout.size))
        model = self._model(parameters)
        val = tensor_dataset(data.val, data.info)
        if data.info.task is Task.SEGMENTATION:
            predictions = predict_labels(model, val.tensors[0])
            labels = np.asarray(data.val.labels)
            dice = np.array([volume_metrics(labels[i], predictions[i], data.info.num_outputs)["dice"]
                             for i in range(len(labels))], dtype=np.float64)
            return layout.volume_rows(dice)
        net, scored = on_fixed_features(model, val, augmented=False, cache=self.features)
        rows = layout.rows(np.asarray(data.val.labels), predict_proba(net, scored.tensors[0], data.info.task))
        return per_patient(rows, data.val_patients)  # a patient's images move the statistic by at most 1

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


def privacy_units(data: SiteData) -> int:
    """How many DP units the site trains on: its patients where it knows them, else its records."""
    return data.num_patients if data.num_patients is not None else len(data.train)


def privacy_unit(data: SiteData) -> str:
    """What one DP unit is at this site: ``patient`` (segmentation volumes, known patients) or ``record``."""
    return data.privacy_unit


def per_patient(rows: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
    """One validation row per patient (the mean of their images' rows: norm at most 1), or the rows as they are."""
    if patients is None:
        return rows
    groups = np.asarray(patients, dtype=np.int64)
    sums = np.zeros((int(groups.max(initial=-1)) + 1, rows.shape[1]))
    np.add.at(sums, groups, rows)
    return sums / np.bincount(groups, minlength=len(sums))[:, None]


def _digest(parameters: list[np.ndarray]) -> str:
    return digest(*[np.ascontiguousarray(p).tobytes() for p in parameters])


def _check_finite(update: list[np.ndarray]) -> None:
    """Refuse to send a non-finite update (SecAgg+ would quantize it silently to an extreme value)."""
    if not all(np.isfinite(u).all() for u in update):
        raise Refused(DIVERGED)


def _implausible(parameters: list[np.ndarray]) -> str | None:
    """Why the coordinator's weights are refused before any record is touched (``None``: they are plausible).

    Weights crafted to overflow on some records only (a NaN logit for records above two feature thresholds, say)
    would turn a refusal into a membership test; finite, bounded weights cannot overflow medsilo's models.
    """
    for p in parameters:
        a = np.asarray(p)
        if a.size and a.dtype.kind == "f" and not (np.isfinite(a).all() and np.abs(a).max() <= MAX_RECEIVED_WEIGHT):
            return IMPLAUSIBLE_WEIGHTS.format(bound=MAX_RECEIVED_WEIGHT)
    return None


def _state_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter | None]:
    """The parameter behind each ``state_dict`` entry, in ``state_dict`` order (``None`` for buffers)."""
    params = dict(model.named_parameters())
    return [params.get(name) for name in model.state_dict()]


def _update_dtype(update: list[np.ndarray], *, secure: bool) -> list[np.ndarray]:
    return [np.asarray(u, dtype=np.float64) for u in update] if secure else update


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
