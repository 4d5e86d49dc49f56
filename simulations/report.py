"""Run report: ``report.md`` with PNG plots, and a self-contained ``report.html`` (plots inlined).

Plots: global AUC per round against the pooled / local references, each site's validation AUC per round,
the final model's ROC curve and calibration on the test split, ε per site per round, and participation
(sites contributing / refused / failed / silent) per round; segmentation: Dice per class per round, and test
slices with reference and predicted contours. A site whose ε may be out of date (it went silent after its last
report, or did not report in the last round) is flagged with the round of its last report.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from common.datasets import Split
from common.io import atomic_write_bytes, atomic_write_text
from server.progress import participation_parts

#: Inline code in a note (`medsilo site ledger`), rendered as <code> in HTML.
_CODE = re.compile(r"`([^`]*)`")

#: The note of a site whose ε in the report may not include its latest releases.
STALE_NOTE = ("ε as last reported in round {round}; the site's own ledger is authoritative and may include later "
              "rounds: `medsilo site ledger`")


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _reference_lines(ax: Any, summary: dict[str, Any], key: str, *, pooled_label: str) -> None:
    """The pooled model's ``key`` and the local-only models' mean ``key`` as dashed horizontal lines."""
    if summary.get("pooled"):
        ax.axhline(summary["pooled"][key], color="green", ls="--", label=pooled_label)
    local = [s[key] for s in summary.get("local", []) if s.get(key) is not None]
    if local:
        ax.axhline(sum(local) / len(local), color="red", ls="--", label="local-only mean (no DP)")


def plot_auc(rounds: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Global test AUC per round with the pooled and local-only reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [r["round"] for r in rounds if r.get("test", {}).get("auc") is not None]
    ys = [r["test"]["auc"] for r in rounds if r.get("test", {}).get("auc") is not None]
    ax.plot(xs, ys, marker="o", label="federated (test AUC)")
    val = [(r["round"], r["val"]["auc"]) for r in rounds if r.get("val", {}).get("auc") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), ls=":", marker=".", label="federated (validation AUC)")
    _reference_lines(ax, summary, "auc", pooled_label="pooled (no DP)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
            if not p.get("stale"):  # a stale row repeats the site's last report
                by_site.setdefault(p["site"], []).append((r["round"], p["epsilon"]))
    for site, pts in sorted(by_site.items()):
        ax.plot(*zip(*pts, strict=True), marker=".", label=site)
    if epsilon:
        ax.axhline(epsilon, color="black", ls="--", label="budget")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε (δ fixed)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_site_auc(rounds: list[dict[str, Any]], path: Path) -> None:
    """Each site's validation AUC of the global model, per round."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    by_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for s in r.get("val_sites", []):
            # a site whose validation records hold one class has no AUC (it sends 0 with auc_defined=0)
            if s.get("site") is not None and s.get("auc") is not None and s.get("n", 0) > 0 \
                    and s.get("auc_defined", 1):
                by_site.setdefault(str(s["site"]), []).append((r["round"], float(s["auc"])))
    for site, pts in sorted(by_site.items()):
        ax.plot(*zip(*pts, strict=True), marker=".", label=site)
    glob = [(r["round"], r["val"]["auc"]) for r in rounds if r.get("val", {}).get("auc") is not None]
    if glob:
        ax.plot(*zip(*glob, strict=True), color="black", lw=2, label="federated (summed histograms)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation AUC")
    ax.set_title("global model on each site's validation records")
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
    _reference_lines(ax, summary, "dice_mean", pooled_label="pooled mean (no DP)")
    ax.set_xlabel("round")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['dataset']}: {summary['sites']} sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_participation(rounds: list[dict[str, Any]], path: Path) -> None:
    """Sites whose update is in the aggregate, and those that refused, failed or went silent, in each round."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    rs = [r for r in rounds if r["round"] > 0]
    xs = np.array([r["round"] for r in rs])
    answered = np.array([r.get("sites_answered", 0) for r in rs])
    refused = np.array([len(r.get("refused", [])) for r in rs])
    failed = np.array([r.get("sites_failed", 0) for r in rs])
    dropped = np.array([len(r.get("dropped") or []) for r in rs])
    ax.bar(xs, answered, color="tab:green", label="contributed")
    ax.bar(xs, refused, bottom=answered, color="tab:orange", label="refused")
    ax.bar(xs, failed, bottom=answered + refused, color="tab:red", label="failed")
    ax.bar(xs, dropped, bottom=answered + refused + failed, color="tab:gray", label="silent (no reply)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("sites")
    ax.set_title("participation per round")
    ax.legend(fontsize=8)
    _save(fig, path)


def _binary_view(labels: np.ndarray, scores: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, 0/1 truth, score) pairs: the positive class, or one-vs-rest per class."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return [("positive class", labels.reshape(-1).astype(int), scores)]
    if labels.ndim == 2 and labels.shape[1] == scores.shape[1]:  # multi-label
        return [(f"label {j}", labels[:, j].astype(int), scores[:, j]) for j in range(scores.shape[1])]
    flat = labels.reshape(-1).astype(int)
    return [(f"class {c}", (flat == c).astype(int), scores[:, c]) for c in range(scores.shape[1])]


def plot_roc(labels: np.ndarray, scores: np.ndarray, threshold: float | None, path: Path) -> None:
    """ROC curve of the reported model on the test split (one-vs-rest per class when multi-class)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, truth, score in _binary_view(labels, scores):
        if len(np.unique(truth)) < 2:
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
    if threshold is not None and np.asarray(scores).ndim == 1:
        truth = np.asarray(labels).reshape(-1).astype(int)
        pred = np.asarray(scores) >= threshold
        tpr_t = pred[truth == 1].mean() if (truth == 1).any() else np.nan
        fpr_t = pred[truth == 0].mean() if (truth == 0).any() else np.nan
        ax.plot([fpr_t], [tpr_t], "ko", label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, test split")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_calibration(labels: np.ndarray, scores: np.ndarray, path: Path, bins: int = 10) -> None:
    """Reliability diagram: observed frequency against predicted probability, in equal-width bins."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    edges = np.linspace(0, 1, bins + 1)
    for name, truth, score in _binary_view(labels, scores)[:6]:
        idx = np.clip(np.digitize(score, edges) - 1, 0, bins - 1)
        mean_p = [score[idx == b].mean() for b in range(bins) if (idx == b).any()]
        freq = [truth[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ax.plot(mean_p, freq, marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("calibration, test split")
    ax.legend(fontsize=7)
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


def stale_notes(privacy: list[dict[str, Any]]) -> list[str]:
    """One note per site whose reported ε may be out of date (``stale`` in ``federated.json``)."""
    return [f"{p['site']}: " + STALE_NOTE.format(round=p.get("reported_round", p.get("round", "?")))
            for p in privacy if p.get("stale")]


def participation_notes(rounds: list[dict[str, Any]]) -> list[str]:
    """One line per round in which a site refused, failed or went silent, or nothing was aggregated."""
    return [f"round {r['round']}: " + "".join(text for text, _ in participation_parts(r))
            for r in rounds if r["round"] > 0 and (r.get("refused") or r.get("sites_failed") or r.get("dropped")
                                                   or r.get("halted_stage"))]


def _privacy_row(p: dict[str, Any]) -> str:
    reported = p.get("reported_round", p.get("round", ""))
    return (f"| {p['site']} | {p['epsilon']:.3f} | {p.get('epsilon_lifetime', p['epsilon']):.3f} | {p['delta']:g} "
            f"| {p['accountant']} | {p.get('sampling', 'poisson')} "
            f"| {p.get('noise_multiplier', 0):.3f} | {p.get('sample_rate', 0):.4f} "
            f"| {reported}{' (stale: see note)' if p.get('stale') else ''} |")


def write_report(
    run_dir: Path, summary: dict[str, Any], rounds: list[dict[str, Any]], *,
    test_labels: np.ndarray | None = None, test_scores: np.ndarray | None = None,
    test: Split | None = None, predictions: np.ndarray | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into ``run_dir``.

    Classification: ``test_labels`` and ``test_scores`` (the reported model's scores on the test split) add
    the ROC and calibration plots. Segmentation: ``test`` volumes and ``predictions`` add the contour plot.
    """
    plots = run_dir / "plots"
    segmentation = "dice" in summary.get("federated", {})
    figures: list[tuple[str, str]] = []
    if segmentation:
        plot_dice(rounds, summary, plots / "dice.png")
        figures.append(("Dice per round", "dice.png"))
        if test is not None and predictions is not None:
            plot_contours(test, predictions, list(summary["federated"]["dice"]), plots / "contours.png")
            figures.append(("test slices: reference and prediction", "contours.png"))
    else:
        plot_auc(rounds, summary, plots / "auc.png")
        plot_site_auc(rounds, plots / "site_auc.png")
        figures += [("AUC per round", "auc.png"), ("validation AUC per site", "site_auc.png")]
    eps = summary.get("epsilon") if summary.get("dp") else None
    plot_epsilon(rounds, eps, plots / "epsilon.png")
    plot_participation(rounds, plots / "participation.png")
    if not segmentation and test_labels is not None and test_scores is not None:
        threshold = summary.get("federated", {}).get("threshold")
        plot_roc(test_labels, test_scores, threshold if np.asarray(test_scores).ndim == 1 else None,
                 plots / "roc.png")
        plot_calibration(test_labels, test_scores, plots / "calibration.png")
        figures += [("ROC curve", "roc.png"), ("calibration", "calibration.png")]
    figures += [("ε per site per round", "epsilon.png"), ("participation per round", "participation.png")]
    privacy_rows = "\n".join(_privacy_row(p) for p in summary.get("privacy", []))
    notes = stale_notes(summary.get("privacy", []))
    participation = participation_notes(rounds)
    notes_md = "".join(f"\n- {n}" for n in notes)
    participation_md = "".join(f"\n- {n}" for n in participation) or "\nEvery site asked contributed to every round."
    fed = summary["federated"]
    randomness = summary.get("randomness", "os-entropy")
    noise_source = ("noise and sampling from each site's OS entropy" if randomness == "os-entropy" else
                    "noise and sampling SEEDED from the run's seed (research reruns only: predictable noise)")
    dp_line = (
        f"DP-SGD at every site, ε={summary['epsilon']:g}, δ={summary['delta']:g} per site over the whole run "
        f"(every release: DP-SGD, the record count, validation); privacy unit: "
        f"{summary.get('privacy_unit', 'record')}; {noise_source}"
        if summary.get("dp")
        else "off"
    )
    shape = f"{summary['rounds']} rounds x {summary['local_epochs']} local epoch(s)"
    threshold = (
        f"decision threshold {fed.get('threshold', 0.5):.3f} chosen from the sites' summed validation "
        "histograms, each released with Gaussian noise inside the site's ε (no site's records pooled)"
    )
    roc_md = ("\n![ROC curve](plots/roc.png) ![calibration](plots/calibration.png)\n"
              if (plots / "roc.png").is_file() and test_scores is not None else "")
    site_md = "" if segmentation else "\n![validation AUC per site](plots/site_auc.png)\n"
    metric_note = "AUC intervals are bootstrap 95%"
    curve = "![AUC per round](plots/auc.png)"
    unit_note = ""
    if summary.get("privacy_unit") == "patient" and not segmentation:
        unit_note = ("\n**Privacy unit: the patient.** One DP-SGD unit is one patient with all of their images: "
                     "Poisson sampling draws patients and each patient's gradient is clipped as one.\n")
    elif summary.get("dp") and not segmentation:
        unit_note = ("\n**Privacy unit: the record** (one image): the sites' data carries no patient identity, so a "
                     "patient with k images is protected at about k·ε.\n")
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
{site_md}{roc_md}
## Privacy
{unit_note}
| site | ε this run | ε lifetime (all runs on this data) | δ | accountant | sampling | noise multiplier | sample rate \
| reported in round |
|---|---|---|---|---|---|---|---|---|
{privacy_rows or "| (DP off) | | | | | | | | |"}
{notes_md}

## Participation
{participation_md}

Refusals, failures and silent sites, with their reasons, are listed per round in `metrics.jsonl`.

![ε per round](plots/epsilon.png)

![participation per round](plots/participation.png)

## Sites

```
{summary.get('site_table', '')}
```
"""
    path = run_dir / "report.md"
    atomic_write_text(path, text)
    write_html(run_dir / "report.html", summary, privacy_rows, figures, plots, notes=notes + participation)
    return path


def _md_table_to_html(markdown: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    rows = [r for r in rows if not all(set(c.strip()) <= {"-"} for c in r)]
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, summary: dict[str, Any], privacy_rows: str, figures: list[tuple[str, str]],
               plots: Path, *, notes: list[str] | None = None) -> None:
    """A single self-contained HTML file: every plot inlined as a base64 PNG, no external resource.

    ``notes`` (stale ε, participation) are listed under the privacy table.
    """
    images = []
    for title, name in figures:
        data = base64.b64encode((plots / name).read_bytes()).decode("ascii")
        images.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{html.escape(title)}</figcaption></figure>")
    privacy_head = ("| site | ε this run | ε lifetime | δ | accountant | sampling | noise multiplier | sample rate "
                    "| reported in round |\n|---|---|---|---|---|---|---|---|---|\n")
    note_items = "".join("<li>" + _CODE.sub(r"<code>\1</code>", html.escape(n)) + "</li>" for n in notes or [])
    fed = summary["federated"]
    facts = [
        ("dataset", f"{summary['dataset']} ({summary.get('n_test')} test images)"),
        ("sites", f"{summary['sites']} ({summary['partition']}, scanner shift {summary.get('scanner_shift', 0)})"),
        ("model / strategy", f"{summary['model']} / {summary['strategy']}, {summary['rounds']} rounds x "
                             f"{summary['local_epochs']} local epoch(s), seed {summary['seed']}"),
        ("differential privacy", f"ε={summary['epsilon']:g}, δ={summary['delta']:g} per site" if summary.get("dp")
         else "off"),
        ("reported model", f"round {fed.get('round')} (best on federated validation), threshold "
                           f"{fed.get('threshold', 0.5):.3f}"),
    ]
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>medsilo run: {html.escape(summary['dataset'])}, {summary['sites']} sites</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
thead th {{ background: #f0f0f0; }} figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 520px; }} figcaption {{ text-align: center; font-size: 0.9em; color: #555; }}
pre {{ background: #f7f7f7; padding: 0.8em; }}
</style></head><body>
<h1>medsilo run: {html.escape(summary['dataset'])}, {summary['sites']} simulated hospitals</h1>
<table>{fact_rows}</table>
<h2>Comparison on the official test split</h2>
{_md_table_to_html(comparison_table(summary))}
<p>Pooled and local-only models train without DP; AUC intervals are bootstrap 95%.</p>
<h2>Plots</h2>
{"".join(images)}
<h2>Privacy</h2>
{_md_table_to_html(privacy_head + privacy_rows) if privacy_rows else "<p>DP off.</p>"}
{f"<ul>{note_items}</ul>" if note_items else ""}
<h2>Sites</h2>
<pre>{html.escape(summary.get('site_table', ''))}</pre>
</body></html>
"""
    atomic_write_text(path, doc)
