"""medsilo benchmarks: ratios measured side by side in one run (never timed tests).

- dp_step_ratio: DP-SGD step time / plain step time (default 2D model, batch 64, CPU): PneumoniaMNIST's
  auto model, scatcnn, whose trainable part steps on precomputed scattering features, with DP-SGD as local
  training runs it (per-record clipping in one backward pass, client/dp/clipping.py);
  dp_step_ratio_cnn: the same for the compact CNN (auto for 2D datasets of 10,000 records and more);
  dp_step_ratio_resnet18_64: the same for ResNet-18 at 64 pixels (``--only dp-resnet18``, with the DP step's time
  per layer: benchmarks/dp_profile.py).
- gpu: where CUDA is available, DP-SGD steps/s on the GPU and on the CPU and dp_step_ratio on the GPU, for the
  default model and ResNet-18 at 64 and 128 pixels (benchmarks/gpu.py); without a GPU it says it skipped them.
- sim_overhead_ratio: Flower simulation wall time / the same training standalone in one
  process with no federation (3 sites x 5 rounds, no DP, the default model); sim_overhead_ratio_cnn:
  the same with the compact CNN. ray_floor_s: Ray's fixed part alone (start, the simulation's actors
  importing a site's code, stop), measured in the same run.
- site_workers_speedup: one DP round of a site on 1 worker process / on 2 (benchmarks/workers.py).
- dp_round_seconds_2d, dp_round_seconds_3d: one site's DP-SGD round on the 2D DP recipe (PneumoniaMNIST, scatcnn)
  and on the 3D one (AdrenalMNIST3D, coarse-3d on 28³ volumes), measured side by side (benchmarks/dp_round.py).
- sweep_overhead_ratio: a medsilo sweep's wall time / its runs' standalone times (benchmarks/sweep.py).
- sim_secagg_ratio: the SecAgg+ cost in simulation, simulation wall time with SecAgg+ / without (5 sites, DP).
- ingest_ratio, cache_speedup: DICOM ingestion, see benchmarks/ingestion.py.
- secagg_round_ratio_3 / _5, bytes_ratio, client_startup_s: see benchmarks/deployment.py.

Writes benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client.dp.rng import os_entropy  # noqa: E402
from client.dp.sgd import make_private, records_dataset  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.datasets import dataset_info, load  # noqa: E402
from common.io import PUBLIC, atomic_write_json  # noqa: E402
from common.models import build_model, resolve_model_name  # noqa: E402
from common.training import loss_function, on_fixed_features, retain_freed_memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "latest.json"


def _batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's non-empty batches, round after round."""
    while True:
        for xb, yb in loader:
            if len(xb):
                yield xb, yb


