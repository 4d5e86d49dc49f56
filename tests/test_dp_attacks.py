"""A coordinator's attacks on a site's ε, each as a test: replay, rename, rotate, and releases outside ε.

The coordinator writes the run config and receives every reply; each test plays it against real site code.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from client.data import site_file
from client.dp.rng import os_entropy, reproducible
from client.dp.sgd import dp_epoch, make_private, records_dataset
from client.site import SiteClient
from common import recipes
from common.config import RunConfig
from common.datasets import dataset_info
from common.models import build_model
from common.site_policy import template


def _site_file(root: Path, *, n: int = 90, partition: int = 0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n + 30)
    images = (rng.integers(0, 120, (n + 30, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:], val_labels=labels[n:])
    site_file(root, partition).write_bytes(buf.getvalue())


def _client(root: Path, *, run_id: int = 1, node: dict | None = None, **overrides) -> SiteClient:
    values = {"dataset": "breastmnist", "site_data_dir": str(root), "batch_size": 32, "rounds": 2, "epsilon": 4.0,
              "accountant": "rdp", **overrides}
    cfg = RunConfig(**values)
    ctx = Context(run_id=run_id, node_id=1, node_config={"partition-id": 0, **(node or {})}, state=RecordDict(),
                  run_config=cfg.to_flower())
    return SiteClient(ctx)


def _initial(dataset: str = "breastmnist") -> list[np.ndarray]:
    """The coordinator's initial weights for the model ``_client``'s sites resolve (the dataset's DP recipe)."""
    model = recipes.from_flower(RunConfig(dataset=dataset, epsilon=4.0).to_flower()).model
    return [v.numpy() for v in build_model(model, dataset_info(dataset), seed=0).state_dict().values()]


# ------------------------------------------------------------------------------ replay
def _private_round(x: torch.Tensor, y: torch.Tensor, *, randomness, sigma: float = 1.0) -> torch.Tensor:
    """One epoch of DP-SGD of a small linear model on ``(x, y)``; the flat weights after it."""
    torch.manual_seed(0)  # the same initial model: the coordinator chose it and knows it
    net = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    private = make_private(net, opt, records_dataset(torch.utils.data.TensorDataset(x, y)), sample_rate=0.25,
                           noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=0.25 * len(x),
                           randomness=randomness, server_round=1)
    dp_epoch(private, nn.BCEWithLogitsLoss(), proximal=None, augment=None)
    private.close()
    return torch.cat([p.detach().ravel() for p in net.parameters()])


def _records(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).float().reshape(-1, 1)
    target_x, target_y = torch.full((1, 1, 6, 6), 3.0), torch.zeros(1, 1)  # an outlier: the record to detect
    return x, y, target_x, target_y


def test_a_replay_with_the_coordinators_seed_is_exact_under_seeded_noise() -> None:
    # Prepare: the attack against the former mechanism (noise seeded from what the coordinator knows)
    x, y, tx, ty = _records()
    seeded = reproducible(seed=0, site=0)
    # Execute: the site trains on D ∪ {x}; the coordinator replays on D and on D ∪ {x} with the same seed
    reply = _private_round(torch.cat([x, tx]), torch.cat([y, ty]), randomness=seeded)
    with_x = _private_round(torch.cat([x, tx]), torch.cat([y, ty]), randomness=reproducible(seed=0, site=0))
    without_x = _private_round(x, y, randomness=reproducible(seed=0, site=0))
    # Assert: membership with certainty (this is what the OS-entropy default removes)
    assert torch.equal(reply, with_x)
    assert not torch.equal(reply, without_x)


def test_a_replay_of_a_site_round_equals_neither_neighbour_under_os_entropy() -> None:
    # Prepare
    x, y, tx, ty = _records()
    # Execute: the site's reply, and the coordinator's best replays (it cannot know the OS's entropy)
    reply = _private_round(torch.cat([x, tx]), torch.cat([y, ty]), randomness=os_entropy())
    with_x = _private_round(torch.cat([x, tx]), torch.cat([y, ty]), randomness=os_entropy())
    without_x = _private_round(x, y, randomness=os_entropy())
    # Assert: neither replay reproduces the reply; the noise alone is of the order σ·C·lr/B per coordinate
    assert float((reply - with_x).abs().max()) > 1e-3
    assert float((reply - without_x).abs().max()) > 1e-3


def test_the_replay_distance_test_has_no_advantage_under_os_entropy() -> None:
    # Prepare: trials in which the site holds D or D ∪ {x} at random; the coordinator replays both
    rng = np.random.default_rng(7)
    x, y, tx, ty = _records()
    trials, correct = 48, 0
    for _ in range(trials):
        member = bool(rng.integers(0, 2))
        site_x, site_y = (torch.cat([x, tx]), torch.cat([y, ty])) if member else (x, y)
        # Execute: the distance test: guess "member" when the reply is closer to the replay on D ∪ {x}
        reply = _private_round(site_x, site_y, randomness=os_entropy(), sigma=4.0)
        d_in = float((reply - _private_round(torch.cat([x, tx]), torch.cat([y, ty]), randomness=os_entropy(),
                                             sigma=4.0)).norm())
        d_out = float((reply - _private_round(x, y, randomness=os_entropy(), sigma=4.0)).norm())
        correct += int((d_in < d_out) == member)
    # Assert: accuracy within 3.5 standard errors of chance (the seeded mechanism above scores 100%)
    assert abs(correct / trials - 0.5) <= 3.5 * math.sqrt(0.25 / trials)


def test_two_sites_given_the_same_request_send_different_updates(tmp_path: Path) -> None:
    # Prepare: the same records, config and model at two nodes (two state folders)
    _site_file(tmp_path)
    a = _client(tmp_path, node={"state-dir": str(tmp_path / "a")}, rounds=1)
    b = _client(tmp_path, node={"state-dir": str(tmp_path / "b")}, rounds=1)
    request = {"server-round": 1, "secure-aggregation": 1, "run-key": 1}
    # Execute
    ua, _, ma = a.fit(_initial(), request)
    ub, _, mb = b.fit(_initial(), request)
    # Assert: the whole round (count, sampling, noise) is fresh at each node
    assert ma["randomness"] == mb["randomness"] == "os-entropy"
    assert max(float(np.abs(p - q).max()) for p, q in zip(ua, ub, strict=True)) > 0


# ------------------------------------------------------------------------------ rename and rotate
def _policy(root: Path, *, per_run: float, lifetime: float) -> None:
    (root / "site-policy.toml").write_text(template(epsilon_per_run=per_run, epsilon_lifetime=lifetime, delta=1e-5))


def _train_run(root: Path, *, dataset: str, run_id: int, run_key: int, rounds: int = 2) -> list[dict]:
    replies = []
    params = _initial(dataset)
    for r in range(1, rounds + 1):
        client = _client(root, run_id=run_id, dataset=dataset, rounds=rounds, validation_releases=1)
        update, _, metrics = client.fit(params, {"server-round": r, "secure-aggregation": 1, "run-key": run_key})
        params = [p + u for p, u in zip(params, update, strict=True)]
        replies.append(metrics)
    return replies


def test_the_same_records_under_three_dataset_names_share_one_lifetime_budget(tmp_path: Path) -> None:
    # Prepare: a lifetime of 6; each run asks for 4 under another dataset name (all 1-channel 28 px tasks)
    _site_file(tmp_path)
    _policy(tmp_path, per_run=4.0, lifetime=6.0)
    # Execute
    replies = [m for i, name in enumerate(("breastmnist", "pneumoniamnist", "organamnist"))
               for m in _train_run(tmp_path, dataset=name, run_id=10 + i, run_key=10 + i)]
    # Assert: later runs are refused once the one data source's lifetime budget would be passed
    trained = [m for m in replies if not m["refused"]]
    assert any(m["refused"] and "lifetime" in m["reason"] for m in replies)
    assert max(m["epsilon-lifetime"] for m in replies) <= 6.0 + 1e-6
    assert len({m["epsilon-lifetime"] for m in trained}) == len(trained)  # one budget, growing
    assert len(list((tmp_path / "site-00-state").glob("ledger-src-*.jsonl"))) == 1


def test_a_second_run_key_inside_one_flower_run_is_refused(tmp_path: Path) -> None:
    # Prepare
    _site_file(tmp_path)
    first = _train_run(tmp_path, dataset="breastmnist", run_id=7, run_key=1, rounds=1)
    # Execute: the same Flower run, a fresh run key (a fresh per-run budget, if the site allowed it)
    second = _train_run(tmp_path, dataset="breastmnist", run_id=7, run_key=2, rounds=1)
    # Assert
    assert not first[0]["refused"]
    assert second[0]["refused"] and "run-key 2" in second[0]["reason"]


# ------------------------------------------------------------------------------ small points of the mechanism
def test_an_empty_poisson_batch_still_takes_its_noised_step() -> None:
    # Prepare: 3 records sampled at q = 0.05 (20 steps an epoch, most of them empty); zero gradients everywhere
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, 16)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 16, bias=False))
    nn.init.zeros_(net[1].weight)
    before = net[1].weight.detach().clone()
    private = make_private(net, torch.optim.SGD(net.parameters(), lr=1.0), records_dataset(
        torch.utils.data.TensorDataset(x, y)), sample_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=1.0, randomness=os_entropy(), server_round=1)
    # Execute
    dp_epoch(private, nn.MSELoss(), proximal=None, augment=None)
    private.close()
    # Assert: every one of the 20 planned steps was noised: 64 weights moved by 20 draws of N(0, (σ C)²) each
    assert private.steps[0] == 20
    moved = (net[1].weight.detach() - before).ravel()
    assert float(moved.abs().min()) > 0
    assert 0.75 < float(moved.std()) / math.sqrt(20) < 1.25


