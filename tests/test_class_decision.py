"""Multi-class and ordinal decisions chosen from federated DP validation statistics (issue 27).

Independent references: scikit-learn's ``cohen_kappa_score`` for κ, brute force over every monotone assignment for
the ordinal cut points, hand-made histograms for the layout's sums, and synthetic scores with known shifts.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from client.dp.release import noisy_sum
from common.datasets import Task, dataset_info
from common.metrics import (
    Decision,
    balanced_accuracy_from_confusion,
    classification_metrics,
    cuts_from_grade_table,
    offsets_from_histograms,
    quadratic_kappa,
)
from common.wire import VALIDATION_LOGIT_EDGES, ValidationLayout, grade_edges
from server.evaluation import validation_decision


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _under_confident(n: int, priors: np.ndarray, rng: np.random.Generator, *, ordinal: bool) -> tuple:
    """Labels and probabilities of a weak model whose arg-max gives (nearly) everyone the majority class."""
    k = len(priors)
    y = rng.choice(k, size=n, p=priors)
    if ordinal:  # evidence peaks at the true grade, weakly: an expected grade that moves a little with it
        signal = -0.15 * (np.arange(k)[None, :] - y[:, None]) ** 2
    else:
        signal = 0.8 * (np.arange(k)[None, :] == y[:, None])
    z = signal + 1.5 * np.log(priors)[None, :] + rng.normal(0, 0.25, (n, k))
    return y, _softmax(z)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_kappa_matches_scikit_learn(seed: int) -> None:
    # Prepare: random grades, near-correct grades, and a constant prediction (κ 0)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 300)
    cases = [rng.integers(0, 5, 300), np.clip(y + rng.integers(-1, 2, 300), 0, 4)]
    for pred in cases:
        # Execute
        ours = quadratic_kappa(y, pred, classes=5)
        # Assert
        assert ours == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12)
    assert quadratic_kappa(y, np.zeros_like(y), classes=5) == pytest.approx(
        cohen_kappa_score(y, np.zeros_like(y), weights="quadratic"), abs=1e-12)


def test_class_offsets_recover_known_shifts_on_synthetic_scores() -> None:
    # Prepare: class k's one-vs-rest logit is shift_k + 1.5 for its records and shift_k - 1.5 for the others,
    # so its best threshold is shift_k (the middle of the empty gap between them)
    rng = np.random.default_rng(3)
    shifts = np.array([-2.0, 0.0, 1.0, 3.0])
    y = rng.integers(0, 4, 2000)
    z = shifts[None, :] + np.where(np.arange(4)[None, :] == y[:, None], 1.5, -1.5) + rng.uniform(-0.4, 0.4, (2000, 4))
    hists = np.zeros((4, 2, len(VALIDATION_LOGIT_EDGES) + 1))
    for k in range(4):
        np.add.at(hists[k], ((y == k).astype(int), np.searchsorted(VALIDATION_LOGIT_EDGES, z[:, k], side="right")), 1)
    # Execute
    decision = offsets_from_histograms(hists, edges=VALIDATION_LOGIT_EDGES)
    # Assert: the offsets are minus the known shifts, and the rule is then exact on these scores
    assert np.allclose(decision.offsets, -shifts)
    p = 1.0 / (1.0 + np.exp(-z))
    assert np.array_equal(decision.predict(p), y)



def _table_balanced_accuracy(table: np.ndarray, bounds: tuple[int, ...]) -> float:
    """Balanced accuracy of the grade table when bins below each bound go to the lower grade (brute force)."""
    assigned = np.searchsorted(np.asarray(bounds), np.arange(table.shape[1]), side="right")
    cm = np.stack([np.bincount(assigned, weights=row, minlength=table.shape[0]) for row in table])
    return balanced_accuracy_from_confusion(cm)


def test_ordinal_cut_points_are_the_best_monotone_assignment_found_by_brute_force() -> None:
    # Prepare: random noisy tables of 3 grades x 6 bins
    rng = np.random.default_rng(4)
    edges = np.array([0.3, 0.6, 1.0, 1.4, 1.7])
    for _ in range(20):
        table = np.clip(rng.normal(5, 6, (3, 6)), 0, None)
        # Execute
        decision = cuts_from_grade_table(table, edges)
        # Assert: its balanced accuracy on the table equals the best over every pair of run boundaries
        best = max(_table_balanced_accuracy(table, b) for b in itertools.combinations_with_replacement(range(7), 2))
        outer = np.concatenate([[-0.5], edges, [2.5]])
        chosen = tuple(int(np.flatnonzero(outer == c)[0]) for c in decision.cuts)
        assert _table_balanced_accuracy(table, chosen) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("task", [Task.ORDINAL, Task.MULTICLASS])
def test_every_record_adds_a_row_of_norm_at_most_one_and_the_sum_is_the_hand_made_table(task: Task) -> None:
    # Prepare: every (label, expected-grade bin) cell of a 5-grade task, each reached by mixing two one-hots,
    # plus random probabilities
    layout = ValidationLayout(task=task, outputs=5)
    rng = np.random.default_rng(5)
    centres = np.concatenate([[0.0], (grade_edges(5)[:-1] + grade_edges(5)[1:]) / 2, [4.0]])
    probs = []
    for e in centres:  # expected grade e from two neighbouring one-hots
        lo = min(int(np.floor(e)), 3)
        p = np.zeros(5)
        p[lo], p[lo + 1] = lo + 1 - e, e - lo
        probs.append(p)
    probs += list(rng.dirichlet(np.ones(5), 40))
    labels = np.array([g for g in range(5) for _ in probs])
    scores = np.array(probs * 5)
    # Execute
    rows = layout.rows(labels, scores)
    # Assert: each record's row has norm 1 (sensitivity 1 under add/remove) ...
    assert np.linalg.norm(rows, axis=1).max() <= 1.0 + 1e-12
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0)
    # ... and removing any one record moves the sum by at most 1 in L2
    total = rows.sum(axis=0)
    assert max(np.linalg.norm(total - (total - r)) for r in rows) <= 1.0 + 1e-12
    if task is Task.ORDINAL:  # the sum is the true grade x expected-grade table, counted independently
        grade = scores @ np.arange(5)
        bins = np.concatenate([[-np.inf], grade_edges(5), [np.inf]])
        expected = np.stack([np.histogram(grade[labels == g], bins=bins)[0] for g in range(5)])
        assert np.array_equal(layout.grade_table(total), expected)
        assert layout.grade_table(total).shape == (5, layout.bins) and np.all(expected.sum(axis=1) == len(probs))


@pytest.mark.parametrize("ordinal", [True, False])
def test_the_coordinators_rule_beats_plain_argmax_on_an_under_confident_model(ordinal: bool) -> None:
    # Prepare: an imbalanced 5-class task; five sites release noisy sums (σ = 3, as at ε = 8) of their rows
    rng = np.random.default_rng(6)
    priors = np.array([0.45, 0.12, 0.19, 0.18, 0.06])
    task = Task.ORDINAL if ordinal else Task.MULTICLASS
    layout = ValidationLayout(task=task, outputs=5)
    released = np.sum([noisy_sum(layout.rows(*_under_confident(400, priors, rng, ordinal=ordinal)), sigma=3.0,
                                 rng=rng) for _ in range(5)], axis=0)
    y_test, p_test = _under_confident(4000, priors, rng, ordinal=ordinal)
    # Execute
    decision, stats = validation_decision(layout, np.asarray(released))
    plain = classification_metrics(y_test, p_test, task=task)
    chosen = classification_metrics(y_test, p_test, task=task, decision=decision)
    # Assert: arg-max is near chance (one grade for everyone); the chosen rule is well above it
    assert decision is not None and "decision" in stats
    assert plain["balanced_accuracy"] < 0.3
    assert chosen["balanced_accuracy"] > plain["balanced_accuracy"] + 0.15
    if ordinal:
        assert chosen["kappa"] > plain["kappa"] + 0.2 and {"balanced_accuracy", "kappa"} <= set(stats)


def test_a_decision_round_trips_through_its_json_form() -> None:
    # Prepare
    rules = [Decision(cuts=(0.5, 1.25, 2.0, 3.5)), Decision(offsets=(-1.0, 0.0, 2.0))]
    for rule in rules:
        # Execute
        back = Decision.from_meta(json.loads(json.dumps(rule.to_meta())))
        # Assert
        assert back == rule
    assert Decision.from_meta(None) is None and Decision.from_meta({"kind": "argmax"}) is None
    with pytest.raises(ValueError, match="not increasing"):
        Decision(cuts=(1.0, 0.5))


def _write_sites(root: Path, *, classes: int, sizes: tuple[int, ...] = (120, 100, 90)) -> None:
    """Colour sites whose class (grade) shows in the image's brightness, with validation records."""
    from client.data import site_file

    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        labels = rng.integers(0, classes, n + 30)
        images = (rng.integers(0, 80, (n + 30, 28, 28, 3)) + labels[:, None, None, None] * 30).astype(np.uint8)
        buf = io.BytesIO()
        np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:],
                 val_labels=labels[n:])
        site_file(root, i).write_bytes(buf.getvalue())


