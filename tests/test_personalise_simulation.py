"""``simulate --personalise-epsilon``: every simulated site fine-tunes the federated model; the summary and the report
carry local-only, federated and personalised per site."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from client.data import site_file
from client.dp.ledger import ledgers_in
from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import Split, dataset_info
from common.models import build_model
from server.evaluation import TestSet as Scorer
from simulations.experiment import Simulation, _personalise
from simulations.partition import PartitionSpec
from simulations.personalisation import PersonaliseSpec
from simulations.report import write_report

INFO = dataset_info("breastmnist")


def _split(n: int, seed: int) -> Split:
    """28-pixel images whose label says which half is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(60, 120, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i][:, 14:] += 80 * int(label)
    return Split(images, labels.astype(np.int64))


def _sites(site_dir: Path, sizes: list[int]) -> None:
    site_dir.mkdir(parents=True)
    for site, n in enumerate(sizes):
        train, val = _split(n, site), _split(30, 100 + site)
        buf = io.BytesIO()
        np.savez(buf, train_images=train.images, train_labels=train.labels, val_images=val.images,
                 val_labels=val.labels)
        site_file(site_dir, site).write_bytes(buf.getvalue())


def test_a_personalised_run_reports_local_federated_and_personalised_per_site(tmp_path) -> None:
    # Prepare: a finished federation's folder (two sites' files, the reported model) and its summary so far
    run_dir = tmp_path / "run"
    _sites(run_dir / "sites", [160, 120])
    config = RunConfig(dataset="breastmnist", model="cnn", batch_size=32, seed=0, accountant="rdp", epsilon=8.0,
                       out_dir=str(run_dir), site_data_dir=str(run_dir / "sites"))
    save_checkpoint(run_dir / "model-best.safetensors", build_model("cnn", INFO, seed=0).state_dict(),
                    {"dataset": "breastmnist", "model": "cnn"})
    fed = {"auc": 0.71, "balanced_accuracy": 0.62, "threshold": 0.37, "round": 3}
    summary = {
        "dataset": "breastmnist", "task": "binary-class", "sites": 2, "rounds": 3, "local_epochs": 1, "model": "cnn",
        "strategy": "fedavg", "partition": "iid", "seed": 0, "dp": True, "epsilon": 8.0, "delta": 1e-5,
        "n_test": 80, "site_table": "", "federated": fed, "aggregated_rounds": 3,
        "local": [{"site": "site-0", "auc": 0.93, "balanced_accuracy": 0.81},
                  {"site": "site-1", "auc": 0.64, "balanced_accuracy": 0.55}],
        "privacy": [], "timing_s": {},
    }
    sim = Simulation(config=config, sites=2, partition=PartitionSpec.parse("iid")[0], split=None,  # type: ignore[arg-type]
                     out=run_dir, personalise=PersonaliseSpec(epsilon=2.0, epochs=1))
    test_set = Scorer.from_split(_split(80, 7), INFO)

    # Execute
    _personalise(sim, config, run_dir, test_set, summary)
    write_report(run_dir, summary, [])

    # Assert: per site the personalised model's test metrics and its ε, within the personalisation budget
    rows = summary["personalised"]
    assert [r["site"] for r in rows] == ["site-0", "site-1"]
    for row in rows:
        assert 0 <= row["auc"] <= 1 and 0 <= row["balanced_accuracy"] <= 1
        assert row["threshold"] == 0.37  # the federated model's decision threshold, a DP release
        assert 2.0 - 0.02 <= row["privacy"]["epsilon"] <= 2.0
        assert row["privacy"]["epsilon_lifetime"] == pytest.approx(row["privacy"]["epsilon"])  # no earlier release
    assert summary["personalisation"]["epsilon"] == 2.0 and "composition" in summary["personalisation"]["guarantee"]
    # each site's own ledger holds its personalisation
    for site in (0, 1):
        (ledger,), _ = ledgers_in(run_dir / "sites" / f"site-{site:02d}-state")
        assert ledger.summary(accountant="rdp")["releases"] == {"count": 1, "personalise": 1}
    # the report's table: local-only, federated and personalised side by side, for every site
    report = (run_dir / "report.md").read_text()
    assert "## Personalisation" in report
    assert "local-only AUC | federated AUC | personalised AUC" in report
    assert f"| site-0 | 0.930 | 0.710 | {rows[0]['auc']:.3f} |" in report
    assert f"| site-1 | 0.640 | 0.710 | {rows[1]['auc']:.3f} |" in report
    assert "Personalisation" in (run_dir / "report.html").read_text()


def test_personalisation_settings_are_checked_with_the_rest_of_the_run() -> None:
    # Prepare
    bad = PersonaliseSpec(epsilon=0.0, epochs=0, lr=-1.0)

    # Execute
    problems = bad.problems(dp=False)

    # Assert: every problem at once, each naming its flag
    assert len(problems) == 4
    for flag in ("--personalise-epsilon 0.0", "--personalise-epochs 0", "--personalise-lr -1.0", "--no-dp"):
        assert any(flag in p for p in problems), flag
