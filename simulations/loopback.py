"""An in-process Grid that delivers each message to a real ClientApp.

Flower's server workflows and medsilo's ClientApp and mods run unchanged, and the caller sees every reply
the server-side code receives (tests of secure aggregation, the bytes benchmark).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


class LoopbackGrid(Grid):
    """Delivers messages synchronously to ``apps[node_id]`` with that node's persistent context."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict], run_config: dict) -> None:
        self.app = app
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(), run_config=run_config)
            for nid, cfg in node_configs.items()
        }
        self.received: list[Message] = []
        self.offline: set[int] = set()
        #: Called before each delivery; may mark nodes offline (simulated dropouts).
        self.before_delivery: Callable[[Message], None] | None = None
        self._run = Run.create_empty(run_id=1)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SERVER_NODE

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used by the workflows
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def get_nodes(self):
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE
            msg.metadata.__dict__["_run_id"] = 1
            if self.before_delivery:
                self.before_delivery(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.offline:
                continue  # a dropped node never answers; the workflow times out on it
            try:
                reply = self.app(copy.deepcopy(msg), self.contexts[nid])
            except Exception as exc:
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            replies.append(reply)
            self.received.append(copy.deepcopy(reply))
        return replies