@pytest.mark.parametrize("dataset", ["retinamnist", "dermamnist"])
def test_a_federation_records_balanced_accuracy_and_for_an_ordinal_task_kappa(tmp_path, monkeypatch,
                                                                                dataset: str) -> None:
    # Prepare: three real ClientApps with DP, one round; the coordinator scores a test split (retinamnist's real
    # one; for dermamnist a synthetic one, as no copy of its file is at hand)
    from flwr.app import Context, RecordDict

    import server.app as server_app
    from common.config import RunConfig
    from server.evaluation import TestSet
    from server.report import build_deployment_report
    from simulations.loopback import LoopbackGrid
    from simulations.reproducible import app as research_app

    info = dataset_info(dataset)
    _write_sites(tmp_path, classes=len(info.labels))
    if dataset == "dermamnist":
        rng = np.random.default_rng(1)
        labels = rng.integers(0, 7, 200)
        x = (rng.normal(0, 1, (200, 3, 28, 28)) + labels[:, None, None, None] * 0.2).astype(np.float32)
        import torch

        monkeypatch.setattr(server_app, "central_test_set",
                            lambda config: TestSet(info=info, x=torch.from_numpy(x), labels=labels))
    cfg = RunConfig(dataset=dataset, site_data_dir=str(tmp_path), batch_size=32, rounds=1, local_epochs=1,
                    model="cnn", strategy="fedavg", server_eval=True, out_dir=str(tmp_path / "run"), min_sites=2,
                    epsilon=8.0, accountant="rdp", max_site_records=250, secure_aggregation=False)
    grid = LoopbackGrid(research_app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)},
                        cfg.to_flower())
    # Execute
    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                  run_config=cfg.to_flower()))
    summary = build_deployment_report(tmp_path / "run")
    # Assert: the round's record has the rule chosen from validation and the test metrics under it
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["round"] == 1][-1]
    assert "balanced_accuracy" in last["test"] and last["test"]["decision"] == last["val"]["decision"]
    federated = json.loads((tmp_path / "run" / "federated.json").read_text())
    assert federated["best"]["decision"] == last["val"]["decision"]
    assert summary["decision"] == last["val"]["decision"]
    report = (tmp_path / "run" / "report.md").read_text()
    if info.ordinal:
        assert last["val"]["decision"]["kind"] == "ordinal-cut-points"
        assert {"balanced_accuracy", "kappa"} <= set(last["val"]) and "kappa" in last["test"]
        assert "val κ (quadratic)" in report and "Cohen's κ on the test split" in report
    else:
        assert last["val"]["decision"]["kind"] == "class-offsets" and "kappa" not in last["test"]
        assert "ovr_balanced_accuracy" in last["val"] and "one-vs-rest balanced acc." in report
