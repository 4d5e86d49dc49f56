"""What leaves a site: every key of every reply against common/wire.py's allow-list, and each release inside ε."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from test_secure_aggregation import _run_round, _write_sites

from client.dp.release import noisy_sum
from client.dp.rng import os_entropy
from common.config import RunConfig
from common.datasets import Task
from common.wire import (
    FIELDS,
    REPLY_PARTS,
    Disclosure,
    SiteReport,
    ValidationLayout,
    WireError,
    decode_values,
    encode_values,
)

#: Flower's record names around a legacy FitRes / EvaluateRes, and which part of the reply each holds.
RECORD_PARTS = {
    "fitres.metrics": "metrics", "evaluateres.metrics": "metrics",
    "fitres.status": "status", "evaluateres.status": "status",
    "fitres.num_examples": "num_examples", "evaluateres.num_examples": "num_examples",
    "fitres.parameters": "parameters", "evaluateres.loss": "loss",
}


def test_a_report_round_trips_and_any_other_key_is_refused() -> None:
    # Prepare
    report = SiteReport(site="st-olav", dp=True, epsilon=1.5, validation="1.000,2.000", validated_round=3)
    # Execute
    metrics = report.to_metrics()
    # Assert: every key is allow-listed, parsing gives the same report, a stray key or type is refused
    assert set(metrics) <= set(FIELDS)
    assert SiteReport.from_metrics(metrics) == report
    with pytest.raises(WireError, match="train_loss"):
        SiteReport.from_metrics({**metrics, "train_loss": 0.3})
    with pytest.raises(WireError, match="epsilon"):
        SiteReport.from_metrics({**metrics, "epsilon": "much"})


def test_every_key_a_site_sends_in_a_secure_dp_run_is_masked_accounted_or_public(tmp_path) -> None:
    # Prepare: three real ClientApps, DP-SGD and SecAgg+, two rounds (the final model validated)
    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=2, local_epochs=1,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=2, epsilon=4.0,
                    accountant="rdp", max_site_records=250, validation_releases=2)
    # Execute
    grid = _run_round(cfg)
    # Assert: each key of each reply (training, SecAgg+ stages, validation) is in the allow-list
    seen: set[str] = set()
    validations = []
    for msg in grid.received:
        assert not msg.has_error(), msg.error.reason if msg.has_error() else None
        content = msg.content
        for name, record in [*content.config_records.items(), *content.metric_records.items()]:
            if name == RECORD_KEY_CONFIGS:
                continue  # SecAgg+'s protocol record: keys, encrypted shares, the masked vector
            part = RECORD_PARTS[name]  # an unknown record name fails here
            if part == "metrics":
                unknown = set(record) - set(FIELDS)
                assert not unknown, f"{name} carries {unknown} outside common/wire.py"
                seen |= set(record)
                report = SiteReport.from_metrics(dict(record))
                if report.validation:
                    validations.append(report)
            elif part != "status":
                assert part in REPLY_PARTS
        for name, arrays in content.array_records.items():
            assert RECORD_PARTS[name] == "parameters" and len(arrays) == 0  # no array in the clear under SecAgg+
    assert "train_loss" not in seen and not any(k.startswith("val-") for k in seen)
    assert {FIELDS[k].disclosure for k in seen} <= set(Disclosure)
    # The validation statistics of both validated models (round 1 in the round-2 exchange, round 2 on its own)
    assert sorted({v.validated_round for v in validations}) == [1, 2]
    assert all(v.validation_noise > 0 for v in validations)


def test_the_validation_release_is_the_exact_sum_plus_gaussian_noise_of_its_sigma() -> None:
    # Prepare: 30 binary validation records' rows
    layout = ValidationLayout(task=Task.BINARY, outputs=1)
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 30), rng.random(30)
    rows = layout.rows(labels, scores)
    exact = rows.sum(axis=0)
    # Execute: many releases at σ = 3
    released = np.stack([noisy_sum(rows, sigma=3.0, rng=os_entropy().numpy_generator("validation", server_round=1))
                         for _ in range(300)])
    noise = released - exact
    # Assert: each row has norm 1 (sensitivity 1), the noise is centred with std σ in every coordinate
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    assert abs(noise.mean()) < 0.1
    assert np.allclose(noise.std(axis=0), 3.0, rtol=0.2)


def test_no_release_lets_the_coordinator_read_a_records_score() -> None:
    # Prepare: two validation sets that differ in one record's score only (its bin moves)
    layout = ValidationLayout(task=Task.BINARY, outputs=1)
    labels = np.array([0, 1, 1, 0, 1] * 6)
    scores = np.linspace(0.05, 0.95, 30)
    moved = scores.copy()
    moved[0] = 0.99
    rng = os_entropy().numpy_generator("validation", server_round=1)
    # Execute: a coordinator's best single-coordinate test on one release of each
    a = noisy_sum(layout.rows(labels, scores), sigma=3.0, rng=rng)
    b = noisy_sum(layout.rows(labels, moved), sigma=3.0, rng=rng)
    exact_diff = layout.rows(labels, moved).sum(axis=0) - layout.rows(labels, scores).sum(axis=0)
    # Assert: the record moves two cells by 1 while the noise is σ = 3 in every cell; nothing equals the exact sums
    assert np.abs(exact_diff).max() == pytest.approx(1.0)
    assert not np.allclose(a, layout.rows(labels, scores).sum(axis=0), atol=0.5)
    assert not np.allclose(b - a, exact_diff, atol=0.5)


@pytest.mark.parametrize(("task", "outputs"), [(Task.BINARY, 1), (Task.MULTICLASS, 5), (Task.MULTILABEL, 3)])
def test_validation_rows_have_unit_norm_and_decode_to_the_exact_histograms(task: Task, outputs: int) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    layout = ValidationLayout(task=task, outputs=outputs)
    if task is Task.BINARY:
        labels, scores = rng.integers(0, 2, 40), rng.random(40)
    elif task is Task.MULTICLASS:
        labels, scores = rng.integers(0, outputs, 40), rng.dirichlet(np.ones(outputs), 40)
    else:
        labels, scores = rng.integers(0, 2, (40, outputs)), rng.random((40, outputs))
    # Execute
    rows = layout.rows(labels, scores)
    hists = layout.histograms(decode_values(encode_values(rows.sum(axis=0)), size=layout.size))
    # Assert: sensitivity 1, and each output's histogram counts every record once
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    assert hists.shape == (outputs, 2, layout.bins)
    assert np.allclose(hists.sum(axis=(1, 2)), 40, atol=0.01)
