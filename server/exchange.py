"""Who the coordinator asked, who answered and who stayed silent, per round and stage.

Flower's workflows keep only the replies that arrived: a site that trained but whose reply came after the round
timeout leaves no trace, and SecAgg+ records a site's error without saying which site it was. The coordinator
wraps its :class:`~flwr.serverapp.Grid` in a :class:`RecordingGrid`, which notes, for every message it sends,
the destination node, the exchange it belongs to (``fit``, SecAgg+'s ``setup``, ``share-keys``,
``masked-vector``, ``unmask``, or ``evaluate``) and what came back. :class:`server.strategy.FederationStrategy`
reads the round's :class:`RoundExchange` to name the sites that were asked to train and did not answer (they may
have spent privacy budget on it) and the sites that refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

#: The exchanges in which a site trains (and charges its privacy budget): plain fit, or SecAgg+'s masked vector.
TRAINING_STAGES = ("fit", "masked-vector")

_SECAGG_STAGES = {
    Stage.SETUP: "setup",
    Stage.SHARE_KEYS: "share-keys",
    Stage.COLLECT_MASKED_VECTORS: "masked-vector",
    Stage.UNMASK: "unmask",
}


@dataclass
class StageOutcome:
    """One exchange of one round: the nodes asked, those that replied, and the error replies' reasons."""

    stage: str
    asked: set[int] = field(default_factory=set)
    replied: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def silent(self) -> set[int]:
        """Nodes asked that sent nothing back in time (a crash, a network failure, or a late reply)."""
        return self.asked - self.replied - set(self.errors)


@dataclass
class RoundExchange:
    """Every exchange of one round, in the order they happened."""

    round: int
    stages: list[StageOutcome] = field(default_factory=list)

    def stage(self, name: str) -> StageOutcome | None:
        """The last exchange called ``name`` in this round, if any."""
        return next((s for s in reversed(self.stages) if s.stage == name), None)

    @property
    def asked_to_train(self) -> set[int]:
        """Nodes that received a training request this round."""
        return set().union(*(s.asked for s in self.stages if s.stage in TRAINING_STAGES))

    @property
    def silent_in_training(self) -> set[int]:
        """Nodes that received a training request and never answered it: they may have trained and been charged."""
        return set().union(*(s.silent for s in self.stages if s.stage in TRAINING_STAGES))

    @property
    def dropped_before_training(self) -> set[int]:
        """Nodes that stopped answering during SecAgg+'s key exchange, before any training request reached them."""
        first = next((s for s in self.stages if s.stage == "setup"), None)
        return set() if first is None else first.asked - self.asked_to_train - set().union(
            *(set(s.errors) for s in self.stages))


def stage_of(message: Message) -> str:
    """The exchange a coordinator message belongs to (see module docstring)."""
    if message.metadata.message_type == MessageType.EVALUATE:
        return "evaluate"
    if message.metadata.message_type != MessageType.TRAIN:
        return str(message.metadata.message_type)
    content: RecordDict = message.content
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.STAGE not in configs:
        return "fit"
    return _SECAGG_STAGES.get(str(configs[Key.STAGE]), str(configs[Key.STAGE]))


class RecordingGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that records each round's exchanges (everything else is delegated).

    With ``poll_interval`` set (deployment), :meth:`send_and_receive` pulls replies through the grid's own
    ``push_messages``/``pull_messages`` every ``poll_interval`` seconds at most, starting faster, instead of Flower's
    fixed 3 s: each SecAgg+ stage is an exchange, so the interval is paid four times a secure round.
    """

    def __init__(self, grid: Grid, *, poll_interval: float | None = None) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.rounds: dict[int, RoundExchange] = {}

    def exchange(self, server_round: int) -> RoundExchange:
        """The record of ``server_round`` (empty when nothing was sent in it)."""
        return self.rounds.setdefault(server_round, RoundExchange(round=server_round))

    # ---------------------------------------------------------------- delegation
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        outcomes: dict[tuple[int, str], StageOutcome] = {}
        for msg in sent:
            try:
                server_round = int(msg.metadata.group_id)
            except ValueError:
                continue
            key = (server_round, stage_of(msg))
            if key not in outcomes:
                outcomes[key] = StageOutcome(stage=key[1])
                self.exchange(server_round).stages.append(outcomes[key])
            outcomes[key].asked.add(msg.metadata.dst_node_id)
        replies = list(self._exchange(sent, timeout=timeout))
        for reply in replies:  # Flower's workflows send one message per node per call
            node = reply.metadata.src_node_id
            found = next((o for o in outcomes.values() if node in o.asked), None)
            if found is None:
                continue
            if reply.has_error():
                found.errors[node] = str(reply.error.reason or f"error code {reply.error.code}")
            else:
                found.replied.add(node)
        return replies

    def _exchange(self, messages: list[Message], *, timeout: float | None) -> list[Message]:
        """Flower's push-then-pull loop (same timeout semantics) with a short, growing poll interval."""
        if self.poll_interval is None:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min(0.05, self.poll_interval)
        replies: list[Message] = []
        while deadline is None or time.monotonic() < deadline:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending:
                break
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(interval * 1.5, self.poll_interval)
        return replies
