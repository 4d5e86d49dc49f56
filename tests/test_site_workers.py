"""A site's DP-SGD round on several worker processes: the same mechanism as one process, noised once, failing cleanly.

With the record and with the patient as the privacy unit. Every test runs 2 gloo workers on the CPU (spawned
processes that import this module for the hooks below).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from site_workers_hooks import ZeroGradient, kill_rank_1, note_start, note_step
from torch import nn
from torch.utils.data import TensorDataset

from client.data import site_file
from client.dp import worker_job
from client.dp.accounting import PrivacyPlan
from client.dp.distributed import SiteCompute, single_process_reason, site_compute
from client.dp.ledger import data_source
from client.dp.patients import patient_groups
from client.dp.rng import reproducible
from client.dp.sgd import dp_epoch, make_private, records_dataset, train_dp
from client.dp.worker_job import WorkerFailure, WorkerHooks, train_workers
from client.site import REQUEST_FAILED, SiteClient
from client.site_check import compute_summary
from client.trainer import DriftCorrection, make_optimizer, round_lr
from common.config import RunConfig
from common.datasets import Task, dataset_info
from common.errors import ConfigError
from common.models import build_model
from common.site_policy import template
from common.training import loss_function

TWO_CPU_WORKERS = SiteCompute(workers=2, devices=("cpu",))


# ------------------------------------------------------------------------------ helpers
def _worker_pids(folder: Path) -> set[int]:
    return {int(p.name.split("-")[2]) for p in folder.glob("pid-*")}


def _ranks(folder: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in folder.glob("rank-*")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


def _hooks(monkeypatch: pytest.MonkeyPatch, folder: Path, on_step: Callable[[str, int], None] = note_step,
           gradient_file: str | None = None) -> None:
    """Workers note their pids and steps in ``folder``; ``on_step`` runs as each step starts."""
    monkeypatch.setattr(worker_job, "TEST_HOOKS", WorkerHooks(
        on_start=partial(note_start, str(folder)), on_step=partial(on_step, str(folder)), gradient_file=gradient_file))


# ------------------------------------------------------------------------------ models and records
def _records(n: int = 48, d: int = 12, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _plan(*, sigma: float, q: float, records: int) -> PrivacyPlan:
    steps = int(1 / q)
    return PrivacyPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, planned_steps=steps,
                       records_estimate=records, expected_batch_size=q * records)


def _single_process_round(net: nn.Module, data: TensorDataset, config: RunConfig, plan: PrivacyPlan,
                          seed: int) -> list[torch.Tensor]:
    """One process, the same mechanism (make_private, its DPDataLoader's batches), one epoch; the last gradient."""
    randomness = reproducible(seed=seed, site=0)
    private = make_private(net, make_optimizer(net, round_lr(config.dp_lr, config, 1), config.weight_decay),
                           records_dataset(data), sample_rate=plan.sample_rate,
                           noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
                           expected_batch_size=plan.expected_batch_size, randomness=randomness, server_round=1)
    dp_epoch(private, loss_function(Task.MULTICLASS), proximal=None, augment=None)
    private.close()
    return [p.grad.detach().clone() for p in net.parameters() if p.grad is not None]


# ------------------------------------------------------------------------------ the mechanism
def test_two_workers_without_noise_take_exactly_the_single_process_steps(tmp_path, monkeypatch) -> None:
    # Prepare: σ = 0 through the plan (a test's plan, never a run-config key); 3 steps of q = 0.3 over 48 records.
    config = RunConfig(dataset="breastmnist", local_epochs=1)
    plan = _plan(sigma=0.0, q=0.3, records=48)
    data = _records()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    reference = copy.deepcopy(model)
    _hooks(monkeypatch, tmp_path, gradient_file=str(tmp_path / "gradient.pt"))
    # Execute
    loss, steps = train_workers(model, data, Task.MULTICLASS, config, plan, randomness=reproducible(seed=7, site=0),
                                server_round=1, compute=TWO_CPU_WORKERS)
    expected_gradient = _single_process_round(reference, data, config, plan, seed=7)
    # Assert: both workers stepped; the clipped sum / q·N̂ and the weights are the single process's.
    assert steps == 3 and math.isfinite(loss) and _ranks(tmp_path) == {0, 1}
    gradient = torch.load(tmp_path / "gradient.pt", weights_only=True)
    assert any(g.abs().sum() > 0 for g in gradient)
    for got, want in zip(gradient, expected_gradient, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_noise_is_added_once_not_once_per_worker(tmp_path, monkeypatch) -> None:
    # Prepare: every record's gradient is zero, so the last step's update is the noise over q·N̂ alone.
    config = RunConfig(dataset="breastmnist", local_epochs=1, max_grad_norm=1.5)
    sigma, q, records, inputs = 0.8, 0.5, 40, 2000
    plan = _plan(sigma=sigma, q=q, records=records)
    x = torch.randn(records, inputs)
    _hooks(monkeypatch, tmp_path, gradient_file=str(tmp_path / "gradient.pt"))
    # Execute
    train_workers(ZeroGradient(inputs), TensorDataset(x, torch.zeros(records, dtype=torch.long)), Task.MULTICLASS,
                  config, plan, randomness=reproducible(seed=3, site=0), server_round=1, compute=TWO_CPU_WORKERS)
    # Assert: sum(g²)/s² over n coordinates is χ²(n) for s = σ·C/(q·N̂): within 6 standard deviations (√(2n)) of
    # n; noise drawn once per worker would give 2n, over 60 standard deviations away at n = 4002.
    noise = torch.cat([g.reshape(-1) for g in torch.load(tmp_path / "gradient.pt", weights_only=True)]).double()
    n, s = noise.numel(), sigma * config.max_grad_norm / (q * records)
    statistic = float((noise**2).sum()) / s**2
    assert abs(statistic - n) < 6 * math.sqrt(2 * n), (statistic, n)
    assert abs(float(noise.mean())) < 6 * s / math.sqrt(n)


# ------------------------------------------------------------------------------ at a site: ledger and failures
def _site(root: Path, n: int = 90, images_per_patient: int | None = None) -> None:
    """A site file of ``n`` training images; with ``images_per_patient``, its patients too (the patient unit)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n + 30)
    images = (rng.integers(0, 120, (n + 30, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    extra: dict[str, Any] = {}
    if images_per_patient is not None:
        extra["train_patients"] = rng.permutation(n) // images_per_patient
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:], val_labels=labels[n:],
             **extra)
    site_file(root, 0).write_bytes(buf.getvalue())
    (root / "site-policy.toml").write_text(template(epsilon_per_run=4.0, epsilon_lifetime=6.0, delta=1e-5))


def _client(root: Path, workers: int) -> SiteClient:
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(root), batch_size=32, rounds=2, epsilon=4.0,
                    accountant="rdp")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "workers": workers, "devices": "cpu"},
                  state=RecordDict(), run_config=cfg.to_flower())
    return SiteClient(ctx, randomness=reproducible(seed=0, site=0))


def _initial() -> list[np.ndarray]:
    return [v.numpy() for v in build_model("auto", dataset_info("breastmnist"), seed=0).state_dict().values()]


def _ledger_rows(root: Path) -> list[dict]:
    source = data_source({"partition-id": 0}, {"site-data-dir": str(root)})
    path = root / "site-00-state" / f"ledger-{source.key}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("owner", "time", "at", "created")}
            for r in rows if r["kind"] in ("plan", "reserve", "claim", "complete")]


def test_two_workers_write_the_ledger_entries_of_one(tmp_path, monkeypatch) -> None:
    # Prepare: the same site twice, the same reproducible count release, hence the same plan.
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        _site(root)
    steps = tmp_path / "steps"
    steps.mkdir()
    _hooks(monkeypatch, steps)
    # Execute
    _, n1, m1 = _client(one, workers=1).fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    _, n2, m2 = _client(two, workers=2).fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # Assert: the 2-worker round ran on 2 workers, trained, and its plan, reservation and completion are the same.
    assert _ranks(steps) == {0, 1}
    assert not m1.get("refused") and not m2.get("refused") and n1 == n2 > 0
    assert m1["steps"] == m2["steps"] > 0 and m1["epsilon"] == m2["epsilon"]
    rows = _ledger_rows(two)
    assert rows == _ledger_rows(one)
    assert [(r["kind"], r["mechanism"]) for r in rows if r["kind"] != "plan"] == [
        ("reserve", "count"), ("complete", "count"), ("reserve", "dp-sgd"), ("complete", "dp-sgd")]


def test_a_worker_killed_mid_round_fails_it_cleanly_and_the_retry_is_charged_once(tmp_path, monkeypatch) -> None:
    # Prepare: worker 1 kills itself as its first step starts.
    _site(tmp_path)
    steps = tmp_path / "steps"
    steps.mkdir()
    _hooks(monkeypatch, steps, on_step=kill_rank_1)
    site = _client(tmp_path, workers=2)
    # Execute
    update, n, metrics = site.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    pids = _worker_pids(steps)
    # Assert: the round failed (nothing sent), no worker is left, the reservation is on file and counts.
    assert metrics["refused"] and metrics["reason"] == REQUEST_FAILED and n == 0
    assert all(not u.any() for u in update)
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    failed = [(r["kind"], r["mechanism"], r.get("steps")) for r in _ledger_rows(tmp_path)
              if r.get("mechanism") == "dp-sgd"]
    assert failed[0][:2] == ("reserve", "dp-sgd") and failed[1:] == [("complete", "dp-sgd", 0)]
    spent = site.ledger.spent(delta=1e-5, accountant="rdp", run=1)
    # Execute: the coordinator retries the round; the workers live.
    monkeypatch.setattr(worker_job, "TEST_HOOKS", None)
    _, n, metrics = site.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # Assert: the retry trained and was charged once more (one more reservation, no more).
    assert not metrics.get("refused") and n > 0
    reserves = [r for r in _ledger_rows(tmp_path) if r["kind"] == "reserve" and r["mechanism"] == "dp-sgd"]
    assert len(reserves) == 2 and reserves[0] == reserves[1]
    assert site.ledger.spent(delta=1e-5, accountant="rdp", run=1) > spent


def test_a_failing_worker_raises_a_clear_error_and_leaves_no_process(tmp_path, monkeypatch) -> None:
    # Prepare
    config = RunConfig(dataset="breastmnist", local_epochs=1)
    _hooks(monkeypatch, tmp_path, on_step=kill_rank_1)
    # Execute
    with pytest.raises(WorkerFailure, match=r"worker 1 of 2 died .* nothing was sent") as failure:
        train_workers(nn.Linear(12, 2), _records(), Task.MULTICLASS, config, _plan(sigma=1.0, q=0.3, records=48),
                      randomness=reproducible(seed=1, site=0), server_round=1, compute=TWO_CPU_WORKERS)
    # Assert
    assert "SIGKILL" in str(failure.value)
    pids = _worker_pids(tmp_path)
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


# ------------------------------------------------------------------------------ the patient as the unit
#: 6 patients of 3, 1, 2, 4, 2 and 3 images, interleaved.
PATIENT_KEYS = ["d", "a", "b", "d", "c", "d", "e", "f", "b", "d", "f", "c", "e", "d", "f"]


#: The round's seed: its sampling generator draws 2 patients, none, then 1 and 1 (q = 0.25).
PATIENT_SEED = 9


def _patient_records(d: int = 12, seed: int = 2) -> tuple[TensorDataset, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(PATIENT_KEYS), d, generator=gen)
    return TensorDataset(x, torch.randint(0, 3, (len(PATIENT_KEYS),), generator=gen)), patient_groups(PATIENT_KEYS)


def _clipped_patient_sum(net: nn.Module, data: TensorDataset, groups: np.ndarray, drawn: list[int],
                         clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """Independently: each drawn patient's gradient by plain autograd over their images, clipped by hand, summed."""
    x, y = data.tensors
    params = list(net.parameters())
    total = [torch.zeros_like(p) for p in params]
    factors = []
    for patient in drawn:
        idx = torch.from_numpy(np.flatnonzero(groups == patient))
        grads = torch.autograd.grad(loss_function(Task.MULTICLASS)(net(x[idx]), y[idx]), params)
        norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        factors.append(min(1.0, clip / (norm + 1e-6)))
        total = [t + factors[-1] * g for t, g in zip(total, grads, strict=True)]
    return total, factors


def test_two_workers_without_noise_take_the_single_process_patient_steps(tmp_path, monkeypatch) -> None:
    # Prepare: σ = 0 through the plan (a test's plan, never a run-config key); 4 steps of q = 0.25 over 6 patients.
    data, groups = _patient_records()
    q, patients = 0.25, int(groups.max()) + 1
    plan = _plan(sigma=0.0, q=q, records=patients)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    single, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    norms = [math.sqrt(sum(float((g * g).sum()) for g in _clipped_patient_sum(model, data, groups, [i], 1e9)[0]))
             for i in range(patients)]
    clip = float(np.median(norms))  # about half the patients clipped
    config = RunConfig(dataset="breastmnist", local_epochs=1, max_grad_norm=clip)
    _hooks(monkeypatch, tmp_path, gradient_file=str(tmp_path / "gradient.pt"))
    # Execute: 2 workers; one process; by hand, on the patients the round's sampling generator draws.
    two = train_dp(model, data, Task.MULTICLASS, config, plan, randomness=reproducible(seed=PATIENT_SEED, site=0),
                   server_round=1, patients=groups, compute=TWO_CPU_WORKERS)
    one = train_dp(single, data, Task.MULTICLASS, config, plan, randomness=reproducible(seed=PATIENT_SEED, site=0),
                   server_round=1, patients=groups)
    from opacus.data_loader import DPDataLoader

    draws = [batch[0].tolist() for batch in DPDataLoader(  # the patients one process's loader draws
        TensorDataset(torch.arange(patients)), sample_rate=q,
        generator=reproducible(seed=PATIENT_SEED, site=0).torch_generator("sampling", server_round=1))]
    adam = torch.optim.Adam(by_hand.parameters(), lr=round_lr(config.dp_lr, config, 1),
                            weight_decay=config.weight_decay)
    factors: list[float] = []
    for drawn in draws:
        total, step_factors = _clipped_patient_sum(by_hand, data, groups, drawn, clip)
        factors += step_factors
        for p, t in zip(by_hand.parameters(), total, strict=True):
            p.grad = t / (q * patients)
        adam.step()
    # Assert: both workers stepped, on batches they split, on a batch of one patient (rank 1's share empty) and on
    # an empty batch; clipping bit; the last gradient (the clipped sum / q·P̂) and the weights are the single
    # process's and the hand computation's.
    assert two.steps == one.steps == len(draws) == 4 and _ranks(tmp_path) == {0, 1}
    assert {0, 1} < {len(d) for d in draws} and max(len(d) for d in draws) >= 2 and len(draws[-1]) > 0
    assert min(factors) < 1.0 and max(factors) == 1.0
    assert two.train_loss == pytest.approx(one.train_loss, rel=1e-6)
    gradient = torch.load(tmp_path / "gradient.pt", weights_only=True)
    assert any(g.abs().sum() > 0 for g in gradient)
    for got, want, hand in zip(gradient, [p.grad for p in single.parameters()],
                               [p.grad for p in by_hand.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)
    for got, want, hand in zip(model.parameters(), single.parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)


def test_patient_noise_is_added_once_not_once_per_worker(tmp_path, monkeypatch) -> None:
    # Prepare: every patient's gradient is zero, so the last step's update is the noise over q·P̂ alone.
    config = RunConfig(dataset="breastmnist", local_epochs=1, max_grad_norm=1.5)
    sigma, q, patients, inputs = 0.8, 0.5, 20, 2000
    plan = _plan(sigma=sigma, q=q, records=patients)
    x = torch.randn(2 * patients, inputs)
    data = TensorDataset(x, torch.zeros(2 * patients, dtype=torch.long))
    _hooks(monkeypatch, tmp_path, gradient_file=str(tmp_path / "gradient.pt"))
    # Execute
    result = train_dp(ZeroGradient(inputs), data, Task.MULTICLASS, config, plan,
                      randomness=reproducible(seed=3, site=0), server_round=1, patients=np.arange(2 * patients) // 2,
                      compute=TWO_CPU_WORKERS)
    # Assert: sum(g²)/s² over n coordinates is χ²(n) for s = σ·C/(q·P̂): within 6 standard deviations (√(2n)) of
    # n; noise drawn once per worker would give 2n, over 60 standard deviations away at n = 4002.
    assert result.steps == 2 and _ranks(tmp_path) == {0, 1}
    noise = torch.cat([g.reshape(-1) for g in torch.load(tmp_path / "gradient.pt", weights_only=True)]).double()
    n, s = noise.numel(), sigma * config.max_grad_norm / (q * patients)
    statistic = float((noise**2).sum()) / s**2
    assert abs(statistic - n) < 6 * math.sqrt(2 * n), (statistic, n)
    assert abs(float(noise.mean())) < 6 * s / math.sqrt(n)


def test_two_workers_write_the_ledger_entries_of_one_for_the_patient_unit(tmp_path, monkeypatch) -> None:
    # Prepare: the same patient-unit site (90 images of 30 patients) twice, the same reproducible count release.
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        _site(root, images_per_patient=3)
    steps = tmp_path / "steps"
    steps.mkdir()
    _hooks(monkeypatch, steps)
    # Execute
    _, n1, m1 = _client(one, workers=1).fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    ranks_of_one = _ranks(steps)
    _, n2, m2 = _client(two, workers=2).fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # Assert: the 2-worker round ran on 2 workers, trained, and its plan (over patients), reservation and
    # completion are one process's.
    assert ranks_of_one == set() and _ranks(steps) == {0, 1}
    assert not m1.get("refused") and not m2.get("refused") and n1 == n2 > 0
    assert m1["steps"] == m2["steps"] > 0 and m1["epsilon"] == m2["epsilon"]
    rows = _ledger_rows(two)
    assert rows == _ledger_rows(one)
    plan = next(r["plan"] for r in rows if r["kind"] == "plan")
    assert abs(plan["records_estimate"] - 30) < abs(plan["records_estimate"] - 90)  # patients counted, not images
    assert plan["expected_batch_size"] == pytest.approx(plan["sample_rate"] * plan["records_estimate"])
    assert [(r["kind"], r["mechanism"]) for r in rows if r["kind"] != "plan"] == [
        ("reserve", "count"), ("complete", "count"), ("reserve", "dp-sgd"), ("complete", "dp-sgd")]
    assert [r["steps"] for r in rows if r["kind"] == "complete" and r["mechanism"] == "dp-sgd"] == [m2["steps"]]


class _LayerNormHead(nn.Module):
    """A model with a layer the one-pass clipper cannot clip (LayerNorm's affine weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(12), nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def test_the_patient_unit_no_longer_falls_back_to_one_process() -> None:
    # Prepare
    supported, other = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2)), _LayerNormHead()
    # Execute
    patients = single_process_reason(supported, patients=True)
    patients_other_layers = single_process_reason(other, patients=True)
    records = single_process_reason(supported, patients=False)
    records_other_layers = single_process_reason(other, patients=False)
    # Assert: patients and supported records run on several workers (SCAFFOLD or not: the reason no longer asks);
    # the one-pass clipper's layer support binds records only (a patient's gradient comes from torch.func).
    assert patients is None and patients_other_layers is None and records is None
    assert records_other_layers is not None and "norm (LayerNorm)" in records_other_layers


# ------------------------------------------------------------------------------ SCAFFOLD on several workers
@pytest.mark.parametrize("unit", ["record", "patient"])
def test_two_workers_take_the_single_process_scaffold_steps_and_return_its_control_variate(
        unit, tmp_path, monkeypatch, caplog) -> None:
    # Prepare: σ = 0 and the same seed, so every round draws the same units; a correction c - c_i of about the
    # normalised gradients' size; the same round with a zero correction beside it.
    if unit == "record":
        data, groups, plan = _records(), None, _plan(sigma=0.0, q=0.3, records=48)
    else:
        data, groups = _patient_records()
        plan = _plan(sigma=0.0, q=0.25, records=int(groups.max()) + 1)
    config = RunConfig(dataset="breastmnist", local_epochs=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    single, uncorrected = copy.deepcopy(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    correction = [0.05 * torch.randn(p.shape, generator=gen) for p in model.parameters()]

    def scaffold(net: nn.Module, scale: float) -> DriftCorrection:
        return DriftCorrection({p: scale * c for p, c in zip(net.parameters(), correction, strict=True)})

    drift_two, drift_one, drift_zero = scaffold(model, 1.0), scaffold(single, 1.0), scaffold(uncorrected, 0.0)
    _hooks(monkeypatch, tmp_path)

    def round_of(net: nn.Module, drift: DriftCorrection, compute: SiteCompute | None) -> int:
        return train_dp(net, data, Task.MULTICLASS, config, plan, randomness=reproducible(seed=PATIENT_SEED, site=0),
                        server_round=1, patients=groups, drift=drift, compute=compute).steps
    # Execute: 2 workers; one process; one process with a zero correction.
    steps = round_of(model, drift_two, TWO_CPU_WORKERS)
    ranks_of_two = _ranks(tmp_path)
    round_of(single, drift_one, None)
    round_of(uncorrected, drift_zero, None)
    # Assert: the round ran on both workers (no fall-back) and stepped as planned; its weights and its new control
    # variate (the mean of the noised gradients stepped on) are one process's.
    assert ranks_of_two == {0, 1} and "runs in one process" not in caplog.text
    assert steps == drift_two.steps == drift_one.steps == plan.steps_per_round
    two, one = drift_two.mean_gradients(), drift_one.mean_gradients()
    assert len(two) == len(one) == len(correction) and any(float(g.abs().sum()) > 0 for g in two.values())
    for mine, theirs in zip(model.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(two[mine], one[theirs], atol=1e-6, rtol=1e-5)
    # Assert: the correction was applied; without it the weights, hence the later gradients, differ far beyond that.
    zero = drift_zero.mean_gradients()
    pairs = list(zip(model.parameters(), uncorrected.parameters(), strict=True))
    assert max(float((a - b).detach().abs().max()) for a, b in pairs) > 1e-3
    assert max(float((two[a] - zero[b]).abs().max()) for a, b in pairs) > 1e-4


# ------------------------------------------------------------------------------ the hospital's setting
def test_the_compute_is_the_nodes_setting_and_a_run_config_cannot_set_it() -> None:
    # Prepare
    run_config = RunConfig(dataset="breastmnist").to_flower()
    # Execute
    compute = site_compute({"workers": 2, "devices": "cpu"})
    default = site_compute({})
    # Assert: the node config sets it; the coordinator's run config has no such key.
    assert compute == TWO_CPU_WORKERS and compute.resolved() == ["cpu", "cpu"] and compute.backend() == "gloo"
    assert default.workers == 1 and default.devices == ("auto",)
    with pytest.raises(ConfigError, match="unknown setting 'workers'"):
        RunConfig.from_flower({**run_config, "workers": 2})
    with pytest.raises(ConfigError, match="unknown setting 'devices'"):
        RunConfig.from_flower({**run_config, "devices": "cuda:0"})


@pytest.mark.parametrize(("node_config", "expected"), [
    ({"workers": 0}, "workers=0 is not an integer >= 1"),
    ({"workers": "many"}, "workers='many' is not an integer >= 1"),
    ({"devices": "tpu:0"}, "names 'tpu:0'; expected auto, cpu or cuda:N"),
    ({"devices": "auto,cpu"}, "mixes auto with devices"),
])
def test_a_bad_compute_setting_is_refused_with_its_value(node_config, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        site_compute(node_config)


def test_a_cuda_device_the_machine_lacks_is_refused() -> None:
    # Prepare
    compute = site_compute({"workers": 2, "devices": f"cuda:{torch.cuda.device_count()}"})
    # Execute / Assert
    with pytest.raises(ConfigError, match="CUDA device"):
        compute.resolved()


def test_site_check_reports_the_compute_the_node_will_use() -> None:
    # Execute
    text = compute_summary({"workers": 2, "devices": "cpu"})
    # Assert
    assert "2 DP-SGD worker process(es)" in text and "gloo" in text
    assert f"CUDA devices found: {torch.cuda.device_count()}" in text
    assert f"CPU threads: {os.cpu_count()}" in text
