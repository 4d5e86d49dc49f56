"""``medsilo sweep``: one command for a grid of simulations over ε (or no DP), seeds and partitions.

Every run is a ``medsilo simulate`` run (:func:`simulations.experiment.build_simulation` and
:func:`~simulations.experiment.run_simulation`), written to ``OUT/runs/<partition>_<eps>_seed-<s>/`` exactly
as ``simulate --out`` writes it. All runs share one Ray instance (:func:`simulations.runner.shared_ray`):
Ray starts once before the first run and stops after the last. Then ``OUT/sweep.json``, ``sweep.md`` and
``sweep.png`` summarise each cell (partition × ε) across seeds (:mod:`simulations.sweep_table`).

A sweep is resumable: ``OUT/sweep-config.json`` records its settings, a run whose folder holds ``summary.json``
is finished and skipped when the same command runs again, and a run that was interrupted (its
``.<run>.partial`` folder) starts over. The same ``--out`` with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.dp.budget import budget_problems
from common.config import RunConfig
from common.datasets import MedMNIST, Task, dataset_info
from common.errors import ConfigError, DataError, Problems
from common.io import atomic_write_json, private_dir
from simulations.experiment import Simulation, build_simulation, research_config_values, run_simulation
from simulations.partition import PartitionSpec
from simulations.runner import shared_ray
from simulations.sweep_table import INTERVAL_METHOD, cell_stats, headline_metric, run_values, write_outputs

log = logging.getLogger("medsilo")

#: The settings file of a sweep folder: a re-run with other settings is refused.
SETTINGS_FILE = "sweep-config.json"
RUNS_FOLDER = "runs"
#: ``--epsilon`` value for a cell without DP-SGD.
NONE = "none"
#: Largest ``--seeds`` value: seeds are kept to 32 bits (numpy's legacy range; torch and numpy take it everywhere,
#: offsets such as ``seed + 1`` included).
MAX_SEED = 2**32 - 1
#: Recipe fields the researcher may set (``None``: the dataset's recipe for the run's ε, as ``simulate``).


@dataclass(frozen=True)
class Grid:
    """The swept values: ε per site (``None``: no DP), seeds and partitions, each in canonical order."""

    epsilons: tuple[float | None, ...]
    seeds: tuple[int, ...]
    partitions: tuple[PartitionSpec, ...]

    def cells(self) -> list[tuple[PartitionSpec, float | None]]:
        """(partition, ε) pairs, partition-major."""
        return [(p, e) for p in self.partitions for e in self.epsilons]

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``none`` for no DP)."""
        return {"partitions": [str(p) for p in self.partitions],
                "epsilons": [NONE if e is None else e for e in self.epsilons], "seeds": list(self.seeds)}


def parse_grid(*, dataset: str, epsilons: list[str], seeds: list[str], partitions: list[str]) -> Grid:
    """Parse the grid's values, checking all of them before reporting.

    Raises
    ------
    ConfigError
        Listing every unknown, out-of-range or duplicated value and an unknown dataset.

    """
    grid, problems = _parse_grid(dataset=dataset, epsilons=epsilons, seeds=seeds, partitions=partitions)
    problems.raise_if_any()
    return grid


def _parse_grid(*, dataset: str, epsilons: list[str], seeds: list[str],
                partitions: list[str]) -> tuple[Grid, Problems]:
    problems = Problems()
    try:
        dataset_info(dataset)
    except (DataError, ConfigError) as exc:
        problems.add(f"--dataset: {exc}")
    eps: list[float | None] = []
    for text in epsilons:
        if text.strip().lower() == NONE:
            value: float | None = None
        else:
            try:
                value = float(text)
            except ValueError:
                problems.add(f"--epsilon {text!r}: not a number; use a positive ε such as 8, or 'none' for no DP")
                continue
            if not math.isfinite(value) or value <= 0:
                problems.add(f"--epsilon {text!r}: ε must be a finite number > 0 (or 'none' for no DP)")
                continue
        if value in eps:
            problems.add(f"--epsilon {text!r}: given twice; list each ε once")
            continue
        eps.append(value)
    seed_values: list[int] = []
    for text in seeds:
        try:
            seed = int(text)
        except ValueError:
            problems.add(f"--seeds {text!r}: not an integer; use seeds such as 0 1 2")
            continue
        if not 0 <= seed <= MAX_SEED:
            problems.add(f"--seeds {text!r}: a seed must be in 0..{MAX_SEED}; use seeds such as 0 1 2")
            continue
        if seed in seed_values:
            problems.add(f"--seeds {text!r}: given twice; list each seed once")
            continue
        seed_values.append(seed)
    specs: list[PartitionSpec] = []
    for text in partitions:
        spec, spec_problems = PartitionSpec.parse(text)
        for item in spec_problems:
            problems.add(item)
        if spec is None:
            continue
        if str(spec) in map(str, specs):
            problems.add(f"--partition {text!r}: given twice (as {spec}); list each partition once")
            continue
        specs.append(spec)
    for flag, given in (("--epsilon", epsilons), ("--seeds", seeds), ("--partition", partitions)):
        problems.check(bool(given), f"{flag}: no value given; list at least one")
    grid = Grid(tuple(sorted(eps, key=lambda e: math.inf if e is None else e)), tuple(sorted(seed_values)),
                tuple(sorted(specs, key=str)))
    return grid, problems


