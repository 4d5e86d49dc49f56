"""Rendering shared by the simulation report and the deployment report: tables, plots and self-contained HTML.

Everything here reads what a run folder already holds (``metrics.jsonl`` lines, ``federated.json``'s privacy
rows, test metrics) and never a record: the side-specific reports (:mod:`simulations.report`,
``server.report``) decide what to show, this module how. Markdown tables and a small Markdown subset
(:func:`markdown_to_html`) become one HTML file with every plot inlined as a base64 PNG and no external
resource; plots are PNGs written atomically (owner-only, like the run's other outputs).
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from common.io import atomic_write_bytes

#: Inline code in a note (`medsilo site ledger`), rendered as <code> in HTML.
CODE = re.compile(r"`([^`]*)`")

#: Bold text in Markdown (``**...**``).
BOLD = re.compile(r"\*\*([^*]+)\*\*")

#: A Markdown image on a line of its own or among others: ``![alt](relative/path.png)``.
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")

#: The note of a site whose ε in the report may not include its latest releases.
STALE_NOTE = ("ε as last reported in round {round}; the site's own ledger is authoritative and may include later "
              "rounds: `medsilo site ledger`")

#: The page's style: the only styling either report uses (no external stylesheet or font).
STYLE = """body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: 4px 8px; }
thead th { background: #f0f0f0; } figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 520px; } figcaption { text-align: center; font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; }
"""

#: Columns of a classification model's test metrics (:func:`metrics_table`).
CLASSIFICATION_COLUMNS = ("auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")


# ---------------------------------------------------------------------------------------------- tables
def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def classification_row(name: str, m: dict[str, Any]) -> str:
    """One model's test metrics as a Markdown table row (AUC, balanced accuracy, ..., AUC 95% CI)."""
    ci = m.get("auc_ci") or [float("nan"), float("nan")]
    txt = " | ".join(_cell(m.get(k)) for k in CLASSIFICATION_COLUMNS)
    return f"| {name} | {txt} | {ci[0]:.3f}–{ci[1]:.3f} |"


def segmentation_row(name: str, m: dict[str, Any], labels: list[str]) -> str:
    """One model's Dice and HD95 per class (and their means) as a Markdown table row."""
    cells = [m.get("dice", {}).get(label) for label in labels] + [m.get("dice_mean")]
    cells += [m.get("hd95", {}).get(label) for label in labels] + [m.get("hd95_mean")]
    return f"| {name} | " + " | ".join(_cell(v) for v in cells) + " |"


def metrics_table(models: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table of models' test metrics: Dice and HD95 per class when the first has ``dice``, else AUC etc.

    Parameters
    ----------
    models
        ``(row name, metrics)`` pairs; the first decides the columns (its ``dice`` labels for segmentation).

    """
    if models and "dice" in models[0][1]:
        labels = list(models[0][1].get("dice", {}))
        head = ["model", *[f"Dice {lb}" for lb in labels], "Dice mean", *[f"HD95 {lb}" for lb in labels],
                "HD95 mean"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + [segmentation_row(name, m, labels) for name, m in models])
    lines = ["| model | AUC | balanced acc. | accuracy | sensitivity | specificity | AUC 95% CI |",
             "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [classification_row(name, m) for name, m in models])


def privacy_row(p: dict[str, Any]) -> str:
    """One site's privacy row of ``federated.json`` as a Markdown table row (9 columns, stale flagged)."""
    reported = p.get("reported_round", p.get("round", ""))
    return (f"| {p['site']} | {p['epsilon']:.3f} | {p.get('epsilon_lifetime', p['epsilon']):.3f} | {p['delta']:g} "
            f"| {p['accountant']} | {p.get('sampling', 'poisson')} "
            f"| {p.get('noise_multiplier', 0):.3f} | {p.get('sample_rate', 0):.4f} "
            f"| {reported}{' (stale: see note)' if p.get('stale') else ''} |")


def stale_notes(privacy: list[dict[str, Any]]) -> list[str]:
    """One note per site whose reported ε may be out of date (``stale`` in ``federated.json``)."""
    return [f"{p['site']}: " + STALE_NOTE.format(round=p.get("reported_round", p.get("round", "?")))
            for p in privacy if p.get("stale")]


# ---------------------------------------------------------------------------------------------- HTML
def inline_html(text: str) -> str:
    """Escape ``text`` for HTML, with its `code` spans and **bold** spans kept as such."""
    return BOLD.sub(r"<strong>\1</strong>", CODE.sub(r"<code>\1</code>", html.escape(text)))


def md_table_to_html(markdown: str) -> str:
    """A Markdown table (header, ``|---|`` rule, rows) as an HTML table; cells escaped."""
    rows = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    rows = [r for r in rows if not all(set(c.strip()) <= {"-"} for c in r)]
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(title: str, png: Path) -> str:
    """A ``<figure>`` holding the PNG ``png`` inline (base64), captioned ``title``."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def html_page(title: str, body: str) -> str:
    """A whole HTML document: ``title`` (escaped here) and ``body`` (already HTML), with :data:`STYLE` inline."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>\n{STYLE}</style></head><body>\n{body}</body></html>\n")


def markdown_to_html(markdown: str, *, base: Path, title: str) -> str:
    """The Markdown subset the reports write, as one self-contained HTML document.

    Headings (``#`` to ``###``), ``- `` lists, tables, fenced code blocks, paragraphs, `code` and **bold**; an
    image ``![alt](path)`` is a PNG under ``base``, inlined as base64 (an image outside ``base`` or missing is
    shown as its alt text). Nothing is linked and nothing is fetched: the page needs no network.
    """
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{html.escape(chr(10).join(block))}</pre>")
        elif stripped.startswith("|"):
            table = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                table.append(lines[i])
                i += 1
            out.append(md_table_to_html("\n".join(table)))
            continue
        elif stripped.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline_with_images(lines[i].strip()[2:], base)}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif heading := re.match(r"(#{1,3}) (.*)", stripped):
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline_html(heading.group(2))}</h{level}>")
        elif stripped:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,3} |- |\||```)", lines[i].strip()):
                paragraph.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline_with_images(' '.join(paragraph), base)}</p>")
            continue
        i += 1
    return html_page(title, "\n".join(out) + "\n")


def _inline_with_images(text: str, base: Path) -> str:
    parts, last = [], 0
    for match in IMAGE.finditer(text):
        parts.append(inline_html(text[last:match.start()]))
        parts.append(_image(match.group(1), match.group(2), base))
        last = match.end()
    parts.append(inline_html(text[last:]))
    return "".join(parts)


def _image(alt: str, target: str, base: Path) -> str:
    root = base.resolve()
    path = (base / target).resolve()
    if path.suffix.lower() != ".png" or not path.is_relative_to(root) or not path.is_file():
        return f"<em>[{html.escape(alt)}]</em>"
    return figure_html(alt, path)


# ---------------------------------------------------------------------------------------------- plots
def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically and owner-only, and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _round_axis(ax: Any) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    _round_axis(ax)
    ax.set_ylabel("ε (δ fixed)")
    ax.set_title("privacy spent per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


#: The flag a site's validation entry sets to 0 when its statistic is undefined, by metric.
DEFINED_FLAG = {"auc": "auc_defined", "dice_mean": "dice_defined"}


def plot_site_metric(rounds: list[dict[str, Any]], path: Path, *, key: str = "auc") -> None:
    """Each site's validation ``key`` (AUC or mean Dice) of the global model per round, and the federation's."""
    label = "Dice" if key == "dice_mean" else "AUC"
    fig, ax = plt.subplots(figsize=(6.4, 4))
    by_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for s in r.get("val_sites", []):
            # a site whose validation records hold one class has no AUC (it sends 0 with auc_defined=0); the
            # coordinator's rows carry a noisy count (n_estimate), the simulation's own rows the count n
            count = s.get("n", s.get("n_estimate"))
            if s.get("site") is not None and s.get(key) is not None and (count is None or count > 0) \
                    and s.get(DEFINED_FLAG.get(key, ""), 1) and np.isfinite(s[key]):
                by_site.setdefault(str(s["site"]), []).append((r["round"], float(s[key])))
    for site, pts in sorted(by_site.items()):
        ax.plot(*zip(*pts, strict=True), marker=".", label=site)
    glob = [(r["round"], r["val"][key]) for r in rounds if (r.get("val") or {}).get(key) is not None]
    if glob:
        ax.plot(*zip(*glob, strict=True), color="black", lw=2, label="federated (summed histograms)"
                if key == "auc" else "federated (summed Dice)")
    _round_axis(ax)
    ax.set_ylabel(f"validation {label}")
    ax.set_title("global model on each site's validation records")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_validation(rounds: list[dict[str, Any]], path: Path, *, key: str, title: str,
                    best_round: int | None = None) -> None:
    """The federation's validation ``key`` (AUC or mean Dice) per round, and the round selected as best.

    Rounds whose line carries test metrics (the coordinator's own test split) add a dotted test curve.
    """
    label = "Dice" if key == "dice_mean" else "AUC"
    fig, ax = plt.subplots(figsize=(6.4, 4))
    val = [(r["round"], float(r["val"][key])) for r in rounds
           if (r.get("val") or {}).get(key) is not None and np.isfinite(r["val"][key])
           and r["val"].get(DEFINED_FLAG[key], 1)]
    test = [(r["round"], float(r["test"][key])) for r in rounds
            if (r.get("test") or {}).get(key) is not None and np.isfinite(r["test"][key])]
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label=f"federated validation {label}")
    if test:
        ax.plot(*zip(*test, strict=True), ls=":", marker=".", label=f"test {label} (coordinator's test split)")
    if best_round is not None:
        ax.axvline(best_round, color="green", ls="--", label=f"selected: round {best_round}")
    _round_axis(ax)
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if val or test or best_round is not None:
        ax.legend(fontsize=8)
    save_figure(fig, path)


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
    _round_axis(ax)
    ax.set_ylabel("sites")
    ax.set_title("participation per round")
    ax.legend(fontsize=8)
    save_figure(fig, path)
