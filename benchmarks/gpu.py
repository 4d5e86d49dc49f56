"""The GPU section of ``make bench``: DP-SGD steps/s on the GPU and on the CPU, and dp_step_ratio on the GPU.

For the default model (PneumoniaMNIST's auto, at 28 pixels) and ResNet-18 at 64 and 128 pixels, each with the
site's real DP path (benchmarks/bench.py: dp_step_ratio). Without CUDA nothing is measured: the section says it
skipped, and reports no number.
"""

from __future__ import annotations

from typing import Any

import torch

#: (model, input side, timed steps per arm on the GPU, on the CPU): the CPU arm of ResNet-18 is slow, so short.
CASES: tuple[tuple[str, int, int, int], ...] = (("auto", 28, 100, 50), ("resnet18", 64, 30, 3),
                                                ("resnet18", 128, 20, 2))


def gpu_section(cases: tuple[tuple[str, int, int, int], ...] = CASES) -> dict[str, Any]:
    """Measured numbers keyed ``gpu_<model>_<size>_*``; ``{"gpu": "skipped: ..."}`` without CUDA."""
    if not torch.cuda.is_available():
        return {"gpu": "skipped: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)"}
    from bench import dp_step_ratio

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    for model, size, gpu_steps, cpu_steps in cases:
        gpu = dp_step_ratio(model_name=model, size=size, device="cuda", steps=gpu_steps, repeats=1, warmup=5)
        cpu = dp_step_ratio(model_name=model, size=size, device="cpu", steps=cpu_steps, repeats=1, warmup=1)
        tag = f"gpu_{gpu['model']}_{size}"
        out.update({
            f"{tag}_dp_step_ratio": gpu["dp_step_ratio"],
            f"{tag}_dp_steps_per_s": gpu["dp_steps_per_s"],
            f"{tag}_cpu_dp_steps_per_s": cpu["dp_steps_per_s"],
            f"{tag}_speedup": gpu["dp_steps_per_s"] / cpu["dp_steps_per_s"],
            f"{tag}_clipping": gpu["clipping"],
        })
    return out


def print_gpu_section(results: dict[str, Any]) -> None:
    """One line per case, or the line saying the section was skipped."""
    if str(results.get("gpu", "")).startswith("skipped"):
        print(f"gpu                {results['gpu']}: no GPU numbers")
        return
    print(f"gpu                {results['gpu']} (DP-SGD, batch 64, one-pass clipping where the model allows)")
    for key in sorted(k for k in results if k.endswith("_dp_step_ratio") and k.startswith("gpu_")):
        tag = key[: -len("_dp_step_ratio")]
        print(f"  {tag[4:]:<16} dp_step_ratio {results[key]:.2f} on the GPU ({results[tag + '_clipping']}); "
              f"DP steps/s GPU {results[tag + '_dp_steps_per_s']:.1f} "
              f"vs CPU {results[tag + '_cpu_dp_steps_per_s']:.2f} "
              f"({results[tag + '_speedup']:.0f}x)")
