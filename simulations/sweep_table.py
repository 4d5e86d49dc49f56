"""A sweep's table and plot: per cell (partition × ε), the runs' test metrics across seeds.

Each cell's value is the mean across its seeds with the sample standard deviation and a two-sided 95 %
Student-t interval, ``mean ± t(0.975, n - 1) · sd / √n`` (``sd`` with ``n - 1`` degrees of freedom): the
seeds are independent repetitions (their own partition draw, initial model and, unless ``--reproducible``,
DP noise), and the interval is for the mean over such repetitions. One seed gives no interval.

The pooled and local-only references are the ones each run trains beside its federation (``--compare``):
without DP, with that run's model and epoch budget, so they change with ε only where the dataset's recipe
does (e.g. another model with DP-SGD than without). The local-only value of a run is the mean over its sites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from common.io import atomic_write_json, atomic_write_text
from common.report_render import save_figure

CONFIDENCE = 0.95
INTERVAL_METHOD = ("two-sided 95% Student-t interval across seeds: mean ± t(0.975, n-1) · sd/√n, sd the sample "
                   "standard deviation (n-1); no interval for a single seed")
NO_DP = "no DP"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample standard deviation and Student-t interval of ``values`` (``ci`` ``None`` below 2 values).

    Raises
    ------
    ValueError
        When ``values`` is empty or ``confidence`` is not in (0, 1).

    """
    from scipy.stats import t

    if not values:
        raise ValueError("received no values; a t-interval needs at least one")
    if not 0 < confidence < 1:
        raise ValueError(f"received confidence={confidence}; use a level in (0, 1), e.g. 0.95")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def headline_metric(task: str) -> str:
    """The summary key a sweep compares: mean Dice for segmentation, AUC otherwise."""
    return "dice_mean" if task == "segmentation" else "auc"


def run_values(summary: dict[str, Any], metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """One run's federated, pooled and local-only (mean over sites) value of each metric."""
    def value(d: dict[str, Any] | None, key: str) -> float | None:
        v = (d or {}).get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    local = summary.get("local") or []
    out: dict[str, dict[str, float | None]] = {"federated": {}, "pooled": {}, "local": {}}
    for key in metrics:
        out["federated"][key] = value(summary.get("federated"), key)
        out["pooled"][key] = value(summary.get("pooled"), key) if summary.get("pooled") else None
        site_values = [v for v in (value(s, key) for s in local) if v is not None]
        out["local"][key] = math.fsum(site_values) / len(site_values) if site_values else None
    return out


def cell_stats(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Across a cell's runs (each ``{"seed", "run", "values"}``): the interval of every model's every metric."""
    stats: dict[str, Any] = {}
    for model in ("federated", "pooled", "local"):
        stats[model] = {}
        for key in metrics:
            vals = [r["values"][model][key] for r in runs if r["values"][model][key] is not None]
            if vals:
                stats[model][key] = {**t_interval(vals), "values": vals}
    return stats


def epsilon_label(epsilon: float | None) -> str:
    """``8`` for ε = 8, ``no DP`` for a run without DP."""
    return NO_DP if epsilon is None else f"{epsilon:g}"


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    text = f"{stat['mean']:.3f}"
    if stat["sd"] is not None:
        lo, hi = stat["ci"]
        text += f" ± {stat['sd']:.3f} [{lo:.3f}, {hi:.3f}]"
    return text


def markdown(table: dict[str, Any]) -> str:
    """``sweep.md``: one row per cell, mean ± sd [95 % interval] across seeds."""
    metrics = table["metrics"]
    names = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "dice_mean": "Dice"}
    head = ["partition", "ε", "seeds", *[f"federated {names[m]}" for m in metrics]]
    if table["compare"]:
        head += [f"pooled {names[metrics[0]]} (no DP)", f"local-only {names[metrics[0]]} (no DP)"]
    head.append("not aggregated")
    rows = []
    for cell in table["cells"]:
        st = cell["stats"]
        row = [cell["partition"], epsilon_label(cell["epsilon"]), str(len(cell["runs"])),
               *[_fmt(st["federated"].get(m)) for m in metrics]]
        if table["compare"]:
            row += [_fmt(st["pooled"].get(metrics[0])), _fmt(st["local"].get(metrics[0]))]
        row.append(", ".join(cell["not_aggregated"]) or "–")
        rows.append(row)
    lines = [
        f"# Sweep: {table['dataset']}, {table['sites']} sites",
        "",
        f"Test-split metrics of each cell's runs (seeds {', '.join(map(str, table['seeds']))}); "
        f"mean ± sd [95% interval]. Interval: {table['interval']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    if table["compare"]:
        lines += ["Pooled and local-only models train without DP in each run, with that run's model and epoch budget "
                  "(local-only: the mean over sites); they differ across ε only where the recipe does.", ""]
    lines += [f"Run folders: {table['runs_dir']}/<run>/ (each as `medsilo simulate --out` writes it).", ""]
    return "\n".join(lines)


def plot(table: dict[str, Any], path: Path) -> None:
    """``sweep.png``: the federated headline metric against ε per partition, "no DP" at the right."""
    metric = table["metrics"][0]
    finite = sorted({c["epsilon"] for c in table["cells"] if c["epsilon"] is not None})
    top = max(finite) if finite else 1.0
    no_dp_x = top * 4  # one step right of the largest ε on the log axis
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, partition in enumerate(dict.fromkeys(c["partition"] for c in table["cells"])):
        color = colors[i % len(colors)]
        cells = sorted((c for c in table["cells"] if c["partition"] == partition),
                       key=lambda c: math.inf if c["epsilon"] is None else c["epsilon"])
        xs = [no_dp_x if c["epsilon"] is None else c["epsilon"] for c in cells]

        def series(model: str, cells: list[dict[str, Any]] = cells) -> list[dict[str, Any] | None]:
            return [c["stats"][model].get(metric) for c in cells]

        fed = series("federated")
        pts = [(x, s) for x, s in zip(xs, fed, strict=True) if s]
        if pts:
            ys = [s["mean"] for _, s in pts]
            err = [[s["mean"] - s["ci"][0] if s["ci"] else 0 for _, s in pts],
                   [s["ci"][1] - s["mean"] if s["ci"] else 0 for _, s in pts]]
            ax.errorbar([x for x, _ in pts], ys, yerr=err, marker="o", capsize=3, color=color,
                        label=f"federated, {partition}")
        for model, ls, name in (("pooled", "--", "pooled"), ("local", ":", "local-only mean")):
            ref = [(x, s["mean"]) for x, s in zip(xs, series(model), strict=True) if s]
            if ref:
                ax.plot(*zip(*ref, strict=True), ls=ls, color=color, alpha=0.8, label=f"{name} (no DP), {partition}")
    ax.set_xscale("log")
    ticks = [*finite, no_dp_x] if any(c["epsilon"] is None for c in table["cells"]) else finite
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ([NO_DP] if len(ticks) > len(finite) else []))
    ax.minorticks_off()
    ax.set_xlabel("ε per site (δ fixed)")
    ax.set_ylabel({"auc": "test AUC", "dice_mean": "test Dice"}.get(metric, metric))
    ax.set_title(f"{table['dataset']}: {table['sites']} sites, 95% t-intervals over {len(table['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(out: Path, table: dict[str, Any]) -> None:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out``."""
    atomic_write_json(out / "sweep.json", table)
    atomic_write_text(out / "sweep.md", markdown(table))
    plot(table, out / "sweep.png")
