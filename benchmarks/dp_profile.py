"""Where a DP-SGD step's time goes, layer by layer: forward, the backward to the layers' outputs, and per layer
the clipper's per-record norms and its clipped sum (client/dp/clipping.py: PerRecordClipper), then the noised
optimiser step. Measured on the site's own path (client/dp/sgd.py: make_private) without changing it: the
clipper's per-layer method is wrapped with a timer on the instance the step uses.

Run alone: ``.venv/bin/python benchmarks/dp_profile.py --model resnet18 --size 64``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client.dp.rng import os_entropy  # noqa: E402
from client.dp.sgd import make_private, records_dataset  # noqa: E402
from common.datasets import dataset_info  # noqa: E402
from common.models import build_model  # noqa: E402
from common.training import loss_function, retain_freed_memory  # noqa: E402


def _describe(layer: nn.Module, a: torch.Tensor) -> str:
    """A layer by kind, shape and input side (layers alike are summed together)."""
    side = f"@{a.shape[-1]}px" if a.ndim == 4 else ""
    if isinstance(layer, nn.Conv2d):
        k = "x".join(str(v) for v in layer.kernel_size)
        return f"conv {layer.in_channels}->{layer.out_channels} {k}/{layer.stride[0]} {side}"
    if isinstance(layer, nn.GroupNorm):
        return f"groupnorm {layer.num_channels} {side}"
    if isinstance(layer, nn.Linear):
        return f"linear {layer.in_features}->{layer.out_features}"
    return type(layer).__name__


def profile_dp_step(model_name: str = "resnet18", size: int = 64, batch: int = 64, steps: int = 3) -> dict[str, Any]:
    """Median time per part of a DP-SGD step (one-pass clipping) and of the plain step on the same batches.

    Returns ``{"plain": {...}, "dp": {...}, "layers": {layer: {"norms_ms", "sum_ms"}}}``, times in milliseconds.
    """
    retain_freed_memory()
    info = dataset_info("pneumoniamnist", resolution=0 if size == 28 else size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch * 10, 1, size, size, generator=g)
    labels = torch.randint(0, 2, (batch * 10, 1), generator=g).float()
    loss_fn = loss_function(info.task)
    net = build_model(model_name, info, seed=0)
    plain_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    plain: dict[str, list[float]] = defaultdict(list)
    batches = iter(DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, generator=g))
    for _ in range(steps + 1):
        xb, yb = next(batches)
        t0 = time.perf_counter()
        plain_opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xb), yb)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        plain_opt.step()
        t3 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
            plain[key].append(value)

    dp_net = build_model(model_name, info, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = make_private(dp_net, torch.optim.Adam(dp_net.parameters(), lr=1e-3),
                               records_dataset(TensorDataset(images, labels)), sample_rate=1 / 10,
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=float(batch),
                               randomness=os_entropy(), server_round=1)
    if private.how != "one-pass":
        private.close()
        raise RuntimeError(f"{model_name} trains with {private.how}, not the one-pass clipper this profile times")
    clipper = private.backward.__self__  # type: ignore[attr-defined]
    layer_times: dict[str, dict[str, float]] = defaultdict(lambda: {"norms_ms": 0.0, "sum_ms": 0.0})
    inner: Callable[..., Any] = clipper._layer

    def timed_layer(layer: nn.Module, a: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Callable]:
        name = _describe(layer, a)
        t = time.perf_counter()
        sq, clipped = inner(layer, a, grad)
        layer_times[name]["norms_ms"] += (time.perf_counter() - t) * 1e3

        def timed_sum(c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            t = time.perf_counter()
            out = clipped(c)
            layer_times[name]["sum_ms"] += (time.perf_counter() - t) * 1e3
            return out

        return sq, timed_sum

    clipper._layer = timed_layer  # the instance's method only: the clipper's code is unchanged
    dp: dict[str, list[float]] = defaultdict(list)
    dp_batches = (b for b in private.loader if len(b[0]))
    timed = 0
    for step in range(steps + 1):
        xb, yb = next(dp_batches)
        if step == 1:  # the first step warms up; the layers' times are summed over the others
            layer_times.clear()
        t0 = time.perf_counter()
        private.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(private.model(xb), yb)
        t1 = time.perf_counter()
        private.backward(loss)
        t2 = time.perf_counter()
        private.optimizer.step()
        t3 = time.perf_counter()
        if step:
            timed += 1
            for key, value in (("forward", t1 - t0), ("clipped backward", t2 - t1), ("noised step", t3 - t2)):
                dp[key].append(value)
    private.close()
    layers = {name: {k: v / timed for k, v in t.items()} for name, t in layer_times.items()}
    in_layers = sum(t["norms_ms"] + t["sum_ms"] for t in layers.values())
    dp_ms = {k: statistics.median(v) * 1e3 for k, v in dp.items()}
    dp_ms["of which: layers' norms and sums"] = in_layers
    dp_ms["of which: autograd to the layers' outputs and the rest"] = dp_ms["clipped backward"] - in_layers
    return {"model": model_name, "size": size, "batch": batch,
            "plain": {k: statistics.median(v[1:]) * 1e3 for k, v in plain.items()},
            "dp": dp_ms, "layers": layers}


def print_profile(profile: dict[str, Any], top: int = 12) -> None:
    """The profile as a table: the plain step's parts, the DP step's, then the costliest layers."""
    print(f"DP step profile: {profile['model']} at {profile['size']} px, batch {profile['batch']} (ms, median)")
    for part in ("plain", "dp"):
        print("  " + part + ": " + ", ".join(f"{k} {v:.0f}" for k, v in profile[part].items()))
    ranked = sorted(profile["layers"].items(), key=lambda kv: -(kv[1]["norms_ms"] + kv[1]["sum_ms"]))
    print(f"  layers (summed over layers alike, per step; {top} costliest): norms | clipped sum")
    for name, t in ranked[:top]:
        print(f"    {name:<32} {t['norms_ms']:8.0f} | {t['sum_ms']:8.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print_profile(profile_dp_step(args.model, args.size, args.batch, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
