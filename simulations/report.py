"""Run report: ``report.md`` with PNG plots and the comparison table.

Plots: global AUC per round against the pooled / local references, and ε per site per round.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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


def _row(name: str, m: dict[str, Any]) -> str:
    ci = m.get("auc_ci") or [float("nan"), float("nan")]
    cells = [m.get(k) for k in ("auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")]
    txt = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
    return f"| {name} | {txt} | {ci[0]:.3f}–{ci[1]:.3f} |"


def comparison_table(summary: dict[str, Any]) -> str:
    """Markdown table: federated, pooled and each local-only model on the official test split."""
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


def write_report(run_dir: Path, summary: dict[str, Any], rounds: list[dict[str, Any]]) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``."""
    plots = run_dir / "plots"
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
    text = f"""# medsilo run: {summary['dataset']}, {summary['sites']} simulated hospitals

- partition: `{summary['partition']}`, scanner shift {summary.get('scanner_shift', 0)}; seed {summary['seed']}
- model `{summary['model']}`, strategy `{summary['strategy']}`, {shape}
- differential privacy: {dp_line}
- federated model reported: round {fed.get('round')} (best on federated validation), {threshold}
- all metrics on the official test split ({summary.get('n_test')} images); AUC intervals are bootstrap 95%

## Comparison

{comparison_table(summary)}

Pooled and local-only models train without DP (a hospital alone pays no privacy cost) with the same
model and epoch budget, so the gap to pooled is the full price of federation plus privacy.

![AUC per round](plots/auc.png)

## Privacy

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
