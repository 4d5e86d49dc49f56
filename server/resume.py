"""Checkpoint and resume of a federated run at the coordinator.

After every round's aggregation the coordinator writes ``resume-state.safetensors`` in the run folder,
atomically and in one file: the global weights, the aggregation rule's own state (FedAdam's moments,
FedAvgM's momentum, SCAFFOLD's control variate), the round number, the round's bookkeeping not yet
written to ``metrics.jsonl`` (its validation arrives with the next exchange), each site's ε so far and the
best round. A run started
with ``resume=true`` on the same run folder continues with the next round; nothing is unpickled.

:class:`ResumableWorkflow` is Flower's ``DefaultWorkflow`` with a first round other than 1.
"""

from __future__ import annotations

import io
import timeit
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.compat.server.typing import Workflow
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import DataError

STATE_FILE = "resume-state.safetensors"

#: Attributes of Flower's stock strategies that carry state across rounds (lists of arrays).
STRATEGY_ARRAYS = ("current_weights", "m_t", "v_t", "momentum_vector")


@dataclass
class ResumeState:
    """What the coordinator needs to continue a run after round ``round``.

    Attributes
    ----------
    round
        The last aggregated round; the resumed run starts with ``round + 1``.
    run_key
        The run's identity at the sites (their privacy ledgers key on it), kept across restarts.
    weights
        Global weights after ``round``, in ``state_dict`` order.
    strategy_arrays
        The aggregation rule's state by attribute name (see :data:`STRATEGY_ARRAYS`).
    meta
        JSON-able bookkeeping: the pending round's record, per-site ε history, best round.
    test_scores
        Test-split scores of the global model of ``round`` (when the coordinator evaluates).

    """

    round: int
    run_key: int
    weights: list[np.ndarray]
    strategy_arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    test_scores: np.ndarray | None = None

    def save(self, out_dir: Path) -> None:
        """Write the state atomically (one safetensors file; a crash leaves the previous round's)."""
        tensors: dict[str, torch.Tensor] = {
            f"global.{i:04d}": torch.from_numpy(np.ascontiguousarray(w)) for i, w in enumerate(self.weights)
        }
        for name, arrays in self.strategy_arrays.items():
            tensors.update({f"strategy.{name}.{i:04d}": torch.from_numpy(np.ascontiguousarray(a))
                            for i, a in enumerate(arrays)})
        if self.test_scores is not None:
            tensors["test_scores"] = torch.from_numpy(np.ascontiguousarray(self.test_scores))
        save_checkpoint(out_dir / STATE_FILE, tensors,
                        {"round": self.round, "run_key": self.run_key, "state": self.meta})

    @classmethod
    def load(cls, out_dir: Path) -> ResumeState:
        """Read the state of ``out_dir``; :class:`DataError` says what to do when there is none."""
        path = out_dir / STATE_FILE
        if not path.is_file():
            raise DataError(f"cannot resume: {path} not found; the run never finished a round, or out-dir points "
                            "elsewhere (start it again without resume)")
        tensors, meta = load_checkpoint(path)
        weights = [tensors[k].numpy() for k in sorted(k for k in tensors if k.startswith("global."))]
        strategy: dict[str, list[np.ndarray]] = {}
        for key in sorted(k for k in tensors if k.startswith("strategy.")):
            _, name, _ = key.split(".")
            strategy.setdefault(name, []).append(tensors[key].numpy())
        scores = tensors["test_scores"].numpy() if "test_scores" in tensors else None
        return cls(round=int(meta["round"]), run_key=int(meta["run_key"]), weights=weights,
                   strategy_arrays=strategy, meta=dict(meta.get("state", {})), test_scores=scores)


def strategy_arrays(strategy: object) -> dict[str, list[np.ndarray]]:
    """The stateful arrays of a stock Flower strategy (empty for FedAvg / FedProx)."""
    out = {}
    for name in STRATEGY_ARRAYS:
        value = getattr(strategy, name, None)
        if isinstance(value, list) and all(isinstance(a, np.ndarray) for a in value):
            out[name] = [np.array(a, copy=True) for a in value]
    return out


def restore_strategy_arrays(strategy: object, arrays: dict[str, list[np.ndarray]]) -> None:
    """Put saved arrays back on the strategy (FedAvgM also needs to know momentum has started)."""
    for name, value in arrays.items():
        setattr(strategy, name, [np.array(a, copy=True) for a in value])


def record_as_dict(record: Any) -> dict[str, Any]:
    """A dataclass round record as JSON-able data."""
    return asdict(record)


class ResumableWorkflow(DefaultWorkflow):
    """Flower's default workflow starting at ``first_round`` (1 for a new run).

    A resumed run does not evaluate an initial model: the strategy returns the checkpoint's weights
    from ``initialize_parameters`` and already holds that round's evaluation.
    """

    def __init__(self, fit_workflow: Workflow | None = None, *, first_round: int = 1) -> None:
        super().__init__(fit_workflow=fit_workflow)
        self.first_round = first_round

    def __call__(self, grid: Grid, context: Context) -> None:
        """Execute rounds ``first_round .. num_rounds`` (the final evaluation when none is left)."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        try:
            c_done.wait()
            if self.first_round <= 1:
                default_init_params_workflow(grid, context)
            else:
                parameters = context.strategy.initialize_parameters(client_manager=context.client_manager)
                assert parameters is not None
                context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                    parameters, keep_input=True)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            num_rounds = context.config.num_rounds
            for current_round in range(max(1, self.first_round), num_rounds + 1):
                log(INFO, "")
                log(INFO, "[ROUND %s]", current_round)
                cfg[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
            if self.first_round > num_rounds:  # crashed after the last aggregation: only its validation is left
                cfg[Key.CURRENT_ROUND] = num_rounds
                self.evaluate_workflow(grid, context)
            for idx, line in enumerate(io.StringIO(str(context.history))):
                log(INFO, "%s%s", "" if idx == 0 else "\t", line.strip("\n"))
        finally:  # also when a round fails: stop polling for nodes
            f_stop.set()
            thread.join()
