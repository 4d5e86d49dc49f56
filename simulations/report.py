"""Run report: ``report.md`` with PNG plots, and a self-contained ``report.html`` (plots inlined).

Plots: global AUC per round against the pooled / local references, each site's validation AUC per round,
the final model's ROC curve and calibration on the test split, ε per site per round, and participation
(sites contributing / refused / failed / silent) per round; segmentation: Dice per class per round, and test
slices with reference and predicted contours. A site whose ε may be out of date (it went silent after its last
report, or did not report in the last round) is flagged with the round of its last report.

The side-neutral pieces (tables, the ε / per-site validation / participation plots, self-contained HTML) live in
:mod:`common.report_render`, shared with the deployment report (:mod:`server.report`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from common.datasets import Split
from common.io import atomic_write_text
from common.report_render import (
    STALE_NOTE,
    figure_html,
    html_page,
    inline_html,
    md_table_to_html,
    metrics_table,
    plot_epsilon,
    plot_participation,
    plot_site_metric,
    privacy_row,
    save_figure,
    stale_notes,
)
from server.report import participation_notes

__all__ = ["STALE_NOTE", "comparison_table", "decision_text", "participation_notes", "personalisation_table",
           "plot_auc", "plot_calibration", "plot_contours", "plot_dice", "plot_epsilon", "plot_participation",
           "plot_roc", "plot_site_auc", "segmentation_table", "stale_notes", "write_html", "write_report"]


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
    save_figure(fig, path)


def plot_site_auc(rounds: list[dict[str, Any]], path: Path) -> None:
    """Each site's validation AUC of the global model, per round."""
    plot_site_metric(rounds, path, key="auc")


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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


