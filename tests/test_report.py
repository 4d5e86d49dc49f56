"""The run report: Markdown with plots, and a self-contained HTML file that a browser renders with its images."""

from __future__ import annotations

import re

import numpy as np
import pytest
from render_probe import CHROMIUM, rendered_image_widths

from simulations.report import write_report


def _run_outputs() -> tuple[dict, list[dict], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(labels * 0.4 + rng.uniform(0, 0.6, 200), 0, 1)
    sites = ["site-0", "site-1", "site-2"]
    rounds = [
        {"round": r, "sites_sampled": 3 if r else 0, "sites_answered": (2 if r == 2 else 3) if r else 0,
         "sites_failed": 1 if r == 2 else 0, "failures": [], "refused": [], "train_loss": 0.6 if r else None,
         "val": {"auc": 0.6 + 0.05 * r, "threshold": 0.5},
         "val_sites": [{"site": s, "auc": 0.55 + 0.05 * r + 0.01 * i, "n": 20} for i, s in enumerate(sites)],
         "test": {"auc": 0.6 + 0.04 * r},
         "privacy": [{"site": s, "epsilon": 2.5 * r, "delta": 1e-5, "accountant": "prv"} for s in sites] if r else []}
        for r in range(4)
    ]
    fed = {"auc": 0.72, "auc_ci": [0.65, 0.79], "balanced_accuracy": 0.7, "accuracy": 0.7, "sensitivity": 0.7,
           "specificity": 0.7, "threshold": 0.55, "round": 3}
    summary = {
        "dataset": "breastmnist", "task": "binary-class", "sites": 3, "rounds": 3, "local_epochs": 1, "model": "cnn",
        "strategy": "fedavgm", "partition": "dirichlet:0.5", "scanner_shift": 0.0, "seed": 0, "dp": True,
        "epsilon": 8.0, "delta": 1e-5, "n_test": 200, "site_table": "site train val", "federated": fed,
        "pooled": {**fed, "auc": 0.8}, "local": [{**fed, "site": s, "auc": 0.6} for s in sites],
        "privacy": [{"site": s, "epsilon": 7.5, "epsilon_lifetime": 7.5, "delta": 1e-5, "accountant": "prv",
                     "noise_multiplier": 1.1, "sample_rate": 0.2} for s in sites],
    }
    return summary, rounds, labels, scores


def test_report_has_every_plot_and_an_html_file_without_external_resources(tmp_path) -> None:
    # Prepare
    summary, rounds, labels, scores = _run_outputs()
    # Execute
    write_report(tmp_path, summary, rounds, test_labels=labels, test_scores=scores)
    # Assert
    for name in ("auc", "site_auc", "roc", "calibration", "epsilon", "participation"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (tmp_path / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "local-only site-2" in page and "pooled (no DP)" in page
    md = (tmp_path / "report.md").read_text()
    assert "plots/roc.png" in md and "plots/participation.png" in md


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium_with_its_images(tmp_path) -> None:
    # Prepare: the report
    summary, rounds, labels, scores = _run_outputs()
    write_report(tmp_path, summary, rounds, test_labels=labels, test_scores=scores)
    # Execute: rendered, with a probe that records each image's decoded width
    widths, dom = rendered_image_widths(tmp_path / "report.html", tmp_path)
    # Assert: the page loaded and every inlined image decoded to a real width.
    assert len(widths) == 6 and all(w > 100 for w in widths), widths
    assert "medsilo run: breastmnist" in dom