def _step(model, opt, batches, loss_fn, backward=torch.Tensor.backward) -> float:
    xb, yb = next(batches)  # fetched outside the timed step, as a batch arrives in training
    dev = next(model.parameters()).device
    t = time.perf_counter()
    xb, yb = xb.to(dev), yb.to(dev)  # as local training moves each batch (no copy on the CPU)
    opt.zero_grad(set_to_none=True)
    backward(loss_fn(model(xb), yb))
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def dp_step_ratio(batch: int = 64, steps: int = 100, repeats: int = 3, model_name: str = "auto", *,
                  size: int = 28, device: str = "cpu", warmup: int = 10) -> dict:
    """Median step time with DP-SGD over plain SGD, alternating to share machine noise.

    The step is the one local training takes, on 10 batches' worth of records: for a model on fixed
    features (``scatcnn``, PneumoniaMNIST's ``auto``) its trainable part on precomputed features; the plain
    step on shuffled batches of ``batch``, the DP step on the Poisson batches (expected size ``batch``) of
    :func:`client.dp.sgd.records_dataset` and :func:`client.dp.sgd.make_private` (clipping in one backward
    pass where the layers allow it, Opacus's secure-mode noise from an OS-entropy generator). Both run under the
    allocator setting every medsilo training process uses (``train_epoch``).

    ``size`` is the input side (a run's ``resolution``); ``device`` where the model trains (``cuda``: the records
    stay in host memory and each batch is moved, as on a site with a GPU); ``warmup`` untimed pairs of steps first.
    """
    retain_freed_memory()
    info = dataset_info("pneumoniamnist", resolution=0 if size == 28 else size)
    cfg = RunConfig()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch * 10, 1, size, size, generator=g)
    labels = torch.randint(0, 2, (batch * 10, 1), generator=g).float()
    loss_fn = loss_function(info.task)

    # What the trainer does: fixed features (if the model has them) once, the trainable part at every step.
    plain_net, records = on_fixed_features(build_model(model_name, info, seed=0).to(device),
                                           TensorDataset(images, labels), augmented=False)
    plain_opt = torch.optim.Adam(plain_net.parameters(), lr=1e-3)
    plain_batches = _batches(DataLoader(records, batch_size=batch, shuffle=True, generator=g))
    dp_net, _ = on_fixed_features(build_model(model_name, info, seed=0).to(device), TensorDataset(images, labels),
                                  augmented=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = make_private(dp_net, torch.optim.Adam(dp_net.parameters(), lr=1e-3), records_dataset(records),
                               sample_rate=1 / 10, noise_multiplier=1.0, max_grad_norm=cfg.max_grad_norm,
                               expected_batch_size=float(batch), randomness=os_entropy(), server_round=1)
    dp_batches = _batches(private.loader)
    for _ in range(warmup):
        _step(plain_net, plain_opt, plain_batches, loss_fn)
        _step(private.model, private.optimizer, dp_batches, loss_fn, private.backward)
    plain, dp = [], []
    for _ in range(repeats * steps):  # one plain step, one DP step: both see the same machine noise
        plain.append(_step(plain_net, plain_opt, plain_batches, loss_fn))
        dp.append(_step(private.model, private.optimizer, dp_batches, loss_fn, private.backward))
    private.close()
    p, d = statistics.median(plain), statistics.median(dp)
    return {"dp_step_ratio": d / p, "plain_step_ms": p * 1e3, "dp_step_ms": d * 1e3, "batch": batch,
            "model": resolve_model_name(model_name, info), "clipping": private.how, "size": size,
            "device": str(device), "dp_steps_per_s": 1 / d, "plain_steps_per_s": 1 / p}


def sim_overhead_ratio(sites: int = 3, rounds: int = 5, model_name: str = "auto") -> dict:
    """Flower simulation wall time over the identical training loop run standalone."""
    from client.trainer import train_plain
    from common.features import FeatureCache
    from common.metrics import score_histogram
    from common.training import ndarrays_to_state, predict_proba, state_to_ndarrays, tensor_dataset
    from simulations.partition import PartitionSpec, scanner_profiles
    from simulations.runner import make_sites, run_federation, write_sites

    data = load("pneumoniamnist")
    info = data.info
    cfg = RunConfig(rounds=rounds, dp=False, server_eval=False, secure_aggregation=False, model=model_name)
    parts = make_sites(data, sites, PartitionSpec("iid"), seed=0)
    profiles = scanner_profiles(sites, strength=0.0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_sites(data, parts, profiles, work / "sites", seed=0)
        # Standalone: the same work in one process: each site's local training, FedAvg by hand,
        # and each site's validation of the new global model, each site keeping its fixed features as a node does.
        t0 = time.perf_counter()
        caches = [FeatureCache(work / "standalone" / f"site-{i}") for i in range(sites)]
        model = build_model(cfg.model, info, seed=0)
        glob = state_to_ndarrays(model)
        for rnd in range(1, rounds + 1):
            news, weights = [], []
            for i, tr in enumerate(parts.train):
                local = build_model(cfg.model, info)
                ndarrays_to_state(local, glob)
                train_set = tensor_dataset(data.train.subset(tr), info)
                train_plain(local, train_set, info.task, cfg, seed=rnd + i, server_round=rnd, features=caches[i])
                news.append(state_to_ndarrays(local))
                weights.append(len(tr))
            glob = [np.asarray(sum(w * n[j] for w, n in zip(weights, news, strict=True)) / sum(weights))
                    for j in range(len(glob))]
            ndarrays_to_state(model, glob)
            for va, cache in zip(parts.val, caches, strict=True):
                val = data.val.subset(va)
                net, scored = on_fixed_features(model, tensor_dataset(val, info), augmented=False, cache=cache)
                score_histogram(val.labels, predict_proba(net, scored.tensors[0], info.task))
        standalone = time.perf_counter() - t0
        fed_cfg = cfg.replace(out_dir=str(work / "out"), site_data_dir=str(work / "sites"), min_sites=sites)
        t0 = time.perf_counter()
        run_federation(fed_cfg, num_sites=sites, work_dir=work)
        simulated = time.perf_counter() - t0
    return {"sim_overhead_ratio": simulated / standalone, "simulation_s": simulated, "standalone_s": standalone,
            "sites": sites, "rounds": rounds, "sim_model": resolve_model_name(model_name, info)}


def sim_secagg_ratio(sites: int = 5, rounds: int = 3, dataset: str = "pneumoniamnist") -> dict:
    """Simulation wall time with SecAgg+ / without: the same DP federation, run alternately (plain, secure, ...).

    The demo's shape (5 sites, DP-SGD, the default model) with fewer rounds; the secure run adds SecAgg+'s three
    extra exchanges per round, its key agreement, masking and unmasking at every site.
    """
    from client.dp.release import count_headroom
    from simulations.partition import PartitionSpec, scanner_profiles
    from simulations.runner import make_sites, run_federation, write_sites

    data = load(dataset)
    parts = make_sites(data, sites, PartitionSpec("dirichlet", 0.5), seed=0)
    cfg = RunConfig(dataset=dataset, rounds=rounds, server_eval=False, accountant="rdp")
    cfg = cfg.replace(max_site_records=max(len(t) for t in parts.train) + count_headroom(epsilon=cfg.epsilon))
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_sites(data, parts, scanner_profiles(sites, strength=0.0, seed=0), work / "sites", seed=0)
        for rep in range(2):
            for secure in (False, True):
                run_dir = work / f"run-{rep}-{int(secure)}"
                run_cfg = cfg.replace(secure_aggregation=secure, out_dir=str(run_dir / "out"),
                                      site_data_dir=str(work / "sites"), min_sites=sites)
                t0 = time.perf_counter()
                run_federation(run_cfg, num_sites=sites, work_dir=run_dir)
                times[secure].append(time.perf_counter() - t0)
    plain, with_secagg = statistics.median(times[False]), statistics.median(times[True])
    return {"sim_secagg_ratio": with_secagg / plain, "sim_secagg_s": with_secagg, "sim_plain_s": plain,
            "sim_secagg_sites": sites, "sim_secagg_rounds": rounds}


def ray_floor_s(sites: int = 3) -> float:
    """Wall time of Ray's fixed part of a simulation, with no Flower and no training.

    Start Ray as :func:`simulations.runner.run_federation` does, the same actors with the same CPU share,
    each importing what a ClientApp's first call imports (``client.site``: torch and the models; Opacus
    only comes under DP, and the benchmark's simulation runs without it), then stop Ray. The simulation pays
    this on top of the work; reported next to its ratio.
    """
    import os

    import ray

    from common.flower_env import apply_flower_environment
    from simulations.runner import actor_layout, ray_runtime

    cpus = os.cpu_count() or 1
    count, share = actor_layout(sites=sites, cpus=cpus)
    with tempfile.TemporaryDirectory() as tmp:
        apply_flower_environment(Path(tmp) / "flwr-home")
        t0 = time.perf_counter()
        with ray_runtime(cpus):

            @ray.remote(num_cpus=share)
            class Site:
                def ready(self) -> bool:
                    import client.site  # noqa: F401

                    return True

            ray.get([actor.ready.remote() for actor in [Site.remote() for _ in range(count)]])  # type: ignore[attr-defined]
        return time.perf_counter() - t0


def dp_resnet18_64(steps: int = 4, repeats: int = 2) -> dict:
    """dp_step_ratio_resnet18_64 (CPU, batch 64), printed with where the DP step's time goes (per layer)."""
    from dp_profile import print_profile, profile_dp_step

    r = dp_step_ratio(model_name="resnet18", size=64, steps=steps, repeats=repeats, warmup=1)
    print(f"dp_step_ratio_resnet18_64 {r['dp_step_ratio']:.2f}  (target <= 1.5; ResNet-18 at 64 px, batch 64, CPU, "
          f"{r['clipping']} clipping, plain {r['plain_step_ms']:.0f} ms, DP {r['dp_step_ms']:.0f} ms per step, "
          f"median of {steps * repeats} alternating pairs)")
    print_profile(profile_dp_step("resnet18", 64, 64, steps=1))
    return {f"{k}_resnet18_64": r[k] for k in ("dp_step_ratio", "plain_step_ms", "dp_step_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None,
                        choices=["dp", "dp-resnet18", "dp-round", "gpu", "workers", "sim", "sim-secagg", "sweep",
                                 "ingest", "secagg", "secagg-small", "bytes", "startup"])
    args = parser.parse_args()
    results: dict = {"torch_threads": torch.get_num_threads(), "numpy": np.__version__, "when": time.time()}
    if args.only in (None, "dp"):
        results.update(dp_step_ratio())
        print(f"dp_step_ratio      {results['dp_step_ratio']:.2f}  (target <= 1.5; {results['model']}, "
              f"{results['clipping']} clipping, plain {results['plain_step_ms']:.1f} ms, "
              f"DP {results['dp_step_ms']:.1f} ms per step)")
        cnn = dp_step_ratio(model_name="cnn")  # the compact CNN, auto for larger datasets
        results.update({f"{k}_cnn": v for k, v in cnn.items() if k in ("dp_step_ratio", "plain_step_ms", "dp_step_ms")})
        print(f"dp_step_ratio_cnn  {cnn['dp_step_ratio']:.2f}  (compact CNN, plain {cnn['plain_step_ms']:.1f} ms, "
              f"DP {cnn['dp_step_ms']:.1f} ms per step)")
    if args.only in (None, "dp-resnet18"):
        results.update(dp_resnet18_64())
    if args.only in (None, "dp-round"):
        from dp_round import dp_round_seconds
        from dp_round import print_result as print_dp_round

        results.update(dp_round_seconds())
        print_dp_round(results)
    if args.only in (None, "gpu"):
        from gpu import gpu_section, print_gpu_section

        section = gpu_section()
        print_gpu_section(section)
        results.update(section)
    if args.only in (None, "workers"):
        from workers import print_result as print_workers
        from workers import site_workers_speedup

        results.update(site_workers_speedup())
        print_workers(results)
    if args.only in (None, "sim"):
        results.update(sim_overhead_ratio())
        results["ray_floor_s"] = ray_floor_s()
        print(f"sim_overhead_ratio {results['sim_overhead_ratio']:.2f}  (target <= 1.3; {results['sim_model']}, "
              f"simulation {results['simulation_s']:.1f} s, standalone {results['standalone_s']:.1f} s; "
              f"Ray alone: start, {results['sites']} actors importing the site's code, stop "
              f"{results['ray_floor_s']:.1f} s)")
        cnn = sim_overhead_ratio(model_name="cnn")
        results.update({f"{k}_cnn": v for k, v in cnn.items() if k in ("sim_overhead_ratio", "simulation_s",
                                                                        "standalone_s")})
        print(f"sim_overhead_ratio_cnn {cnn['sim_overhead_ratio']:.2f}  (compact CNN, simulation "
              f"{cnn['simulation_s']:.1f} s, standalone {cnn['standalone_s']:.1f} s)")
    if args.only in (None, "sim", "sim-secagg"):
        results.update(sim_secagg_ratio())
        print(f"sim_secagg_ratio   {results['sim_secagg_ratio']:.2f}  (SecAgg+ cost in simulation: "
              f"{results['sim_secagg_sites']} sites x {results['sim_secagg_rounds']} DP rounds, "
              f"{results['sim_secagg_s']:.1f} s with SecAgg+ vs {results['sim_plain_s']:.1f} s without)")
    if args.only in (None, "sweep"):
        from sweep import print_result as print_sweep
        from sweep import sweep_overhead_ratio

        results.update(sweep_overhead_ratio())
        print_sweep(results)
    if args.only in (None, "ingest"):
        import subprocess

        with tempfile.TemporaryDirectory() as tmp:  # its own light process (see benchmarks/ingestion.py)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ingestion.py"), "--json", f"{tmp}/i.json"],
                           check=True)
            results.update(json.loads(Path(f"{tmp}/i.json").read_text()))
        print(f"ingest_ratio       {results['ingest_ratio']:.2f}  (target >= 0.9; "
              f"{results['ingest_images_per_s']:.0f} vs "
              f"{results['bare_images_per_s']:.0f} images/s bare dcmread+pixel_array, {results['ingest_files']} files "
              f"{results['ingest_matrix']} px; 1 worker {results['ingest_ratio_1worker']:.2f})")
        print(f"cache_speedup      {results['cache_speedup']:.1f}  (target >= 20; "
              f"epoch {results['decode_epoch_s']:.2f} s "
              f"decoding vs {results['cache_epoch_s']:.3f} s from the cache)")
    if args.only in (None, "bytes"):
        from deployment import bytes_ratio

        results.update(bytes_ratio())
        print(f"bytes_ratio        {results['bytes_ratio']:.3f}  (target <= 1.1; per site per round, SecAgg+; "
              f"plain rounds {results['bytes_ratio_plain']:.3f})")
    if args.only in (None, "startup"):
        from deployment import client_startup_s

        results.update(client_startup_s())
        print(f"client_startup_s   {results['client_startup_s']:.1f}  (`medsilo client start` to joined)")
    if args.only in (None, "secagg"):
        from deployment import secagg_round_ratio

        for nodes in (3, 5):
            results.update(secagg_round_ratio(nodes=nodes))
            print(f"secagg_round_ratio_{nodes} {results[f'secagg_round_ratio_{nodes}']:.2f}  (target <= 1.3; "
                  f"SecAgg+ {results[f'secagg_round_s_{nodes}']:.1f} s vs plain "
                  f"{results[f'plain_round_s_{nodes}']:.1f} s "
                  f"per round, {nodes} SuperNodes, {results['secagg_model_parameters']:,} parameters)")
    if args.only == "secagg-small":  # where the per-stage overhead is most visible: tiny data, 23,585 parameters
        from deployment import secagg_round_ratio

        results.update(secagg_round_ratio(nodes=3, dataset="breastmnist", model="cnn", tag="_small"))
        print(f"secagg_round_ratio_3_small {results['secagg_round_ratio_3_small']:.2f}  (BreastMNIST, compact CNN: "
              f"SecAgg+ {results['secagg_round_s_3_small']:.1f} s vs plain {results['plain_round_s_3_small']:.1f} s)")
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    previous.update(results)
    atomic_write_json(RESULTS, previous, mode=PUBLIC)  # timings, no patient data: readable by all
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