def _models(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The federated, pooled and local-only models' test metrics, as table rows."""
    models = [("federated" + (" (DP)" if summary.get("dp") else ""), summary["federated"])]
    if summary.get("pooled"):
        models.append(("pooled (no DP)", summary["pooled"]))
    models += [(f"local-only {site['site']} (no DP)", site) for site in summary.get("local", [])]
    return models


def segmentation_table(summary: dict[str, Any]) -> str:
    """Markdown table: Dice and HD95 per class of the federated, pooled and local-only models."""
    return metrics_table(_models(summary))


def comparison_table(summary: dict[str, Any]) -> str:
    """Markdown table: federated, pooled and each local-only model on the official test split.

    Ordinal tasks (models scored with ``kappa``) get a last column: quadratic-weighted Cohen's κ.
    """
    models = _models(summary)
    table = metrics_table(models)
    if not any("kappa" in m for _, m in models):
        return table
    head, rule, *rows = table.splitlines()
    cells = [f" {m['kappa']:.3f} |" if isinstance(m.get("kappa"), (int, float)) else " - |" for _, m in models]
    return "\n".join([head + " κ (quadratic) |", rule + "---|", *(r + c for r, c in zip(rows, cells, strict=True))])


def _cell(metrics: dict[str, Any] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def personalisation_table(summary: dict[str, Any]) -> str:
    """Markdown table, one row per site: local-only, federated and personalised on the test split, and ε.

    Classification: AUC and balanced accuracy; segmentation: mean Dice. The federated model is the same for every
    site; ε is the personalisation's own and the site's total (the ledger's composition of every release).
    """
    rows = summary.get("personalised") or []
    local = {row["site"]: row for row in summary.get("local", [])}
    fed = summary.get("federated", {})
    keys = [("dice_mean", "Dice")] if "dice_mean" in fed else [("auc", "AUC"), ("balanced_accuracy", "bal. acc.")]
    head = ["site"] + [f"{who} {name}" for key, name in keys for who in ("local-only", "federated", "personalised")]
    head += ["ε personalisation", "ε site total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["site"]]
        for key, _ in keys:
            cells += [_cell(local.get(row["site"]), key), _cell(fed, key), _cell(row, key)]
        privacy = row.get("privacy", {})
        cells += [_cell(privacy, "epsilon"), _cell(privacy, "epsilon_lifetime")]
        if row.get("refused"):
            cells[len(cells) - 3] = "refused"
        lines.append("| " + " | ".join(cells) + " |")
    refusals = [f"- {row['site']} refused: {row['refused']}" for row in rows if row.get("refused")]
    return "\n".join(lines + (["", *refusals] if refusals else []))


def personalisation_md(summary: dict[str, Any]) -> str:
    """The report's personalisation section (empty when the run did not personalise)."""
    if not summary.get("personalised"):
        return ""
    spec = summary.get("personalisation", {})
    return f"""
## Personalisation

Every site fine-tuned the reported federated model on its own training records with DP-SGD
({spec.get('epochs')} epoch(s), learning rate {spec.get('lr', 0):.4g}), charged to its ledger first, and keeps the
federated model's decision threshold or rule. Local-only models train without DP.

{personalisation_table(summary)}

Guarantee: {spec.get('guarantee', '')}.
"""


def decision_text(fed: dict[str, Any]) -> str:
    """How the reported federated model decides: binary threshold, class offsets or ordinal cut points."""
    decision = fed.get("decision") or {}
    where = ("from the sites' summed validation statistics, each released with Gaussian noise inside the site's ε "
             "(no site's records pooled)")
    if decision.get("kind") == "ordinal-cut-points":
        cuts = ", ".join(f"{c:.3f}" for c in decision["cut_points"])
        return f"expected grade cut at {cuts} (maximising balanced accuracy) {where}"
    if decision.get("kind") == "class-offsets":
        offsets = ", ".join(f"{o:+.1f}" for o in decision["offsets"])
        return f"arg-max of class logits plus offsets {offsets} (each class's one-vs-rest Youden threshold) {where}"
    if decision.get("kind") == "argmax":
        return "plain arg-max (no federated validation statistic to choose a rule from)"
    return f"decision threshold {fed.get('threshold', 0.5):.3f} chosen {where}"


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
    privacy_rows = "\n".join(privacy_row(p) for p in summary.get("privacy", []))
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
    threshold = decision_text(fed)
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
{personalisation_md(summary)}
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


def _personalisation_html(summary: dict[str, Any]) -> str:
    if not summary.get("personalised"):
        return ""
    guarantee = summary.get("personalisation", {}).get("guarantee", "")
    return (f"<h2>Personalisation</h2>\n{md_table_to_html(personalisation_table(summary))}\n"
            f"<p>{html.escape(guarantee)}.</p>\n")


def write_html(path: Path, summary: dict[str, Any], privacy_rows: str, figures: list[tuple[str, str]],
               plots: Path, *, notes: list[str] | None = None) -> None:
    """A single self-contained HTML file: every plot inlined as a base64 PNG, no external resource.

    ``notes`` (stale ε, participation) are listed under the privacy table.
    """
    images = [figure_html(title, plots / name) for title, name in figures]
    privacy_head = ("| site | ε this run | ε lifetime | δ | accountant | sampling | noise multiplier | sample rate "
                    "| reported in round |\n|---|---|---|---|---|---|---|---|---|\n")
    note_items = "".join(f"<li>{inline_html(n)}</li>" for n in notes or [])
    fed = summary["federated"]
    facts = [
        ("dataset", f"{summary['dataset']} ({summary.get('n_test')} test images)"),
        ("sites", f"{summary['sites']} ({summary['partition']}, scanner shift {summary.get('scanner_shift', 0)})"),
        ("model / strategy", f"{summary['model']} / {summary['strategy']}, {summary['rounds']} rounds x "
                             f"{summary['local_epochs']} local epoch(s), seed {summary['seed']}"),
        ("differential privacy", f"ε={summary['epsilon']:g}, δ={summary['delta']:g} per site" if summary.get("dp")
         else "off"),
        ("reported model", f"round {fed.get('round')} (best on federated validation), {decision_text(fed)}"),
    ]
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    body = f"""<h1>medsilo run: {html.escape(summary['dataset'])}, {summary['sites']} simulated hospitals</h1>
<table>{fact_rows}</table>
<h2>Comparison on the official test split</h2>
{md_table_to_html(comparison_table(summary))}
<p>Pooled and local-only models train without DP; AUC intervals are bootstrap 95%.</p>
{_personalisation_html(summary)}<h2>Plots</h2>
{"".join(images)}
<h2>Privacy</h2>
{md_table_to_html(privacy_head + privacy_rows) if privacy_rows else "<p>DP off.</p>"}
{f"<ul>{note_items}</ul>" if note_items else ""}
<h2>Sites</h2>
<pre>{html.escape(summary.get('site_table', ''))}</pre>
"""
    title = f"medsilo run: {summary['dataset']}, {summary['sites']} sites"
    atomic_write_text(path, html_page(title, body))
