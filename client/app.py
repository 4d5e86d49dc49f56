"""The hospital's ClientApp: what a SuperNode runs for every message of a federated run.

Training and validation live in :mod:`client.site` (torch, Opacus), imported only when a message
needs them: under secure aggregation three of a round's five messages are key exchanges, and in
deployment every message starts a fresh process, so they must not pay for importing torch.

:func:`secure_aggregation_mod` puts Flower's SecAgg+ client protocol in front of training when the
coordinator runs secure aggregation, behind the site's own cohort floor (:mod:`client.secagg_guard`: it never
takes part in a sum of fewer than its policy's ``min-cohort`` sites, whatever the coordinator sends), and
enforces the site's policy when it does not: a site whose policy requires secure aggregation (the default)
answers a training request whose update would leave the site unmasked with an error instead of training.
A site that refuses a SecAgg+ round drops out of the sum with an error reply carrying its
:class:`~common.wire.SiteReport`. :func:`audit_mod` appends every reply that leaves the site to the site's
hash-chained audit log, with the digest of the app bundle the coordinator shipped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Error, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_to_proto

from client import secagg_guard as guard
from client.data import site_name
from client.policy import requires_masking, site_policy, state_dir
from common import audit, crypto, recipes
from common.audit import digest
from common.errors import ConfigError
from common.flower_env import keep_flower_logs_single
from common.io import private_dir
from common.secure_aggregation import run_settings
from common.site_policy import SitePolicy, violations
from common.wire import REFUSAL_CODE, SiteReport, WireError

log = logging.getLogger(__name__)
keep_flower_logs_single()

#: The node-config key under which the node's app runner passes the digest of the coordinator's app bundle.
APP_DIGEST_KEY = "app-digest"

#: The cohort floor of a simulated site without a policy: the protocol's own minimum (a sum of at least two). Its
#: other fields are not applied.
PROTOCOL_MINIMUM = SitePolicy(min_cohort=2, min_threshold=2)


def refusal(msg: Message, ctxt: Context, reason: str) -> Message:
    """An error reply carrying this site's refusal (the coordinator decodes it with ``SiteReport``)."""
    log.warning("refused a %s request: %s", msg.metadata.message_type, reason)
    report = SiteReport(site=site_name(ctxt.node_config), refused=True, reason=reason)
    return Message(Error(code=REFUSAL_CODE, reason=report.to_error_reason()), reply_to=msg)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ messages through Flower's ``secaggplus_mod`` behind the site's cohort floor.

    Without SecAgg+, refuse a training request whose update would leave unmasked when the site's policy requires
    masking (the default).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None:
        return _secure_stage(msg, ctxt, call_next, configs)
    if requires_masking(ctxt.node_config, ctxt.run_config):
        return refusal(msg, ctxt, "this site's policy requires secure aggregation (require-secure-aggregation=true) "
                                  "but the coordinator asked for an unmasked update; relaunch the run with "
                                  "secure-aggregation=true")
    return call_next(msg, ctxt)


def _secure_stage(msg: Message, ctxt: Context, call_next: ClientAppCallable, configs: ConfigRecord) -> Message:
    """One SecAgg+ stage: the site's floor first (:mod:`client.secagg_guard`), then Flower's protocol."""
    own = site_policy(ctxt.node_config, ctxt.run_config)
    policy = own or PROTOCOL_MINIMUM  # the cohort rules; the run's other rules only from a policy the site has
    stage = str(configs.get(Key.STAGE, ""))
    mine = ctxt.state.config_records.setdefault(guard.COHORT_RECORD, ConfigRecord({"sent": 0}))
    before = dict(mine)
    problem = _stage_problem(msg, ctxt, configs, stage, policy, own, mine)
    if problem:
        return refusal(msg, ctxt, problem)
    try:
        reply = secaggplus_mod(msg, ctxt, call_next)
    except BaseException:
        mine.clear()  # what this site did this round stays what it was (a malformed stage changes nothing)
        mine.update(before)
        raise
    if reply.has_error():
        return reply
    if stage == Stage.COLLECT_MASKED_VECTORS:
        report = _fit_report(reply)
        if report is not None and report.refused:
            # A refusing site drops out of the sum instead of adding a zero vector to it: the others' sum would
            # otherwise count it as a contributor and be one site thinner than anyone can tell.
            log.warning("refused round %s: %s", msg.metadata.group_id, report.reason)
            return Message(Error(code=REFUSAL_CODE, reason=report.to_error_reason()), reply_to=msg)
        mine["sent"] = 1
    if stage == Stage.UNMASK and mine.get("run-key", -1) != -1:
        folder = state_dir(ctxt.node_config, ctxt.run_config)
        if folder is not None:  # a sum holding this round's update may now be unmasked: never replay it
            marker = guard.unmasked_marker(folder, run=int(cast(int, mine["run-key"])),
                                           server_round=int(cast(int, mine["round"])))
            private_dir(marker.parent)
            marker.touch(mode=0o600)
    return _compact_masked_vector(reply)


