"""SecAgg+ at the coordinator: Flower's workflow, whose sum is unmasked only when enough sites make it up.

Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` unmasks whatever masked vectors arrived once every
node has at least ``threshold`` live neighbours, so two refusals out of three left a "sum" of one hospital's
update. :class:`ContributorFloorWorkflow` counts the *contributors*, the sites whose masked vectors are in the
sum, and stops before asking for unmasking shares when they are fewer than the run's ``min-sites``: the round is
then recorded as not aggregated, with every refusal and failure.

This is the honest coordinator's half. The sites enforce their own floor whatever the coordinator runs
(:mod:`client.secagg_guard`): a site refuses to hand over unmasking shares for a sum of fewer than its policy's
``min-cohort`` contributors.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any, cast

from flwr.common.logger import log
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

#: Called with the round, the replies whose masked vectors were not unmasked (their reports are in the clear, their
#: updates stay masked), the failures, and the stage at which the round stopped.
HaltHandler = Callable[[int, list[Any], list[Any], str], None]


class ContributorFloorWorkflow(SecAggPlusWorkflow):
    """SecAgg+ that unmasks only sums of at least ``min_contributors`` sites (see module docstring)."""

    def __init__(self, *, min_contributors: int, on_halt: HaltHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if min_contributors < 2:
            raise ValueError(f"min_contributors={min_contributors}: a secure sum needs at least 2 contributors")
        self.min_contributors = min_contributors
        self.on_halt = on_halt

    def __call__(self, grid: Grid, context: Any) -> None:
        """Run the four SecAgg+ stages; a halted round still reaches the strategy's bookkeeping."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        state = WorkflowState()
        log(INFO, "Secure aggregation commencing.")
        stages = {"setup": self.setup_stage, "share-keys": self.share_keys_stage,
                  "masked-vector": self.collect_masked_vectors_stage, "unmask": self.unmask_stage}
        for name, step in stages.items():
            if not step(grid, context, state):
                log(INFO, "Secure aggregation halted.")
                cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
                # Nothing is aggregated; the strategy records the round, its refusals and its failures.
                self.on_halt(cast(int, cfg[WorkflowKey.CURRENT_ROUND]), list(getattr(state, "legacy_results", [])),
                             list(state.failures), name)
                return
        log(INFO, "Secure aggregation completed.")

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Ask for unmasking shares only when at least ``min_contributors`` masked vectors make up the sum."""
        contributors = len(state.active_node_ids)
        if contributors < self.min_contributors:
            cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
            log(WARNING, "round %s: %d site(s) sent masked vectors, fewer than min-sites=%d; the sum is not "
                "unmasked and the round is not aggregated", cfg[WorkflowKey.CURRENT_ROUND], contributors,
                self.min_contributors)
            return False
        return bool(super().unmask_stage(grid, context, state))