def test_a_site_whose_records_changed_mid_run_keeps_training_at_the_plans_rate(tmp_path: Path) -> None:
    # Prepare: round 1 on 90 records, then the hospital adds 40 before round 2
    _site_file(tmp_path, n=90)
    params = _initial()
    first = _client(tmp_path, rounds=2)
    update, _, m1 = first.fit(params, {"server-round": 1, "secure-aggregation": 1, "run-key": 3})
    _site_file(tmp_path, n=130, seed=1)
    # Execute
    second = _client(tmp_path, rounds=2)
    _, _, m2 = second.fit([p + u for p, u in zip(params, update, strict=True)],
                          {"server-round": 2, "secure-aggregation": 1, "run-key": 3})
    # Assert: the same q and σ as planned, the round trained, and the run ends inside its budget
    assert not m2["refused"], m2["reason"]
    assert (m2["sample-rate"], m2["noise-multiplier"]) == (m1["sample-rate"], m1["noise-multiplier"])
    assert m2["epsilon"] <= 4.0 + 1e-6


@pytest.mark.parametrize("craft", ["nan", "huge"])
def test_weights_no_training_could_produce_are_refused_before_any_record_is_touched(tmp_path: Path,
                                                                                     craft: str) -> None:
    # Prepare: weights crafted to overflow on some records only (a refusal would then be a membership test)
    _site_file(tmp_path)
    params = _initial()
    params[0] = np.full_like(params[0], np.nan) if craft == "nan" else params[0] * 0 + 3e38
    client = _client(tmp_path)
    # Execute
    update, n, metrics = client.fit(params, {"server-round": 1, "secure-aggregation": 1, "run-key": 1})
    _, _, validation = client.evaluate(params, {"server-round": 1, "validate-round": 1, "run-key": 1})
    # Assert: the same refusal whatever the records, and nothing charged (no ledger written)
    assert metrics["refused"] and "non-finite weights or weights above" in metrics["reason"]
    assert validation["refused"] and validation["reason"] == metrics["reason"]
    assert n == 0 and all(not np.any(u) for u in update)
    assert not list((tmp_path / "site-00-state").glob("ledger-*.jsonl"))


