"""Run report: ``report.md`` with PNG plots and the comparison table.

Plots: global AUC per round against the pooled / local references, and ε per site per round;
segmentation: Dice per class per round, and test slices with reference and predicted contours.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.datasets import Split
from common.io import atomic_write_bytes, atomic_write_text


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_auc(rounds: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Global test AUC per round with the pooled and local-only reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [r["round"] for r in rounds if r.get("test", {}).get("auc") is not None]
    ys = [r["test"]["auc"] for r in rounds if r.get("test", {}).get("auc") is not None]
    ax.plot(xs, ys, marker="o", label="federated (test AUC)")
    val = [(r["round"], r["val"]["auc"]) for r in rounds if r.get("val", {}).get("auc") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), ls=":", marker=".", label="federated (validation AUC)")
    if summary.get("pooled"):
        ax.axhline(summary["pooled"]["auc"], color="green", ls="--", label="pooled (no DP)")
    local = [s["auc"] for s in summary.get("local", []) if s.get("auc") is not None]
    if local:
        ax.axhline(sum(local) / len(local), color="red", ls="--", label="local-only mean (no DP)")
    ax.set_xlabel("round")
    ax.set_ylabel("AUC")
    ax.set_title(f"{summary['dataset']}: {summary['sites']} sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_epsilon(rounds: list[dict[str, Any]], epsilon: float | None, path: Path) -> None:
    """ε spent by each site after each round, with the budget line."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    by_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for p in r.get("privacy", []):
            by_site.setdefault(p["site"], []).append((r["round"], p["epsilon"]))
    for site, pts in sorted(by_site.items()):
        ax.plot(*zip(*pts, strict=True), marker=".", label=site)
    if epsilon:
        ax.axhline(epsilon, color="black", ls="--", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (δ fixed)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_dice(rounds: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Test Dice per class per round, with the pooled and local-only mean Dice as reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    tested = [r for r in rounds if r.get("test", {}).get("dice")]
    labels = list(tested[0]["test"]["dice"]) if tested else []
    for label in labels:
        ax.plot([r["round"] for r in tested], [r["test"]["dice"][label] for r in tested], marker="o",
                label=f"federated: {label}")
    if tested:
        ax.plot([r["round"] for r in tested], [r["test"]["dice_mean"] for r in tested], color="black", marker=".",
                label="federated: mean")
    if summary.get("pooled"):
        ax.axhline(summary["pooled"]["dice_mean"], color="green", ls="--", label="pooled mean (no DP)")
    local = [s["dice_mean"] for s in summary.get("local", []) if s.get("dice_mean") is not None]
    if local:
        ax.axhline(sum(local) / len(local), color="red", ls="--", label="local-only mean (no DP)")
    ax.set_xlabel("round")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['dataset']}: {summary['sites']} sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_contours(test: Split, predictions: np.ndarray, labels: list[str], path: Path, *, volumes: int = 4) -> None:
    """One slice (the one with most foreground) of the first test volumes: reference solid, prediction dashed."""
    fig, axes = plt.subplots(1, volumes, figsize=(3.2 * volumes, 3.6), squeeze=False)
    colors = ["#ffcc00", "#00d0ff", "#ff4fd8", "#7cff4f"]
    for ax, i in zip(axes[0], range(min(volumes, len(predictions))), strict=False):
        mask = np.asarray(test.labels[i])
        k = int((mask > 0).reshape(mask.shape[0], -1).sum(axis=1).argmax())
        ax.imshow(np.asarray(test.images[i][k]).T, cmap="gray", origin="lower")
        for c, label in enumerate(labels, start=1):
            color = colors[(c - 1) % len(colors)]
            for source, style in ((mask[k], "solid"), (predictions[i][k], "dashed")):
                if (source == c).any():
                    ax.contour((source == c).T.astype(float), levels=[0.5], colors=[color], linestyles=style,
                               linewidths=1.2, origin="lower")
            ax.plot([], [], color=color, label=label)
        ax.set_title(f"test volume {i}, slice {k}", fontsize=9)
        ax.axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("reference (solid) and federated prediction (dashed)", fontsize=10)
    _save(fig, path)


def _dice_row(name: str, m: dict[str, Any], labels: list[str]) -> str:
    cells = [m.get("dice", {}).get(label) for label in labels] + [m.get("dice_mean")]
    cells += [m.get("hd95", {}).get(label) for label in labels] + [m.get("hd95_mean")]
    return f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |"


def segmentation_table(summary: dict[str, Any]) -> str:
    """Markdown table: Dice and HD95 per class of the federated, pooled and local-only models."""
    labels = list(summary["federated"].get("dice", {}))
    head = ["model", *[f"Dice {lb}" for lb in labels], "Dice mean", *[f"HD95 {lb}" for lb in labels], "HD95 mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             _dice_row("federated" + (" (DP)" if summary.get("dp") else ""), summary["federated"], labels)]
    if summary.get("pooled"):
        lines.append(_dice_row("pooled (no DP)", summary["pooled"], labels))
    for site in summary.get("local", []):
        lines.append(_dice_row(f"local-only {site['site']} (no DP)", site, labels))
    return "\n".join(lines)


def _row(name: str, m: dict[str, Any]) -> str:
    ci = m.get("auc_ci") or [float("nan"), float("nan")]
    cells = [m.get(k) for k in ("auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")]
    txt = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
    return f"| {name} | {txt} | {ci[0]:.3f}–{ci[1]:.3f} |"


def comparison_table(summary: dict[str, Any]) -> str:
    """Markdown table: federated, pooled and each local-only model on the official test split."""
    if "dice" in summary.get("federated", {}):
        return segmentation_table(summary)
    lines = [
        "| model | AUC | balanced acc. | accuracy | sensitivity | specificity | AUC 95% CI |",
        "|---|---|---|---|---|---|---|",
        _row("federated" + (" (DP)" if summary.get("dp") else ""), summary["federated"]),
    ]
    if summary.get("pooled"):
        lines.append(_row("pooled (no DP)", summary["pooled"]))
    for site in summary.get("local", []):
        lines.append(_row(f"local-only {site['site']} (no DP)", site))
    return "\n".join(lines)


def write_report(
    run_dir: Path, summary: dict[str, Any], rounds: list[dict[str, Any]], *,
    test: Split | None = None, predictions: np.ndarray | None = None,
) -> Path:
    """Write ``report.md`` and its plots into ``run_dir`` (segmentation: with ``test`` volumes and predictions)."""
    plots = run_dir / "plots"
    segmentation = "dice" in summary.get("federated", {})
    if segmentation:
        plot_dice(rounds, summary, plots / "dice.png")
        if test is not None and predictions is not None:
            plot_contours(test, predictions, list(summary["federated"]["dice"]), plots / "contours.png")
    else:
        plot_auc(rounds, summary, plots / "auc.png")
    eps = summary.get("epsilon") if summary.get("dp") else None
    plot_epsilon(rounds, eps, plots / "epsilon.png")
    privacy_rows = "\n".join(
        f"| {p['site']} | {p['epsilon']:.3f} | {p.get('epsilon_lifetime', p['epsilon']):.3f} | {p['delta']:g} "
        f"| {p['accountant']} | {p.get('sampling', 'poisson')} "
        f"| {p.get('noise_multiplier', 0):.3f} | {p.get('sample_rate', 0):.4f} |"
        for p in summary.get("privacy", [])
    )
    fed = summary["federated"]
    dp_line = (
        f"DP-SGD at every site, ε={summary['epsilon']:g}, δ={summary['delta']:g} per site over the whole run"
        if summary.get("dp")
        else "off"
    )
    shape = f"{summary['rounds']} rounds x {summary['local_epochs']} local epoch(s)"
    threshold = (
        f"decision threshold {fed.get('threshold', 0.5):.3f} chosen from summed validation histograms "
        "(no site's records pooled)"
    )
    metric_note = "AUC intervals are bootstrap 95%"
    curve = "![AUC per round](plots/auc.png)"
    unit_note = ""
    if segmentation:
        threshold = "per-voxel arg-max (no threshold)"
        metric_note = ("Dice and HD95 (mm) per class on whole volumes (padding and cropping undone), averaged over "
                       "test volumes")
        curve = "![Dice per round](plots/dice.png)\n\n![test slices](plots/contours.png)"
        unit_note = (
            "\n**Privacy unit: the patient.** One DP-SGD record is one patient's volume (each step trains on a "
            "random subset of that patient's slices, or a patch). Poisson sampling draws patients, the gradient "
            "is clipped per patient, and the accountant's sample rate is batch size / patients at the site, so "
            "ε bounds what the run reveals about any one patient with all of their slices together.\n"
        )
    text = f"""# medsilo run: {summary['dataset']}, {summary['sites']} simulated hospitals

- partition: `{summary['partition']}`, scanner shift {summary.get('scanner_shift', 0)}; seed {summary['seed']}
- model `{summary['model']}`, strategy `{summary['strategy']}`, {shape}
- differential privacy: {dp_line}
- federated model reported: round {fed.get('round')} (best on federated validation), {threshold}
- all metrics on the test split ({summary.get('n_test')} records); {metric_note}

## Comparison

{comparison_table(summary)}

Pooled and local-only models train without DP (a hospital alone pays no privacy cost) with the same
model and epoch budget, so the gap to pooled is the full price of federation plus privacy.

{curve}

## Privacy
{unit_note}
| site | ε this run | ε lifetime (all runs on this data) | δ | accountant | sampling | noise multiplier | sample rate |
|---|---|---|---|---|---|---|---|
{privacy_rows or "| (DP off) | | | | | | | |"}

Refused rounds and their reasons (site policy, budget) are listed per round in `metrics.jsonl`.

![ε per round](plots/epsilon.png)

## Sites

```
{summary.get('site_table', '')}
```
"""
    path = run_dir / "report.md"
    atomic_write_text(path, text)
    return path
