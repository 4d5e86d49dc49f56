"""The hospital node's ClientApp process: ``medsilo-clientapp``, in place of Flower's ``flwr-clientapp``.

Flower's SuperNode hands every message to a fresh ``flwr-clientapp`` process, which unpacks the coordinator's app
bundle (FAB) and imports its ClientApp: the coordinator's code would then decide the site's DP step, its ledger
and its policy checks. ``medsilo client start`` puts this process in its place (the node's ``PATH`` resolves
``flwr-clientapp`` to ``medsilo-clientapp``), and it:

1. pulls the message, its context, the run and the FAB through Flower's Runtime API (Flower's own client code);
2. decides on the FAB's bytes before anything of it is loaded (:mod:`client.app_approval`); a refused FAB gets an
   error reply whose reason the coordinator sees, and is kept in the state folder for review;
3. runs the ClientApp of the medsilo installed in the node's environment (never the FAB's), with the run config
   Flower built from the FAB and the coordinator's overrides (every value of which the site's policy checks),
   the FAB's digest in the node config for the audit log;
4. pushes the reply and the updated context back, as ``flwr-clientapp`` does.

It is started as ``python -I`` (the node writes a one-line launcher, :func:`client.node.write_launcher`), so
neither the working directory nor ``PYTHON*`` variables can put other code in front of the installed packages.
"""

from __future__ import annotations

import argparse
import logging
from logging import DEBUG, ERROR

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client import app_approval
from client.app import APP_DIGEST_KEY, app, audit_signer, refusal
from client.policy import site_policy, state_dir
from common import audit


def _client(address: str, token: str, *, insecure: bool, certificates: bytes | None) -> tuple[RuntimeHttpClient,
                                                                                               object]:
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )
    return client, retry


def handle(message: Message, context: Context, fab_content: bytes) -> Message:
    """The node's reply to ``message``: a refusal of an unapproved FAB, or its installed ClientApp's answer."""
    policy = site_policy(context.node_config, context.run_config)
    verdict = app_approval.check(fab_content, policy) if policy is not None else None
    if verdict is not None and not verdict.accepted:
        folder = state_dir(context.node_config, context.run_config)
        kept = app_approval.keep_refused(folder, fab_content, verdict.digest) if folder is not None else None
        logging.getLogger("medsilo").error("refused app bundle %s%s: %s", verdict.digest,
                                           f" (kept at {kept})" if kept else "", verdict.reason)
        reply = refusal(message, context, verdict.reason)
        if folder is not None:
            audit.append(folder / "audit.jsonl", {
                "side": "site", "run": context.run_id, "round": message.metadata.group_id,
                "message": message.metadata.message_type, "event": "app-refused", "app": verdict.digest,
                "error": verdict.reason[:300],
            }, signer=audit_signer(context.node_config))
        return reply
    context.node_config[APP_DIGEST_KEY] = app_approval.fab_digest(fab_content)
    return app(message=message, context=context)  # the installed medsilo's ClientApp, never the FAB's


def run(*, address: str, token: str, insecure: bool, certificates: bytes | None, parent_pid: int | None) -> None:
    """One message's task, from pull to push (see module docstring)."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client, retry = _client(address, token, insecure=insecure, certificates=certificates)
    heartbeat: HeartbeatSender | None = None
    context: Context | None = None
    outcome = {"status": SubStatus.FAILED, "details": "ClientApp task failed"}

    def on_exit() -> None:
        retry.max_tries = 1  # type: ignore[attr-defined]
        push_task_output(client=client, context=context, sub_status=outcome["status"], details=outcome["details"])
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.",
                             exit_handlers=[on_exit])
    message: Message | None = None
    reply: Message | None = None
    code = ExitCode.SUCCESS
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        reply = handle(message, context, fab.content)
        outcome = {"status": SubStatus.COMPLETED, "details": ""}
    except Exception as exc:
        log(ERROR, "the ClientApp raised an exception", exc_info=exc)
        if message is not None:  # the node's log has the exception; the coordinator gets no data-bearing text
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason="the site's ClientApp failed; its operator finds why in the node's log"),
                            reply_to=message)
        code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as exc:
                log(ERROR, "failed to push the reply", exc_info=exc)
                code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def main() -> None:
    """``medsilo-clientapp``: the arguments of Flower's ``flwr-clientapp``."""
    parser = argparse.ArgumentParser(description="medsilo's ClientApp process for a hospital node")
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    token = try_obtain_flwr_app_token(args)
    log(DEBUG, "medsilo-clientapp connecting to %s", args.runtime_api_address)
    run(address=args.runtime_api_address, token=token, insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
