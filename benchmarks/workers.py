"""site_workers_speedup: one DP-SGD round of a site on 1 worker process / the same round on 2 (issue 26).

Both sides run :func:`client.dp.sgd.train_dp` on the same records, model and privacy plan, alternating
(1, 2, 1, 2 workers), the median of each side taken; the 2-worker round includes starting its worker
processes, as a node pays it every round. On a 2-core machine there is little to gain: the ratio says so
honestly. Run alone: ``python benchmarks/workers.py [--records N] [--json FILE]``; ``bench.py --only workers``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def site_workers_speedup(*, records: int = 4000, repeats: int = 2) -> dict:
    """Median 1-worker round time / median 2-worker round time (compact CNN, 28 px, batch 64, ε=4)."""
    import torch
    from torch.utils.data import TensorDataset

    from client.dp.distributed import SiteCompute
    from client.dp.rng import os_entropy
    from client.dp.sgd import plan_for_records, train_dp
    from common.config import RunConfig
    from common.datasets import dataset_info
    from common.models import build_model

    info = dataset_info("breastmnist")
    config = RunConfig(dataset="breastmnist", model="cnn", batch_size=64, rounds=2, local_epochs=1, epsilon=4.0,
                       accountant="rdp")
    plan = plan_for_records(config, records)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(records, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(0, 2, (records, 1), generator=gen).float()
    model = build_model("cnn", info, seed=0)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):
            trained = copy.deepcopy(model)
            t0 = time.perf_counter()
            train_dp(trained, TensorDataset(x, y), info.task, config, plan, randomness=os_entropy(), server_round=1,
                     compute=SiteCompute(workers, ("cpu",)))
            times[workers].append(time.perf_counter() - t0)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"site_workers_speedup": one / two, "workers_1_round_s": one, "workers_2_round_s": two,
            "workers_records": records, "workers_steps": plan.steps_per_round, "workers_cpus": torch.get_num_threads()}


def print_result(r: dict) -> None:
    """The benchmark's line in ``make bench``."""
    print(f"site_workers_speedup {r['site_workers_speedup']:.2f}  (one DP round, compact CNN, {r['workers_records']} "
          f"records, {r['workers_steps']} steps: 1 worker {r['workers_1_round_s']:.1f} s, 2 workers "
          f"{r['workers_2_round_s']:.1f} s, on {r['workers_cpus']} CPU threads)")


def main() -> int:
    """Run the benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = site_workers_speedup(records=args.records)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