def test_a_round_that_diverged_is_refused_with_a_constant_reason_and_stays_spent(tmp_path: Path,
                                                                                monkeypatch) -> None:
    # Prepare: local training that ends with a non-finite weight (whatever caused it)
    import client.dp.sgd as sgd
    from client.site import DIVERGED

    _site_file(tmp_path)
    real = sgd.train_dp

    def diverging(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(sgd, "train_dp", diverging)
    request = {"server-round": 1, "secure-aggregation": 1, "run-key": 1}
    # Execute: the round, then the coordinator asking for it again
    _, n, first = _client(tmp_path).fit(_initial(), request)
    _, _, again = _client(tmp_path).fit(_initial(), request)
    # Assert: a constant reason (no count of anything), and the retry charged anew, not run under the first charge
    assert first["refused"] and first["reason"] == DIVERGED and n == 0
    assert again["reason"] == DIVERGED and again["epsilon"] > first["epsilon"]
    ledger = next((tmp_path / "site-00-state").glob("ledger-src-*.jsonl"))
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["kind"] for r in rows if r.get("mechanism") == "dp-sgd"] == ["reserve", "complete"] * 2


def test_an_exception_at_the_site_reaches_the_coordinator_as_a_constant_reason(tmp_path: Path) -> None:
    # Prepare: a run config naming a 14-label task for a binary site (shapes that mention the site's counts)
    _site_file(tmp_path, n=87)
    client = _client(tmp_path, dataset="chestmnist")
    # Execute
    _, _, fit = client.fit(_initial("chestmnist"), {"server-round": 1, "secure-aggregation": 1, "run-key": 1})
    _, _, validation = client.evaluate(_initial("chestmnist"), {"server-round": 1, "validate-round": 1})
    # Assert: refusals whose text says nothing of the data (no exception text, no count)
    from client.site import REQUEST_FAILED

    assert fit["refused"] and fit["reason"] == REQUEST_FAILED
    assert validation["refused"] and validation["reason"] == REQUEST_FAILED
    assert "87" not in fit["reason"] + validation["reason"] and "30" not in validation["reason"]


