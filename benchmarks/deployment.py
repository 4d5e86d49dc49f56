"""Deployment benchmarks: SecAgg+ cost against plain rounds on a real TLS SuperLink with SuperNodes on loopback.

- ``secagg_round_ratio``: mean round wall time with SecAgg+ / without, same federation, same model and
  data (one local epoch of DP-SGD per round), runs interleaved (plain, secure, ...) so both see the same
  machine.
- ``bytes_ratio``: bytes of every message between the coordinator and one site in one round (both
  directions, serialized Flower messages) / (2 x the fp32 model size); through the real workflow and
  ClientApp on an in-process grid.
- ``client_startup_s``: from ``medsilo client start`` to the node's "joined federation" line.
"""

from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _round_times(metrics: Path) -> list[float]:
    """Seconds from sending a round's training request to having its aggregate (every SecAgg+ stage)."""
    from common.io import read_jsonl

    return [float(r["fit_s"]) for r in read_jsonl(metrics) if r["round"] > 0 and r.get("fit_s") is not None]


def secagg_round_ratio(*, nodes: int, dataset: str = "pneumoniamnist", model: str = "resnet18-small",
                       rounds: int = 2, repeats: int = 1, tag: str = "") -> dict[str, Any]:
    """Round wall time with and without SecAgg+ on one deployed federation of ``nodes`` SuperNodes."""
    from client.dp.release import count_headroom
    from client.node import SuperNode
    from client.node import load_kit as load_site_kit
    from common.config import RunConfig
    from common.datasets import load
    from common.models import build_model
    from server.federation import parse_federation
    from server.provision import provision
    from server.superlink import SuperLink, flower_env, sync
    from server.superlink import load_kit as load_coordinator_kit
    from simulations.partition import PartitionSpec, scanner_profiles
    from simulations.runner import make_sites, write_sites

    data = load(dataset)
    params = sum(p.numel() for p in build_model(model, data.info).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"h{i}" for i in range(nodes)]
        spec = parse_federation({"federation": {"name": "bench"},
                                 "coordinator": {"hosts": ["127.0.0.1"], "port": _free_port(), "bind": "127.0.0.1"},
                                 "sites": [{"name": n} for n in names]})
        kits = provision(spec, root / "kits").root
        parts = make_sites(data, nodes, PartitionSpec("iid"), seed=0)
        # The run's ε is the app's default (pyproject.toml): room for the sites' DP estimates of their counts.
        largest = max(len(t) for t in parts.train) + count_headroom(epsilon=RunConfig().epsilon)
        write_sites(data, parts, scanner_profiles(nodes, strength=0.0, seed=0), root / "sites", seed=0)
        coordinator = load_coordinator_kit(kits / "coordinator")
        plain: list[float] = []
        secure: list[float] = []
        with SuperLink(coordinator, log_file=root / "superlink.log"):
            sync(coordinator)
            started = []
            try:
                for i, name in enumerate(names):
                    node = SuperNode(load_site_kit(kits / name), root / "sites" / f"site-{i:02d}.npz",
                                     runtime_port=_free_port(), allow_unmasked=True,
                                     echo=open(root / f"{name}.log", "w"))  # noqa: SIM115 - dies with tmp
                    started.append(node.start(timeout=120))
                for rep in range(repeats):
                    for secagg in (False, True):
                        run_out = root / f"run-{rep}-{int(secagg)}"
                        cfg = (f"dataset='{dataset}' model='{model}' rounds={rounds} min-sites={nodes} local-epochs=1 "
                               f"out-dir='{run_out}' secure-aggregation={str(secagg).lower()} server-eval=false "
                               f"max-site-records={largest} "
                               "accountant='rdp'")
                        result = subprocess.run(
                            [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "bench", "--stream",
                             "-c", cfg], env=flower_env(coordinator), capture_output=True, text=True, timeout=1800)
                        if result.returncode != 0:
                            raise RuntimeError(f"benchmark run failed:\n{result.stdout[-3000:]}")
                        (secure if secagg else plain).extend(_round_times(run_out / "metrics.jsonl"))
            finally:
                for node in started:
                    node.stop()
    key = f"{nodes}{tag}"
    out: dict[str, Any] = {
        f"secagg_round_ratio_{key}": statistics.mean(secure) / statistics.mean(plain),
        f"secagg_round_s_{key}": statistics.mean(secure),
        f"plain_round_s_{key}": statistics.mean(plain),
    }
    if not tag:
        out.update(secagg_model=model, secagg_model_parameters=params, secagg_dataset=dataset)
    return out


