"""The coordinator's ServerApp (Flower's legacy strategy stack, so SecAgg+ can wrap the fit stage).

One code path for simulation and deployment: ``DefaultWorkflow`` with the default fit stage,
or with ``SecAggPlusWorkflow`` when secure aggregation is on (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid

from common import crypto, recipes
from common.config import RunConfig
from common.datasets import dataset_info, load
from common.errors import ConfigError, DataError, NothingAggregated
from common.flower_env import keep_flower_logs_single
from common.io import atomic_write_json, private_dir
from common.models import model_problems
from common.secure_aggregation import run_settings
from server.evaluation import TestSet
from server.exchange import RecordingGrid
from server.progress import RoundProgress
from server.resume import ResumableWorkflow, ResumeState
from server.secure_workflow import ContributorFloorWorkflow
from server.site_reports import site_names_from_registry
from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters

app = ServerApp()
keep_flower_logs_single()


def output_dir(config: RunConfig, run_id: int) -> Path:
    """The run's output folder: ``out-dir`` or ``medsilo-runs/run-<id>``."""
    return Path(config.out_dir) if config.out_dir else Path("medsilo-runs") / f"run-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` federated rounds and write metrics, checkpoints and ``federated.json``."""
    config = recipes.from_flower(context.run_config)
    info = dataset_info(config.dataset, resolution=config.resolution)
    if problems := model_problems(config.model, info):
        raise ConfigError(problems)
    out_dir = output_dir(config, context.run_id)
    if not config.resume and (out_dir / "run_config.json").exists():  # never mix two runs' outputs silently
        raise ConfigError([f"out-dir={str(out_dir)!r} holds an earlier run (run_config.json, metrics, models); "
                           "launch with a new out-dir, or with -c 'resume=true' to continue that run"])
    private_dir(out_dir)  # the run's outputs: owner-only
    resumed = ResumeState.load(out_dir) if config.resume else None  # fails early, before any data is loaded
    settings = config.replace(resume=False).to_flower()
    if resumed is not None:
        check_same_settings(out_dir, settings)
    atomic_write_json(out_dir / "run_config.json", settings)
    test_set = central_test_set(config) if config.server_eval else None
    initial = ndarrays_to_parameters(resumed.weights) if resumed else initial_parameters(config, info)
    inner = build_inner_strategy(config, initial, config.min_sites)
    progress = RoundProgress(rounds=config.rounds, epsilon=config.epsilon if config.dp else None,
                             tensorboard_dir=out_dir / "tensorboard")
    strategy = FederationStrategy(inner, config=config, info=info, out_dir=out_dir, test_set=test_set,
                                  run_key=context.run_id, progress=progress, signer=coordinator_signer())
    # Deployment: name hospitals by their kit names (the SuperLink's registry), even those that never answer.
    strategy.node_names.update(site_names_from_registry(os.environ.get(REGISTRY_ENV)))
    if resumed is not None:
        strategy.restore(resumed)
    timeout = config.round_timeout or None
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.rounds, round_timeout=timeout), strategy=strategy
    )
    log(INFO, "medsilo: %s, %s, %d rounds, DP %s, secure aggregation %s, output %s", info.name, config.strategy,
        config.rounds, f"ε={config.epsilon}, δ={config.delta}" if config.dp else "off",
        "SecAgg+" if config.secure_aggregation else "OFF", out_dir)
    fit_workflow = secure_fit_workflow(config, strategy) if config.secure_aggregation else None
    # Deployment: poll the SuperLink for replies every 0.5 s at most rather than Flower's fixed 3 s.
    recording = RecordingGrid(grid, poll_interval=0.5 if isinstance(grid, HttpGrid) else None)
    strategy.exchanges = recording
    ResumableWorkflow(fit_workflow, first_round=resumed.round + 1 if resumed else 1)(recording, legacy)
    summary = strategy.summary()
    progress.close()
    if not summary["aggregated_rounds"]:  # the run failed: Flower marks it so, and the caller sees why
        raise NothingAggregated(summary["why_not_aggregated"])


#: Environment variables ``medsilo server start`` gives the SuperLink, and through it the ServerApp.
REGISTRY_ENV = "MEDSILO_SITE_REGISTRY"
AUDIT_KEY_ENV = "MEDSILO_AUDIT_KEY"


def coordinator_signer() -> crypto.Signer | None:
    """The coordinator's audit-log signer: its kit's ``server.key`` when ``medsilo server start`` names it."""
    path = os.environ.get(AUDIT_KEY_ENV, "").strip()
    return crypto.load_signer(Path(path)) if path else None


def central_test_set(config: RunConfig) -> TestSet:
    """The coordinator's optional test set (``server-eval``): read from its disk, never downloaded.

    A coordinator needs no data: without ``server-eval`` the sites' federated validation selects the model.

    Raises
    ------
    ConfigError
        The coordinator has no verified copy of the dataset's test split; the message gives both fixes.

    """
    info = dataset_info(config.dataset, resolution=config.resolution)
    try:
        data = load(config.dataset, download=False, resolution=config.resolution)
    except DataError as exc:
        raise ConfigError([
            f"server-eval=true: the coordinator scores each round on {info.name}'s public test split but has no "
            f"copy of it ({exc}). Either give it the file (MEDSILO_DATA in the environment of `medsilo server "
            f"start`), or launch with -c 'server-eval=false': the sites' federated validation then selects the "
            f"model and the coordinator holds no data at all"]) from None
    return TestSet.from_split(data.test, info)


def check_same_settings(out_dir: Path, settings: dict) -> None:
    """A resumed run must use the interrupted run's settings; every difference is reported at once."""
    path = out_dir / "run_config.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    changed = [k for k, v in settings.items() if k in before and before[k] != v]
    if changed:
        raise ConfigError([f"resume: {k}={settings[k]!r} differs from the interrupted run's {before[k]!r}; resume "
                           "with the same settings" for k in changed])


def secure_fit_workflow(config: RunConfig, strategy: FederationStrategy) -> ContributorFloorWorkflow:
    """Flower's SecAgg+ fit stage, its quantization range sized so that no site update is clipped.

    Every site holds a share of every other site's keys (``num_shares=1.0``), and the sum is unmasked only when
    at least ``min-sites`` (and 2) sites contributed a masked vector.
    """
    settings = run_settings(config)
    return ContributorFloorWorkflow(
        min_contributors=max(2, config.min_sites),
        on_halt=strategy.round_not_aggregated,
        num_shares=1.0,
        reconstruction_threshold=config.secagg_threshold,
        max_weight=float(settings.max_weight),
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=config.round_timeout or None,
    )
