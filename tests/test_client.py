from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.data import site_file
from client.dp.accounting import epsilon_spent
from client.site import SiteClient
from common.config import RunConfig
from common.datasets import dataset_info
from common.models import build_model
from common.wire import FIELDS, ValidationLayout, decode_values


@pytest.fixture
def site_dir(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    images = (rng.integers(0, 120, (120, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:90], train_labels=labels[:90], val_images=images[90:], val_labels=labels[90:])
    site_file(tmp_path, 0).write_bytes(buf.getvalue())
    return tmp_path


def _client(site_dir, **overrides) -> SiteClient:
    cfg = RunConfig(dataset="breastmnist", model="scatnet", site_data_dir=str(site_dir), batch_size=32, **overrides)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                  state=RecordDict(), run_config=cfg.to_flower())
    return SiteClient(ctx)


def _initial() -> list[np.ndarray]:
    return [v.numpy() for v in build_model("auto", dataset_info("breastmnist"), seed=0).state_dict().values()]


def test_dp_rounds_compose_epsilon_in_context_state_and_stop_at_budget(site_dir) -> None:
    # Prepare: a run planned for 2 rounds.
    client = _client(site_dir, rounds=2, epsilon=3.0)
    params = _initial()
    # Execute: three requests; the plan covers two.
    u1, n1, m1 = client.fit(params, {"server-round": 1})
    p1 = [a + b for a, b in zip(params, u1, strict=True)]
    u2, n2, m2 = client.fit(p1, {"server-round": 2})
    p2 = [a + b for a, b in zip(p1, u2, strict=True)]
    u3, n3, m3 = client.fit(p2, {"server-round": 3})
    # Assert: the weight is the run's DP record count (90 records, noised once), ε grows inside the budget
    plan = client.ledger.plan(1)
    assert plan is not None and n1 == n2 == plan.records_estimate and abs(n1 - 90) < 6 * plan.count_noise
    assert 0 < m1["epsilon"] < m2["epsilon"] <= 3.0
    history = client.ledger.history(run=1)
    assert epsilon_spent(history=history, delta=1e-5, accountant="prv") == pytest.approx(m2["epsilon"])
    assert [h[1] for h in history] == [1.0, plan.sample_rate, plan.sample_rate]  # the count, then two rounds
    assert m3["refused"] == 1 and n3 == 0 and "budget" in m3["reason"]
    assert all(not a.any() for a in u3)  # nothing trained: a zero update of weight 0
    assert m3["epsilon"] == pytest.approx(m2["epsilon"])


def test_only_weights_and_released_aggregates_leave_the_site(site_dir) -> None:
    # Prepare
    client = _client(site_dir, rounds=1)
    params = _initial()
    # Execute: a training round, then the validation of the model it produced
    update, _, metrics = client.fit(params, {"server-round": 1})
    out = [a + b for a, b in zip(params, update, strict=True)]
    _, n_val, eval_metrics = client.evaluate(out, {"server-round": 1, "validate-round": 1})
    # Assert: weights are exactly the model's tensors; every metric is allow-listed and scalar
    assert [a.shape for a in out] == [a.shape for a in params]
    assert set(metrics) <= set(FIELDS) and set(eval_metrics) <= set(FIELDS)
    for value in [*metrics.values(), *eval_metrics.values()]:
        assert isinstance(value, (int, float, str))
    # The validation statistic is a noisy histogram: near 30 records in all, not the exact counts
    layout = ValidationLayout.for_dataset(dataset_info("breastmnist"))
    released = decode_values(eval_metrics["validation"], size=layout.size) / layout.scale
    assert n_val == 0 and eval_metrics["validation-noise"] > 0
    assert not np.allclose(released, np.round(released))
    assert abs(released.sum() - 30) < 6 * eval_metrics["validation-noise"] * np.sqrt(layout.size)


def test_no_dp_site_reports_zero_epsilon_and_trains(site_dir) -> None:
    client = _client(site_dir, rounds=1, dp=False)
    params = _initial()
    update, n, metrics = client.fit(params, {"server-round": 1})
    assert metrics["epsilon"] == 0.0 and n == 90
    assert any(a.any() for a in update)


def test_site_file_is_read_again_when_it_changes(site_dir) -> None:
    from client.data import load_site_data

    cfg = RunConfig(dataset="breastmnist", model="scatnet", site_data_dir=str(site_dir))
    first = load_site_data({"partition-id": 0}, cfg)
    assert load_site_data({"partition-id": 0}, cfg).train.images is first.train.images  # decoded once
    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((12, 28, 28), np.uint8), train_labels=np.zeros(12, np.int64),
             val_images=np.zeros((3, 28, 28), np.uint8), val_labels=np.zeros(3, np.int64))
    site_file(site_dir, 0).write_bytes(buf.getvalue())
    assert len(load_site_data({"partition-id": 0}, cfg).train) == 12


def test_site_larger_than_the_secure_aggregation_range_refuses_instead_of_saturating(site_dir) -> None:
    # Prepare: the federation sized SecAgg+ for sites of at most 50 records; this one has 90.
    client = _client(site_dir, rounds=1, max_site_records=50)
    # Execute
    update, n, metrics = client.fit(_initial(), {"server-round": 1, "secure-aggregation": 1})
    # Assert: a zero update of weight 0, and the fix named (with the DP count, not the exact one)
    assert n == 0 and metrics["refused"] == 1 and "more than max-site-records=50" in metrics["reason"]
    assert all(not a.any() for a in update)


def test_segmentation_site_trains_patient_level_dp_and_shares_only_aggregates(tmp_path) -> None:
    # Prepare: 12 toy patients (volumes of the dataset's shape), 4 validation volumes.
    info = dataset_info("msd-hippocampus")
    rng = np.random.default_rng(0)
    masks = np.zeros((16, *info.volume_shape), np.int64)
    masks[:, 10:20, 20:30, 15:25] = 1
    masks[:, 10:20, 30:40, 15:25] = 2
    images = (rng.integers(0, 60, masks.shape) + masks * 80).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images[:12], train_labels=masks[:12], val_images=images[12:], val_labels=masks[12:])
    site_file(tmp_path, 0).write_bytes(buf.getvalue())
    cfg = RunConfig(dataset="msd-hippocampus", site_data_dir=str(tmp_path), batch_size=4, rounds=1, local_epochs=1)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                  state=RecordDict(), run_config=cfg.to_flower())
    client = SiteClient(ctx)
    params = [v.numpy() for v in build_model("auto", info, seed=0).state_dict().values()]
    # Execute
    update, n, metrics = client.fit(params, {"server-round": 1})
    _, _, val = client.evaluate(params, {"server-round": 1, "validate-round": 1})
    # Assert: the FedAvg weight and the sampling rate count patients (by the DP count); only allow-listed values
    plan = client.ledger.plan(1)
    assert plan is not None and n == plan.records_estimate
    assert metrics["privacy-unit"] == "patient" and metrics["sample-rate"] == pytest.approx(plan.sample_rate)
    assert 0 < metrics["epsilon"] <= 8.0 and any(a.any() for a in update)
    assert set(metrics) <= set(FIELDS) and set(val) <= set(FIELDS)
    layout = ValidationLayout.for_dataset(info)
    sums, defined = layout.dice(decode_values(val["validation"], size=layout.size))
    assert sums.shape == defined.shape == (2,)  # Dice sums and defined counts per class, noised
    assert all(isinstance(v, (int, float, str)) for v in val.values())