def bytes_ratio(*, nodes: int = 3, model: str = "resnet18-small") -> dict[str, Any]:
    """Bytes per site per round (both directions) / (2 x fp32 model), SecAgg+ and plain."""
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_to_proto

    from client.app import app as client_app
    from client.data import site_file
    from client.dp.release import count_headroom
    from common.config import RunConfig
    from common.datasets import dataset_info
    from common.models import build_model
    from server.app import main
    from simulations.loopback import LoopbackGrid

    info = dataset_info("breastmnist")
    model_bytes = 4 * sum(v.numel() for v in build_model(model, info).state_dict().values())
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(nodes):
            labels = rng.integers(0, 2, 80)
            images = rng.integers(0, 255, (80, 28, 28)).astype(np.uint8)
            buf = io.BytesIO()
            np.savez(buf, train_images=images[:64], train_labels=labels[:64], val_images=images[64:],
                     val_labels=labels[64:])
            site_file(tmp, i).write_bytes(buf.getvalue())
        headroom = count_headroom(epsilon=RunConfig().epsilon)
        for secagg in (True, False):
            cfg = RunConfig(dataset="breastmnist", model=model, site_data_dir=tmp, rounds=2, local_epochs=1,
                            server_eval=False, out_dir=f"{tmp}/run-{int(secagg)}", min_sites=nodes,
                            secure_aggregation=secagg, max_site_records=64 + headroom,
                            accountant="rdp")
            grid = LoopbackGrid(client_app, {10 + i: {"partition-id": i} for i in range(nodes)}, cfg.to_flower())
            sent: dict[tuple[str, int], int] = {}  # (round, site) -> bytes both ways
            original = grid.send_and_receive

            def counting(messages, *, timeout=None, _orig=original, _sent=sent):
                messages = list(messages)
                for m in messages:
                    key = (m.metadata.group_id, m.metadata.dst_node_id)
                    _sent[key] = _sent.get(key, 0) + message_to_proto(m).ByteSize()
                replies = list(_orig(messages, timeout=timeout))
                for r in replies:
                    key = (r.metadata.group_id, r.metadata.src_node_id)
                    _sent[key] = _sent.get(key, 0) + message_to_proto(r).ByteSize()
                return replies

            grid.send_and_receive = counting  # type: ignore[method-assign]
            main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
            # Round 1 is a steady-state round; round 2, the last, also sends the final model for evaluation.
            steady = statistics.mean(v for (rnd, _), v in sent.items() if rnd == "1")
            last = statistics.mean(v for (rnd, _), v in sent.items() if rnd == "2")
            key = "bytes_ratio" if secagg else "bytes_ratio_plain"
            out[key] = steady / (2 * model_bytes)
            out[f"{key}_last_round"] = last / (2 * model_bytes)
            out[f"{key}_site_bytes"] = steady
        out["bytes_model_fp32"] = model_bytes
    return out


def client_startup_s() -> dict[str, Any]:
    """Seconds from ``medsilo client start`` to the node's "joined federation" line (SuperLink running)."""
    from server.federation import parse_federation
    from server.provision import provision
    from server.superlink import SuperLink, sync
    from server.superlink import load_kit as load_coordinator_kit

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = parse_federation({"federation": {"name": "bench"},
                                 "coordinator": {"hosts": ["127.0.0.1"], "port": _free_port(), "bind": "127.0.0.1"},
                                 "sites": [{"name": "h0"}]})
        kits = provision(spec, root / "kits").root
        coordinator = load_coordinator_kit(kits / "coordinator")
        (root / "site.npz").write_bytes(b"")
        times = []
        with SuperLink(coordinator):
            sync(coordinator)
            for _ in range(3):
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "common.cli", "client", "start", "--kit", str(kits / "h0"),
                     "--data", str(root / "site.npz"), "--runtime-port", str(_free_port())],
                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                assert proc.stdout is not None
                for line in proc.stdout:
                    if "joined federation" in line:
                        times.append(time.perf_counter() - t0)
                        break
                proc.terminate()
                proc.wait(30)
    return {"client_startup_s": statistics.median(times) if times else float("nan")}