def _stage_problem(msg: Message, ctxt: Context, configs: ConfigRecord, stage: str, policy: SitePolicy,
                   own: SitePolicy | None, mine: ConfigRecord) -> str | None:
    """The site's verdict on one SecAgg+ stage (and what it notes of the round in ``mine``)."""
    if stage == Stage.SETUP:
        mine["sent"], mine["cohort"], mine["run-key"], mine["round"] = 0, [], -1, -1
        found = [guard.setup_problem(share_num=int(cast(int, configs.get(Key.SHARE_NUMBER, 0))),
                                     threshold=int(cast(int, configs.get(Key.THRESHOLD, 0))), policy=policy)]
        try:
            config = recipes.from_flower(ctxt.run_config)
        except ConfigError:
            config = None  # the training request reports the problem
        if config is not None:
            found.append(guard.parameters_problem(
                {"mod_range": configs.get(Key.MOD_RANGE), "target_range": configs.get(Key.TARGET_RANGE),
                 "clipping_range": configs.get(Key.CLIPPING_RANGE), "max_weight": configs.get(Key.MAX_WEIGHT)},
                run_settings(config)))
            if own is not None:
                broken = violations(own, config, model_name=None, parameters=None, secure=True, training=True)
                found.append("site policy: " + "; ".join(broken) if broken else None)
        return "; ".join(p for p in found if p) or None  # every broken rule at once
    if stage == Stage.SHARE_KEYS:
        ids = [k for k in configs if k != Key.STAGE]
        if any(not k.isdigit() or str(int(k)) != k for k in ids):
            return "the key exchange names sites by malformed node ids"
        cohort = sorted({int(k) for k in ids})
        mine["cohort"] = cohort
        return guard.share_keys_problem(keys=len(cohort), policy=policy)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        fit = msg.content.config_records.get("fitins.config")
        if fit is not None:
            mine["run-key"] = int(cast(int, fit.get("run-key", ctxt.run_id)))
            mine["round"] = int(cast(int, fit.get("server-round", -1)))
        return guard.masked_vector_problem(sources=len(set(cast(list[int], configs.get(Key.SOURCE_LIST, [])))),
                                           policy=policy)
    if stage == Stage.UNMASK:
        return guard.unmask_problem(
            node_id=msg.metadata.dst_node_id, active=cast(list[int], configs.get(Key.ACTIVE_NODE_ID_LIST, [])),
            dead=cast(list[int], configs.get(Key.DEAD_NODE_ID_LIST, [])), sent=bool(mine.get("sent", 0)),
            policy=policy)
    return f"unknown SecAgg+ stage {stage[:40]!r}"


def _fit_report(reply: Message) -> SiteReport | None:
    metrics = reply.content.config_records.get("fitres.metrics")
    if metrics is None:
        return None
    try:
        return SiteReport.from_metrics(dict(metrics))
    except WireError:
        return None


def audit_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Append what leaves the site to its hash-chained audit log (no PHI: sizes, digests, ε, decisions)."""
    reply = call_next(msg, ctxt)
    folder = state_dir(ctxt.node_config, ctxt.run_config)
    if folder is None:
        return reply
    record: dict[str, object] = {
        "side": "site",
        "site": site_name(ctxt.node_config),
        "run": ctxt.run_id,
        "round": msg.metadata.group_id,
        "message": msg.metadata.message_type,
        "bytes": message_to_proto(reply).ByteSize(),
        "app": str(ctxt.node_config.get(APP_DIGEST_KEY, "")) or None,
    }
    if reply.has_error():
        reason = reply.error.reason or ""
        try:
            report = SiteReport.from_error_reason(reason)
        except WireError:
            report = None
        if report is not None:
            record["refused"], reason = True, report.reason
        record["error"] = reason[:300]
    else:
        payload = [a.data for rec in reply.content.array_records.values() for a in rec.values()]
        configs = reply.content.config_records
        secagg = configs.get(RECORD_KEY_CONFIGS)
        if secagg is not None and Key.MASKED_PARAMETERS in secagg:
            payload += cast(list[bytes], secagg[Key.MASKED_PARAMETERS])
            record["stage"] = "masked-update"
        elif secagg is not None:
            record["stage"] = "secagg-key-exchange"
        record["payload_sha256"] = digest(*payload) if payload else None
        for name in ("fitres.metrics", "evaluateres.metrics"):
            metrics = configs.get(name)
            if metrics is not None:
                for key in ("refused", "reason", "epsilon", "epsilon-lifetime", "delta", "validated-round",
                            "validation-refused"):
                    if key in metrics:
                        record[key] = metrics[key]
    audit.append(folder / "audit.jsonl", record, signer=audit_signer(ctxt.node_config))
    return reply


#: The node-config key naming the private key a deployed node signs its audit log with (its kit's ``node.key``).
AUDIT_KEY = "audit-key"


def audit_signer(node_config: Mapping[str, Any]) -> crypto.Signer | None:
    """The signer of this node's audit log: its node key when the node config names one (deployment)."""
    path = str(node_config.get(AUDIT_KEY, "")).strip()
    return _load_signer(path) if path else None


@functools.lru_cache(maxsize=4)
def _load_signer(path: str) -> crypto.Signer:
    return crypto.load_signer(Path(path))


def _compact_masked_vector(reply: Message) -> Message:
    """Send the masked vector as uint32 instead of Flower's int64: half the bytes, same values.

    Every masked value is already reduced modulo 2**32 (medsilo's modulus range), and the server's
    sum of uint32 vectors wraps modulo 2**32, which is exactly the modular sum SecAgg+ needs.
    """
    if reply.has_error():
        return reply
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None or Key.MASKED_PARAMETERS not in record:
        return reply
    arrays = [bytes_to_ndarray(b) for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
    if any(a.size and (a.min() < 0 or a.max() >= 2**32) for a in arrays):
        return reply  # a different modulus: leave Flower's encoding alone
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]
    return reply


def client_fn(context: Context) -> Client:
    """Build the site's client for one message (imports torch on first use).

    Its DP mechanisms draw from the operating system's entropy: nothing in the run config seeds them.
    """
    from client.site import SiteClient

    return SiteClient(context).to_client()


#: The ClientApp.
app = ClientApp(client_fn=client_fn, mods=[audit_mod, secure_aggregation_mod])