@dataclass(frozen=True)
class SweepSettings:
    """What ``medsilo sweep`` was asked: the grid as typed and the ``simulate`` settings every run shares.

    ``options`` holds the run settings by :class:`~common.config.RunConfig` name (``model``, ``delta``,
    ``secure_aggregation``, ...); a recipe setting (:data:`common.recipes.RECIPE_OPTIONS`) left ``None`` takes the
    dataset's recipe for the run's ε, as ``simulate`` does.
    """

    dataset: str
    sites: int
    partitions: list[str]
    epsilons: list[str]
    seeds: list[str]
    out: Path
    options: dict[str, Any] = field(default_factory=dict)
    scanner_shift: float = 0.0
    compare: bool = True
    download: bool = True
    reproducible: bool = False


def run_name(partition: PartitionSpec, epsilon: float | None, seed: int) -> str:
    """The run's folder name, e.g. ``dirichlet-0.5_eps-8_seed-0`` or ``iid_no-dp_seed-1``."""
    eps = "no-dp" if epsilon is None else f"eps-{epsilon:g}"
    return f"{str(partition).replace(':', '-')}_{eps}_seed-{seed}"


def config_values(settings: SweepSettings, epsilon: float | None, seed: int) -> dict[str, Any]:
    """One run's :class:`RunConfig` values, resolved as ``medsilo simulate`` resolves its flags."""
    eps = epsilon if epsilon is not None else RunConfig.epsilon
    model = settings.options.get("model", "auto")
    return research_config_values(settings.dataset, dp=epsilon is not None, epsilon=eps, model=model,
                                  settings={**settings.options, "seed": seed})


def settings_record(settings: SweepSettings, grid: Grid) -> dict[str, Any]:
    """What ``sweep-config.json`` holds: everything that changes a run's result."""
    return {"dataset": settings.dataset, "sites": settings.sites, **grid.as_dict(),
            "scanner_shift": settings.scanner_shift, "compare": settings.compare,
            "reproducible": settings.reproducible, "options": dict(sorted(settings.options.items()))}


def _check_folder(out: Path, record: dict[str, Any]) -> list[str]:
    """Problems with ``out`` as this sweep's folder: another sweep's, or not a sweep folder at all."""
    stored_file = out / SETTINGS_FILE
    if stored_file.is_file():
        try:
            stored = json.loads(stored_file.read_text())
        except (OSError, ValueError) as exc:
            return [f"--out {out}: its {SETTINGS_FILE} cannot be read ({exc}); choose a new --out"]
        stored_opts, opts = stored.get("options", {}), record["options"]
        changed = [f"{k}: {stored.get(k)!r} there, {record[k]!r} here" for k in record
                   if k != "options" and stored.get(k) != record[k]]
        changed += [f"{k}: {stored_opts.get(k)!r} there, {opts.get(k)!r} here"
                    for k in sorted({*stored_opts, *opts}) if stored_opts.get(k) != opts.get(k)]
        if changed:
            return [f"--out {out}: holds a sweep with other settings ({'; '.join(changed)}); run the same command "
                    "to continue that sweep, or choose a new --out for this one"]
    elif out.exists() and any(out.iterdir()):
        return [f"--out {out}: the folder exists, is not empty and holds no {SETTINGS_FILE} (not a sweep folder); "
                "choose a new name"]
    return []


@dataclass
class Plan:
    """A validated sweep: the runs still to do (with their simulations) and the finished ones."""

    settings: SweepSettings
    grid: Grid
    record: dict[str, Any]
    todo: list[tuple[str, Simulation]]
    done: list[str]
    data: MedMNIST | None


def _settings_problems(settings: SweepSettings, grid: Grid) -> list[str]:
    """The shared run settings' problems and each DP ε's budget problem, found without loading the dataset.

    Checked for every valid ε of the grid (a DP run at the default ε when none is valid) at its first valid seed.
    """
    from common.models import model_problems

    found: list[str] = []
    seed = grid.seeds[0] if grid.seeds else 0
    for epsilon in grid.epsilons or (RunConfig.epsilon,):
        try:
            config = RunConfig(**config_values(settings, epsilon, seed))
        except (TypeError, ValueError, ConfigError, DataError) as exc:
            items = [str(exc)]
        else:
            items = config.problems()
            if not any(item.startswith(("dataset=", "resolution=")) for item in items):
                items += model_problems(config.model, dataset_info(config.dataset, resolution=config.resolution))
            if not items and config.dp:
                items = budget_problems(config)
        found += [item for item in items if item not in found]
    return found


