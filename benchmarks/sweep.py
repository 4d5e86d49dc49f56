"""sweep_overhead_ratio: a ``medsilo sweep``'s wall time / the sum of its runs' times each run standalone.

The sweep (:func:`simulations.sweep.run_sweep`: validation, every run in one Ray session, the table and plot)
is timed as a whole; then each of its runs is timed as ``medsilo simulate`` runs it (build_simulation and
run_simulation in this process, Ray started and stopped by the run), into a folder of its own. Both sides
run in one process after the same imports, so neither pays Python's start-up. The target is <= 1.1: the
sweep's own work (one Ray start, validation, table) is paid once, and each standalone run pays Ray's start
and stop itself.

Run alone: ``python benchmarks/sweep.py [--json FILE]``; ``bench.py --only sweep`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sweep_overhead_ratio(*, dataset: str = "breastmnist", sites: int = 2, rounds: int = 2,
                         epsilons: tuple[str, ...] = ("8", "none"), seeds: tuple[str, ...] = ("0", "1"),
                         compare: bool = False) -> dict:
    """Sweep wall time over the sum of the same runs' standalone times (see the module docstring)."""
    import flwr.simulation  # noqa: F401  (imported before either side is timed)
    import ray  # noqa: F401

    import client.site  # noqa: F401
    from common.recipes import RECIPE_OPTIONS
    from simulations.experiment import build_simulation, run_simulation
    from simulations.sweep import SweepSettings, config_values, parse_grid, run_name, run_sweep

    options = {name: None for name in RECIPE_OPTIONS} | {"rounds": rounds, "local_epochs": 1}
    with tempfile.TemporaryDirectory() as tmp:
        settings = SweepSettings(dataset=dataset, sites=sites, partitions=["dirichlet:0.5"], epsilons=list(epsilons),
                                 seeds=list(seeds), out=Path(tmp) / "sweep", options=options, compare=compare)
        t0 = time.perf_counter()
        run_sweep(settings)
        sweep_s = time.perf_counter() - t0
        grid = parse_grid(dataset=dataset, epsilons=list(epsilons), seeds=list(seeds), partitions=["dirichlet:0.5"])
        standalone: dict[str, float] = {}
        for partition, epsilon in grid.cells():
            for seed in grid.seeds:
                name = run_name(partition, epsilon, seed)
                t0 = time.perf_counter()
                sim, data = build_simulation(config_values=config_values(settings, epsilon, seed), sites=sites,
                                             partition=str(partition), out=str(Path(tmp) / "alone" / name),
                                             scanner_shift=0.0, compare=compare, overwrite=False)
                run_simulation(sim, data)
                standalone[name] = time.perf_counter() - t0
    total = sum(standalone.values())
    return {"sweep_overhead_ratio": sweep_s / total, "sweep_s": sweep_s, "sweep_standalone_s": total,
            "sweep_runs": len(standalone), "sweep_shape": f"{dataset}, {sites} sites x {rounds} rounds, "
            f"ε {' '.join(epsilons)} x seeds {' '.join(seeds)}{'' if compare else ', --no-compare'}"}


def print_result(r: dict) -> None:
    """One line, as bench.py prints its ratios."""
    print(f"sweep_overhead_ratio {r['sweep_overhead_ratio']:.2f}  (target <= 1.1; {r['sweep_shape']}: sweep "
          f"{r['sweep_s']:.1f} s vs {r['sweep_runs']} standalone runs {r['sweep_standalone_s']:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--epsilons", nargs="+", default=["8", "none"], help="the issue's grid: 1 4 8 none")
    parser.add_argument("--seeds", nargs="+", default=["0", "1"], help="the issue's grid: 0 1 2")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    result = sweep_overhead_ratio(rounds=args.rounds, sites=args.sites, epsilons=tuple(args.epsilons),
                                  seeds=tuple(args.seeds))
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
