"""The coordinator's ServerApp (Flower's legacy strategy stack, so SecAgg+ can wrap the fit stage).

One code path for simulation and deployment: ``DefaultWorkflow`` with the default fit stage,
or with ``SecAggPlusWorkflow`` when secure aggregation is on (see README, Architecture).
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from common.config import RunConfig
from common.datasets import dataset_info, load
from common.flower_env import keep_flower_logs_single
from common.io import atomic_write_json
from server.evaluation import TestSet
from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters

app = ServerApp()
keep_flower_logs_single()


def output_dir(config: RunConfig, run_id: int) -> Path:
    """The run's output folder: ``out-dir`` or ``medsilo-runs/run-<id>``."""
    return Path(config.out_dir) if config.out_dir else Path("medsilo-runs") / f"run-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` federated rounds and write metrics, checkpoints and ``federated.json``."""
    config = RunConfig.from_flower(context.run_config)
    info = dataset_info(config.dataset)
    out_dir = output_dir(config, context.run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "run_config.json", config.to_flower())
    test_set = None
    if config.server_eval:
        data = load(config.dataset)
        test_set = TestSet.from_split(data.test, info)
    inner = build_inner_strategy(config, initial_parameters(config, info), config.min_sites)
    strategy = FederationStrategy(inner, config=config, info=info, out_dir=out_dir, test_set=test_set)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy)
    log(INFO, "medsilo: %s, %s, %d rounds, DP %s, output %s", info.name, config.strategy, config.rounds,
        f"ε={config.epsilon}, δ={config.delta}" if config.dp else "off", out_dir)
    DefaultWorkflow()(grid, legacy)
    strategy.summary()
