"""SCAFFOLD: the control variates' wire format, the corrected local steps, the site's and the coordinator's side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from torch.utils.data import TensorDataset

import client.trainer as trainer
from client.control_store import KEPT_RUNS, STORE_FOLDER, ControlStore
from client.dp import sgd
from client.dp.rng import reproducible
from client.site import CONTROL_RECORD, SiteClient
from common import control_variates as cv
from common.config import RunConfig
from common.datasets import Task, dataset_info
from common.secure_aggregation import run_settings
from server.resume import ResumeState
from tests.test_site_privacy import _initial, _site

INFO = dataset_info("breastmnist")


# ------------------------------------------------------------------------------ wire format
def test_control_variates_are_clamped_and_scaled_into_the_secure_aggregation_range() -> None:
    # Prepare: values inside and far outside ±max_grad_norm.
    cfg = RunConfig(dataset="breastmnist", max_grad_norm=0.3)
    control = [np.array([-5.0, -0.3, 0.0, 0.1, 0.29, 7.0], dtype=np.float32), np.zeros((2, 2), np.float32)]
    # Execute
    wire = cv.encode(control, config=cfg)
    back = cv.decode(wire, config=cfg)
    # Assert: every sent value is within SecAgg+'s clipping range, and decoding gives the clamped values back.
    limit = run_settings(cfg).clipping_range
    assert max(float(np.abs(w).max()) for w in wire) <= limit * (1 + 1e-6)
    np.testing.assert_allclose(back[0], [-0.3, -0.3, 0.0, 0.1, 0.29, 0.3], rtol=1e-6, atol=1e-9)
    assert back[1].shape == (2, 2) and not back[1].any()


def test_a_message_without_both_halves_names_the_setting_to_align() -> None:
    with pytest.raises(ValueError, match=r"received 3 arrays, expected 4 .*same scaffold setting"):
        cv.split([np.zeros(1)] * 3, model_arrays=2)


def test_the_federations_control_variate_is_the_record_weighted_mean() -> None:
    mean = cv.weighted_mean([[np.array([1.0, 0.0])], [np.array([4.0, 3.0])]], [10, 20])
    np.testing.assert_allclose(mean[0], [3.0, 2.0])
    with pytest.raises(ValueError, match="no site control variate"):
        cv.weighted_mean([], [])


# ------------------------------------------------------------------------------ corrected local steps
def _records(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 2, (n, 1), generator=g).float())


def _recording_adam(monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """Record the gradients Adam steps on (after DP-SGD's clipping and noise, after SCAFFOLD's correction)."""
    seen: list[list[torch.Tensor]] = []
    adam_step = torch.optim.Adam.step

    def recording(self, closure=None):  # type: ignore[no-untyped-def]
        seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return adam_step(self, closure)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    return seen


def test_every_step_adds_the_correction_to_the_gradient_and_the_site_keeps_the_uncorrected_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: full-batch steps, so the first step's gradient can be computed beforehand.
    seen = _recording_adam(monkeypatch)
    data = _records()
    cfg = RunConfig(dataset="breastmnist", batch_size=len(data), local_epochs=3, dp=False)
    model = torch.nn.Linear(6, 1)
    torch.nn.functional.binary_cross_entropy_with_logits(model(data.tensors[0]), data.tensors[1]).backward()
    first = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    correction = [torch.full_like(p, 0.25) for p in model.parameters()]
    drift = trainer.DriftCorrection(dict(zip(model.parameters(), correction, strict=True)))
    # Execute
    trainer.train_plain(model, data, Task.BINARY, cfg, seed=0, drift=drift)
    # Assert: Adam stepped on gradient + correction; c_i is the mean of the uncorrected gradients.
    assert len(seen) == drift.steps == 3
    for got, g, c in zip(seen[0], first, correction, strict=True):
        torch.testing.assert_close(got, g + c)
    for i, mean in enumerate(drift.mean_gradients().values()):
        torch.testing.assert_close(mean, torch.stack([step[i] - correction[i] for step in seen]).mean(0))


def test_under_dp_sgd_the_site_averages_the_noised_gradients_and_training_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: record what Adam receives in each step (after Opacus clipped and noised it).
    seen = _recording_adam(monkeypatch)
    data = _records(80)
    cfg = RunConfig(dataset="breastmnist", batch_size=16, local_epochs=2, rounds=1, accountant="rdp",
                    max_grad_norm=0.5)
    plan = sgd.plan_for_records(cfg, len(data))

    def run(drift: trainer.DriftCorrection | None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1)
        sgd.train_dp(model, data, Task.BINARY, cfg, plan, randomness=reproducible(seed=3, site=0), server_round=1,
                     drift=drift)
        return model

    plain = run(None)
    plain_steps, seen[:] = list(seen), []
    zero = trainer.DriftCorrection({})
    # Execute: the same round with a zero correction.
    corrected = run(zero)
    # Assert: identical weights, and c_i is the mean of exactly the gradients DP-SGD released to the optimizer.
    for a, b in zip(plain.parameters(), corrected.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert zero.steps == len(plain_steps) > 4
    means = list(zero.mean_gradients().values())
    expected = [torch.stack([step[i] for step in plain_steps]).mean(0) for i in range(len(means))]
    for got, want in zip(means, expected, strict=True):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------ the site's store
def test_the_control_store_keeps_two_rounds_per_run_and_the_latest_runs_only(tmp_path: Path) -> None:
    # Prepare
    import os

    store = ControlStore(tmp_path, "breastmnist")
    arrays = {r: [np.full((2, 3), r, np.float32), np.array([r], np.float32)] for r in (1, 2, 3)}
    # Execute: rounds 1-3 of run 7, then one round of KEPT_RUNS other runs, each written later than the last
    for r, control in arrays.items():
        store.save(7, r, control)
    latest = [store.load(7, before_round=b) for b in (1, 2, 3, 4, 99)]
    files = []
    for i, run in enumerate(range(100, 100 + KEPT_RUNS)):
        os.utime(tmp_path / f"breastmnist-run-{7 if i == 0 else run - 1}.npz", (1_000 + i, 1_000 + i))
        store.save(run, 1, arrays[1])
        files.append(sorted(p.name for p in tmp_path.iterdir()))
    # Assert: the latest kept round before the asked one, of the two kept; run 7 goes once KEPT_RUNS newer exist
    assert latest[0] is None and latest[1] is None  # round 1 was dropped when round 3 came
    np.testing.assert_array_equal(latest[2][0], arrays[2][0])
    for got in latest[3:]:
        for a, b in zip(got, arrays[3], strict=True):
            np.testing.assert_array_equal(a, b)
    assert "breastmnist-run-7.npz" in files[-2] and "breastmnist-run-7.npz" not in files[-1]
    assert len(files[-1]) == KEPT_RUNS and store.load(7, before_round=4) is None


# ------------------------------------------------------------------------------ the site
def _site_client(root: Path, state: RecordDict, **overrides) -> SiteClient:
    values = dict(dataset="breastmnist", model="scatnet", site_data_dir=str(root), batch_size=32, rounds=2, dp=False,
                  scaffold=True)
    cfg = RunConfig(**{**values, **overrides})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=state, run_config=cfg.to_flower())
    # Seeded research randomness: these tests compare trainings bit for bit (a node's own is the OS's entropy)
    return SiteClient(ctx, randomness=reproducible(seed=0, site=0))


def test_a_site_replies_with_its_update_and_its_mean_gradient_and_keeps_it(tmp_path: Path) -> None:
    # Prepare
    _site(tmp_path)
    params = _initial()
    state = RecordDict()
    cfg = _site_client(tmp_path, state).config
    zeros = [np.zeros_like(p) for p in params]
    # Execute: round 1 (c = 0, no c_i yet), then a refused request (a site policy would; here: too many records)
    reply, n, _ = _site_client(tmp_path, state).fit(params + cv.encode(zeros, config=cfg), {"server-round": 1})
    refused, n_refused, m = _site_client(tmp_path, RecordDict(), max_site_records=10).fit(
        params + cv.encode(zeros, config=cfg), {"server-round": 1, "secure-aggregation": 1})
    # Assert: update and control variate, the latter kept in context.state as the coordinator will decode it
    update, wire = cv.split(reply, model_arrays=len(params))
    assert n == 90 and any(np.abs(u).max() > 0 for u in update)
    kept = state.array_records[CONTROL_RECORD].to_numpy_ndarrays()
    for k, w in zip(kept, cv.decode(wire, config=cfg), strict=True):
        np.testing.assert_array_equal(k, w)
    assert np.abs(kept[0]).max() > 0  # the head's mean gradient
    assert m["refused"] and n_refused == 0 and len(refused) == 2 * len(params)
    assert not any(r.any() for r in refused)


def test_a_lone_site_whose_correction_is_zero_trains_exactly_as_without_scaffold(tmp_path: Path) -> None:
    # Prepare: round 1, then round 2 with c = the site's own c_i (one site: c - c_i = 0) and with c = 0.
    _site(tmp_path)
    params = _initial()
    state = RecordDict()
    cfg = _site_client(tmp_path, state).config
    zeros = cv.encode([np.zeros_like(p) for p in params], config=cfg)
    reply, _, _ = _site_client(tmp_path, state).fit(params + zeros, {"server-round": 1})
    update, own = cv.split(reply, model_arrays=len(params))
    after_one = [p + u for p, u in zip(params, update, strict=True)]
    plain = SiteClient(Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                               run_config=cfg.replace(scaffold=False).to_flower()),
                       randomness=reproducible(seed=0, site=0))
    # Execute
    same, _, _ = _site_client(tmp_path, _copy(state)).fit(after_one + own, {"server-round": 2})
    other, _, _ = _site_client(tmp_path, _copy(state)).fit(after_one + zeros, {"server-round": 2})
    reference, _, _ = plain.fit(after_one, {"server-round": 2})
    # Assert: zero correction reproduces plain training bit for bit; a non-zero one changes the update.
    for a, b in zip(same[: len(params)], reference, strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(a - b).max()) for a, b in zip(other[: len(params)], reference, strict=True)) > 1e-6


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
def test_a_site_whose_node_lost_its_control_variate_reads_it_from_its_state_folder(tmp_path: Path, dp: bool) -> None:
    # Prepare: a site after round 1; three copies of its folders (data, state) for round 2
    import shutil

    (tmp_path / "site").mkdir()
    _site(tmp_path / "site")
    params = _initial()
    state = RecordDict()
    privacy = dict(dp=True, epsilon=8.0, accountant="rdp") if dp else {}
    cfg = _site_client(tmp_path / "site", state, **privacy).config
    zeros = cv.encode([np.zeros_like(p) for p in params], config=cfg)
    reply, _, _ = _site_client(tmp_path / "site", state, **privacy).fit(params + zeros, {"server-round": 1})
    update, own = cv.split(reply, model_arrays=len(params))
    after_one = [p + u for p, u in zip(params, update, strict=True)]
    for name in ("kept", "restarted", "nothing-kept"):
        shutil.copytree(tmp_path / "site", tmp_path / name)
    shutil.rmtree(tmp_path / "nothing-kept" / "site-00-state" / STORE_FOLDER)
    request = after_one + cv.encode([np.full_like(p, 0.01) for p in params], config=cfg)  # c != c_i
    # Execute: round 2 with c_i in memory, on a restarted node (empty context.state), on one restarted again
    # during the round after it wrote round 2's c_i, and on one without c_i anywhere
    in_memory, _, _ = _site_client(tmp_path / "kept", _copy(state), **privacy).fit(request, {"server-round": 2})
    restarted, _, _ = _site_client(tmp_path / "restarted", RecordDict(), **privacy).fit(request, {"server-round": 2})
    again, _, _ = _site_client(tmp_path / "restarted", RecordDict(), **privacy).fit(request, {"server-round": 2})
    uncorrected, _, _ = _site_client(tmp_path / "nothing-kept", RecordDict(), **privacy).fit(
        request, {"server-round": 2})
    # Assert: the restarted node trains exactly as the one that kept c_i in memory; without c_i it differs
    for a, b, c in zip(restarted, again, in_memory, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    assert max(float(np.abs(a - b).max()) for a, b in zip(uncorrected, in_memory, strict=True)) > 1e-6
    assert any(np.abs(o).max() > 0 for o in own)


def _copy(state: RecordDict) -> RecordDict:
    from flwr.app import ArrayRecord

    copied = RecordDict()
    copied.array_records[CONTROL_RECORD] = ArrayRecord(state.array_records[CONTROL_RECORD].to_numpy_ndarrays())
    return copied


# ------------------------------------------------------------------------------ the coordinator
def test_the_coordinator_sends_c_averages_the_sites_and_keeps_c_for_a_resumed_run(tmp_path: Path) -> None:
    # Prepare
    from flwr.server.client_manager import SimpleClientManager

    from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters

    cfg = RunConfig(dataset="breastmnist", scaffold=True, dp=False, strategy="fedavg", min_sites=2,
                    server_eval=False)
    initial = initial_parameters(cfg, INFO)
    weights = parameters_to_ndarrays(initial)

    def strategy() -> FederationStrategy:
        return FederationStrategy(build_inner_strategy(cfg, initial, 2), config=cfg, info=INFO, out_dir=tmp_path,
                                  test_set=None)

    coordinator = strategy()
    manager = SimpleClientManager()
    proxies = [_Proxy(str(i)) for i in range(2)]
    for proxy in proxies:
        manager.register(proxy)
    # Execute: one round; the two sites report updates and c_i of 0.1 and 0.2 everywhere, with 10 and 30 records.
    sent = coordinator.configure_fit(1, initial, manager)
    received = parameters_to_ndarrays(sent[0][1].parameters)
    results = []
    for proxy, value, n in ((proxies[0], 0.1, 10), (proxies[1], 0.2, 30)):
        control = cv.encode([np.full_like(w, value) for w in weights], config=cfg)
        update = [np.full_like(w, value) for w in weights]
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update + control), n,
                                      {"site": proxy.cid})))
    aggregated, _ = coordinator.aggregate_fit(1, results, [])
    coordinator.evaluate(1, aggregated)  # saves the resume state
    resumed = strategy()
    resumed.restore(ResumeState.load(tmp_path))
    # Assert: the request carried the weights and c = 0; the model moved by the mean update; c is the weighted mean
    assert len(received) == 2 * len(weights)
    assert all(not c.any() for c in received[len(weights):])
    for w, a in zip(weights, parameters_to_ndarrays(aggregated), strict=True):
        np.testing.assert_allclose(a - w, 0.175, rtol=1e-5)
    assert coordinator.control is not None and resumed.control is not None
    assert len(coordinator.control) == len(resumed.control) == len(weights)
    for c in coordinator.control + resumed.control:
        np.testing.assert_allclose(c, 0.175, rtol=1e-5)
    assert not hasattr(resumed.inner, "control")


class _Proxy:
    """The little of a ClientProxy the strategy touches."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.node_id = int(cid) + 1
