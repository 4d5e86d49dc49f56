"""The hospital's ClientApp: what a SuperNode runs for every message of a federated run.

Training and validation live in :mod:`client.site` (torch, Opacus), imported only when a message
needs them: under secure aggregation three of a round's five messages are key exchanges, and in
deployment every message starts a fresh process, so they must not pay for importing torch.

:func:`secure_aggregation_mod` puts Flower's SecAgg+ client protocol in front of training when the
coordinator runs secure aggregation, and enforces the site's policy when it does not: a site whose policy
requires secure aggregation (the default) answers a training request whose update would leave the site
unmasked with an error instead of training. :func:`audit_mod` appends every reply that leaves the site
to the site's hash-chained audit log.
"""

from __future__ import annotations

import logging
from typing import cast

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import Client, ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Error, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto

from client.data import site_name
from client.policy import requires_masking, state_dir
from common import audit
from common.audit import digest
from common.flower_env import keep_flower_logs_single

log = logging.getLogger(__name__)
keep_flower_logs_single()

#: Error code of a refused unmasked training request (Flower reserves small codes).
UNMASKED_REFUSED = 4100


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ messages through Flower's ``secaggplus_mod``; refuse unmasked training if required."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return _compact_masked_vector(secaggplus_mod(msg, ctxt, call_next))
    if requires_masking(ctxt.node_config, ctxt.run_config):
        reason = (
            "this site's policy requires secure aggregation (require-secure-aggregation=true) but the coordinator "
            "asked for an unmasked update; relaunch the run with secure-aggregation=true"
        )
        log.warning("refused a training request: %s", reason)
        return Message(Error(code=UNMASKED_REFUSED, reason=reason), reply_to=msg)
    return call_next(msg, ctxt)


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
    }
    if reply.has_error():
        record["error"] = (reply.error.reason or "")[:300]
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
    audit.append(folder / "audit.jsonl", record)
    return reply


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
