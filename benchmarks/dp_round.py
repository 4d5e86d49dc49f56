"""dp_round_seconds_2d / _3d: one site's DP-SGD round on the 2D and on the 3D DP recipe, side by side (issue 27).

Each side is one round of a site's local training as :func:`client.dp.sgd.train_dp` runs it, with the dataset's DP
recipe at ε=8 (:func:`common.recipes.defaults_for`: PneumoniaMNIST's ``auto`` model, ``scatcnn``; AdrenalMNIST3D's
:data:`~common.recipes.VOLUME_DP_DEFAULTS`, ``coarse-3d`` on 28³ volumes) and a site's share of the official
training split, 5 sites (the real records, from ``../shared``). The privacy plan is made for that record count.
A site computes a fixed-feature model's features in its first round and reads them from its cache afterwards:
the first round is timed apart (``..._first``), the rounds after it alternate 2D and 3D so that both see the same
machine noise, and the median of each side is reported. Run alone: ``python benchmarks/dp_round.py``;
``bench.py --only dp-round``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (result suffix, dataset) of each side.
SIDES = (("2d", "pneumoniamnist"), ("3d", "adrenalmnist3d"))
SITES = 5
EPSILON = 8.0


def _site(name: str, cache: Path) -> dict[str, Any]:
    """What one side's rounds need: config, plan, the site's records, the model and its feature cache."""
    import numpy as np

    from client.dp.sgd import plan_for_records
    from common.config import RunConfig
    from common.datasets import dataset_info, load
    from common.features import FeatureCache
    from common.models import build_model, resolve_model_name
    from common.recipes import defaults_for
    from common.training import tensor_dataset

    info = dataset_info(name)
    values = {**defaults_for(name, dp=True, epsilon=EPSILON), "dataset": name, "dp": True, "epsilon": EPSILON}
    values["model"] = resolve_model_name(values["model"], info)
    config = RunConfig(**values)
    train = load(name, download=False).train
    records = tensor_dataset(train.subset(np.arange(len(train) // SITES)), info)
    return {"info": info, "config": config, "plan": plan_for_records(config, len(records)), "records": records,
            "model": build_model(config.model, info, seed=0), "features": FeatureCache(cache / name)}


def _round(side: dict[str, Any], server_round: int) -> float:
    """Seconds of one DP-SGD round of the site, on a fresh copy of the initial model."""
    from client.dp.rng import os_entropy
    from client.dp.sgd import train_dp

    model = copy.deepcopy(side["model"])
    t0 = time.perf_counter()
    result = train_dp(model, side["records"], side["info"].task, side["config"], side["plan"],
                      randomness=os_entropy(), server_round=server_round, features=side["features"])
    seconds = time.perf_counter() - t0
    if result.steps != side["plan"].steps_per_round:
        raise RuntimeError(f"{side['info'].name}: {result.steps} DP-SGD steps, the plan reserved "
                           f"{side['plan'].steps_per_round}")
    return seconds


def dp_round_seconds(*, repeats: int = 3) -> dict[str, Any]:
    """Median DP round time of a site on the 2D and the 3D DP recipe, and each one's first round (features)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {suffix: _site(name, Path(tmp)) for suffix, name in SIDES}
        for suffix, side in sides.items():
            out[f"dp_round_seconds_{suffix}_first"] = _round(side, 1)  # computes and caches the fixed features
        times: dict[str, list[float]] = {suffix: [] for suffix in sides}
        for r in range(repeats):
            for suffix, side in sides.items():
                times[suffix].append(_round(side, 2 + r))
        for suffix, side in sides.items():
            out[f"dp_round_seconds_{suffix}"] = statistics.median(times[suffix])
            out[f"dp_round_{suffix}_setup"] = (
                f"{side['info'].name}, {side['config'].model}, {len(side['records'])} records (1 of {SITES} sites), "
                f"batch {side['config'].batch_size}, {side['config'].local_epochs} local epochs, "
                f"{side['plan'].steps_per_round} steps, ε={EPSILON:g}")
    out["dp_round_repeats"] = repeats
    return out


def print_result(r: dict[str, Any]) -> None:
    """The benchmark's lines in ``make bench``."""
    for suffix in ("2d", "3d"):
        first = r[f"dp_round_seconds_{suffix}_first"]
        print(f"dp_round_seconds_{suffix} {r[f'dp_round_seconds_{suffix}']:.2f}  (one site's DP round, median of "
              f"{r['dp_round_repeats']}; first round, computing its fixed features, {first:.2f} s; "
              f"{r[f'dp_round_{suffix}_setup']})")


def main() -> int:
    """Run the benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = dp_round_seconds(repeats=args.repeats)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