@pytest.mark.parametrize("records", [50, 500])
def test_the_count_release_hides_the_exact_count_in_the_plan(tmp_path: Path, records: int) -> None:
    # Prepare: two sites that differ by one record
    from client.dp.release import noisy_count

    rng = os_entropy().numpy_generator("count", server_round=0)
    # Execute: many releases of each
    a = np.array([noisy_count(records, sigma=10.0, rng=rng) for _ in range(400)])
    b = np.array([noisy_count(records + 1, sigma=10.0, rng=rng) for _ in range(400)])
    # Assert: rarely the exact count, centred on the truth with σ's spread, the neighbours' releases overlapping
    assert np.mean(a == records) < 0.1
    assert abs(a.mean() - records) < 3 and abs(b.mean() - records - 1) < 3
    assert 8 < a.std() < 12
    assert len(set(a) & set(b)) > 20


# ------------------------------------------------------------------------------ bad ledgers
@pytest.mark.parametrize("damage", ["corrupt", "newer"])
def test_a_site_with_an_unusable_ledger_refuses_and_keeps_every_entry(tmp_path: Path, damage: str) -> None:
    # Prepare: a site that trained one round, then its ledger damaged (a torn line) or from a newer medsilo
    _site_file(tmp_path)
    _client(tmp_path).fit(_initial(), {"server-round": 1, "secure-aggregation": 1, "run-key": 1})
    ledger = next((tmp_path / "site-00-state").glob("ledger-src-*.jsonl"))
    if damage == "corrupt":
        ledger.write_bytes(ledger.read_bytes() + b'{"kind": "reserve", "ru')
    else:
        lines = ledger.read_text().splitlines()
        lines[0] = lines[0].replace('"format": 2', '"format": 99')
        ledger.write_text("\n".join(lines) + "\n")
    before = ledger.read_bytes()
    # Execute
    update, n, metrics = _client(tmp_path).fit(_initial(), {"server-round": 2, "secure-aggregation": 1, "run-key": 1})
    # Assert: a refusal the coordinator can read (no path of the hospital's in it), nothing trained or written
    assert metrics["refused"] and "privacy ledger cannot be used" in metrics["reason"]
    assert str(tmp_path) not in metrics["reason"]
    assert n == 0 and all(not np.any(u) for u in update)
    assert ledger.read_bytes() == before


def test_a_patient_unit_site_without_validation_patients_releases_no_validation(tmp_path: Path) -> None:
    # Prepare: a site file naming the patients of its training records only (each validation image alone would
    # move the statistic by one, a patient with k images by k: more than the release is charged for)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    images = (rng.integers(0, 120, (120, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:90], train_labels=labels[:90], val_images=images[90:],
             val_labels=labels[90:], train_patients=np.arange(90) // 3)
    site_file(tmp_path, 0).write_bytes(buf.getvalue())
    # Execute
    _, _, metrics = _client(tmp_path).evaluate(_initial(), {"server-round": 1, "validate-round": 1, "run-key": 1})
    # Assert
    assert metrics["validation"] == "" and "val_patients" in metrics["validation-refused"]