def plan(settings: SweepSettings) -> Plan:
    """Validate the grid, the settings, the folder and every unfinished run before anything trains.

    Raises
    ------
    ConfigError
        Listing every problem at once (grid values, settings, ε too small to plan, dataset, folder), each stated
        once.

    """
    grid, problems = _parse_grid(dataset=settings.dataset, epsilons=settings.epsilons, seeds=settings.seeds,
                                 partitions=settings.partitions)
    problems.check(settings.sites >= 1, f"--sites {settings.sites}: need at least 1 site")
    record = settings_record(settings, grid)
    if not problems.items:  # a sweep folder is compared with a valid grid only
        for item in _check_folder(settings.out, record):
            problems.add(item)
    if not any(item.startswith("--dataset") for item in problems.items):
        for item in _settings_problems(settings, grid):
            problems.add(item)
    problems.raise_if_any()
    runs_dir = settings.out / RUNS_FOLDER
    todo: list[tuple[str, Simulation]] = []
    done: list[str] = []
    data: MedMNIST | None = None
    for partition, epsilon in grid.cells():
        for seed in grid.seeds:
            name = run_name(partition, epsilon, seed)
            if (runs_dir / name / "summary.json").is_file():
                done.append(name)
                continue
            try:
                sim, loaded = build_simulation(
                    config_values=config_values(settings, epsilon, seed), sites=settings.sites,
                    partition=str(partition), out=str(runs_dir / name), scanner_shift=settings.scanner_shift,
                    compare=settings.compare, overwrite=True,  # an incomplete folder of this run: done again
                    download=settings.download, reproducible=settings.reproducible,
                )
            except ConfigError as exc:
                for item in exc.problems:
                    if item not in problems.items:
                        problems.add(item)
                continue
            data = data or loaded  # every run trains on the same dataset: held once
            todo.append((name, sim))
    problems.raise_if_any()
    return Plan(settings, grid, record, todo, done, data)


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """Run every unfinished run of the sweep in one Ray session, then write the table and plot; return the table.

    Raises
    ------
    ConfigError
        Before anything trains, listing every problem (see :func:`plan`).

    """
    p = plan(settings)
    out = settings.out
    private_dir(out)
    atomic_write_json(out / SETTINGS_FILE, p.record)
    total = len(p.todo) + len(p.done)
    if p.done:
        log.info("sweep %s: %d of %d runs already finished, skipped", out, len(p.done), total)
    if None in p.grid.epsilons:
        log.warning("the sweep's 'none' cells train WITHOUT DP-SGD: their site updates carry no privacy guarantee")
    if p.todo:
        assert p.data is not None
        cpus = os.cpu_count() or 1  # run_federation's default: every run uses the session's CPUs
        try:
            with shared_ray(cpus, out / "flwr-home"):
                for i, (name, sim) in enumerate(p.todo, start=len(p.done) + 1):
                    log.info("sweep run %d of %d: %s", i, total, name)
                    run_simulation(sim, p.data)
        except BaseException:
            log.error("sweep stopped; its finished runs are kept: run the same command again to do the rest")
            raise
    table = build_table(p)
    write_outputs(out, table)
    return table


def build_table(p: Plan) -> dict[str, Any]:
    """``sweep.json``: every cell's runs and their statistics across seeds."""
    runs_dir = p.settings.out / RUNS_FOLDER
    task = dataset_info(p.settings.dataset).task
    metric = headline_metric(task.value)
    metrics = [metric] if task is Task.SEGMENTATION else [metric, "balanced_accuracy"]
    cells = []
    for partition, epsilon in p.grid.cells():
        runs, not_aggregated = [], []
        for seed in p.grid.seeds:
            name = run_name(partition, epsilon, seed)
            summary = json.loads((runs_dir / name / "summary.json").read_text())
            if not summary.get("aggregated_rounds"):
                not_aggregated.append(name)
            runs.append({"seed": seed, "run": name, "values": run_values(summary, metrics)})
        cells.append({"partition": str(partition), "epsilon": epsilon, "runs": runs,
                      "not_aggregated": not_aggregated, "stats": cell_stats(runs, metrics)})
    return {"dataset": p.settings.dataset, "sites": p.settings.sites, "task": task.value, "metrics": metrics,
            "compare": p.settings.compare, "seeds": list(p.grid.seeds), "interval": INTERVAL_METHOD,
            "runs_dir": RUNS_FOLDER, "settings": p.record, "cells": cells}
