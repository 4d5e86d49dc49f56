"""Secure aggregation: the range arithmetic, and full SecAgg+ rounds through the real workflow and ClientApp."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.app import app as client_app
from client.data import site_file
from client.dp.rng import reproducible
from client.site import SiteClient
from common import secure_aggregation as sa
from common.checkpoint import load_checkpoint
from common.config import RunConfig
from common.datasets import dataset_info
from common.errors import NothingAggregated
from common.io import read_jsonl
from common.models import build_model
from simulations.loopback import LoopbackGrid
from simulations.reproducible import app as research_app

SIZES = (60, 90, 150)


# ------------------------------------------------------------------------------ arithmetic
def test_adam_step_bound_starts_at_one_and_grows_slowly() -> None:
    assert sa.adam_step_bound(step=1) == pytest.approx(1.0)
    assert 1.0 < sa.adam_step_bound(step=50) < sa.adam_step_bound(step=1000) < 7.3
    with pytest.raises(ValueError, match="step must be"):
        sa.adam_step_bound(step=0)


@pytest.mark.parametrize("pattern", ["spike-then-zero", "alternating", "heavy-tailed", "growing"])
def test_update_bound_holds_for_adversarial_gradients(pattern: str) -> None:
    # Prepare: gradient sequences chosen to push Adam's per-coordinate steps as far as possible.
    rng = np.random.default_rng(1)
    steps, lr = 300, 0.01
    grads = {
        "spike-then-zero": [np.r_[1e6, np.zeros(7)] if t == 0 else np.full(8, 1e-9) for t in range(steps)],
        "alternating": [np.full(8, (-1.0) ** t * 10 ** (t % 5)) for t in range(steps)],
        "heavy-tailed": [rng.standard_cauchy(8) for _ in range(steps)],
        "growing": [np.full(8, 1.05**t) for t in range(steps)],
    }[pattern]
    w = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    # Execute / Assert: after every step the total movement is within the bound.
    for t, g in enumerate(grads, start=1):
        w.grad = torch.as_tensor(g, dtype=torch.float32)
        opt.step()
        assert float(w.detach().abs().max()) <= sa.update_bound(lr=lr, steps=t) * (1 + 1e-5)


def test_site_fits_names_the_fix() -> None:
    assert sa.site_fits(num_records=100, max_site_records=100) is None
    assert "max-site-records=101" in (sa.site_fits(num_records=101, max_site_records=100) or "")


@pytest.mark.parametrize(("dp", "epsilon"), [(True, 4.0), (True, 8.0), (False, 8.0)])
def test_a_simulation_sizes_the_range_for_the_sites_dp_estimates_of_their_counts(tmp_path, dp, epsilon) -> None:
    """A DP site checks its noisy count N̂ against max-site-records; the range must hold N̂, not only N."""
    from scipy.stats import norm

    from simulations.experiment import build_simulation

    # Prepare
    values = {"dataset": "breastmnist", "rounds": 1, "epsilon": epsilon, "dp": dp}
    # Execute
    sim, _ = build_simulation(config_values=values, sites=3, partition="dirichlet:0.5", out=str(tmp_path / "r"),
                              scanner_shift=0.0, compare=False, overwrite=False, download=False)
    # Assert: independently, σ_N = 10·√(8/ε) records (client/dp/release.py), and the largest site's estimate
    # N + N(0, σ_N²) passes the range with probability below one in a million.
    largest = max(len(train) for train in sim.split.train)
    headroom = sim.config.max_site_records - largest
    if not dp:
        assert headroom == 0  # an exact count: the tightest range
        return
    sigma = 10.0 * max(1.0, 8.0 / epsilon) ** 0.5
    assert norm.sf(headroom + 0.5, scale=sigma) < 1e-6  # N̂ is rounded: N̂ > max iff noise >= headroom + 0.5
    assert headroom <= 6 * sigma  # and not so wide that the quantization coarsens for nothing


def test_site_fits_says_a_dp_count_is_an_estimate() -> None:
    reason = sa.site_fits(num_records=341, max_site_records=339, estimated=True) or ""
    assert "DP estimate" in reason and "max-site-records=341" in reason


# ------------------------------------------------------------------------------ sites
def tmp_path_of(cfg: RunConfig) -> Path:
    """The run's output folder."""
    return Path(cfg.out_dir)


def _write_sites(root) -> None:
    rng = np.random.default_rng(0)
    for i, n in enumerate(SIZES):
        labels = rng.integers(0, 2, n + 20)
        images = (rng.integers(0, 120, (n + 20, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
        buf = io.BytesIO()
        np.savez(buf, train_images=images[:n], train_labels=labels[:n], val_images=images[n:], val_labels=labels[n:])
        site_file(root, i).write_bytes(buf.getvalue())


@pytest.fixture
def federation(tmp_path):
    _write_sites(tmp_path)
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=1, local_epochs=2,
                    strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=2,
                    epsilon=4.0, accountant="rdp", max_site_records=250)
    return tmp_path, cfg


def _initial(cfg: RunConfig) -> list[np.ndarray]:
    return [v.numpy() for v in build_model(cfg.model, dataset_info(cfg.dataset), seed=cfg.seed).state_dict().values()]


def _plain_update(cfg: RunConfig, partition: int) -> tuple[list[np.ndarray], int]:
    """Replay one site's round in this process: the update it would send unmasked.

    Only possible because the federation in these tests runs the research ClientApp, whose DP randomness is
    seeded (:mod:`simulations.reproducible`); a hospital node's cannot be replayed (tests/test_dp_attacks.py).
    """
    from flwr.app import Context, RecordDict

    # Its own state folder: the replay must not spend (or see) the federation's privacy ledger.
    replay_state = Path(cfg.site_data_dir) / f"replay-{partition}"
    ctx = Context(run_id=1, node_id=partition + 10, node_config={"partition-id": partition,
                                                                 "state-dir": str(replay_state)},
                  state=RecordDict(), run_config=cfg.to_flower())
    site = SiteClient(ctx, randomness=reproducible(seed=cfg.seed, site=partition))
    update, n, _ = site.fit(_initial(cfg), {"server-round": 1, "secure-aggregation": 1})
    return update, n


def _run_round(cfg: RunConfig, drop_node_at_stage: str | None = None, *, research: bool = False) -> LoopbackGrid:
    """One federation through the real ServerApp and ClientApp (the research one, seeded, with ``research``)."""
    from server.app import main

    nodes = {10 + i: {"partition-id": i, "num-partitions": len(SIZES)} for i in range(len(SIZES))}
    grid = LoopbackGrid(research_app if research else client_app, nodes, cfg.to_flower())
    if drop_node_at_stage:
        def drop(msg) -> None:
            rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if rec is not None and rec.get(Key.STAGE) == drop_node_at_stage:
                grid.offline.add(12)
        grid.before_delivery = drop
    from flwr.app import Context, RecordDict

    main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    return grid


def _settings(cfg: RunConfig) -> sa.SecAggSettings:
    return sa.settings_for(lr=cfg.dp_lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                           max_site_records=cfg.max_site_records)


def test_real_dp_updates_stay_inside_the_quantization_range(federation) -> None:
    # Prepare: real DP-SGD updates of every site, weighted as SecAgg+ weights them.
    _, cfg = federation
    s = _settings(cfg)
    for i in range(len(SIZES)):
        update, n = _plain_update(cfg, i)
        weighted = [u * (n / s.max_weight) for u in update]
        # Execute: Flower's quantizer and dequantizer with medsilo's range.
        restored = dequantize(quantize(weighted, s.clipping_range, s.quantization_range),
                              s.clipping_range, s.quantization_range)
        # Assert: nothing reached the clipping edge, and the round trip is within one step everywhere.
        peak = max(float(np.abs(w).max()) for w in weighted)
        assert 0 < peak < s.clipping_range
        assert max(float(np.abs(r - w).max()) for r, w in zip(restored, weighted, strict=True)) <= s.step * 1.0001


@pytest.mark.parametrize("drop", [None, "collect_masked_vectors"])
def test_server_sees_only_the_masked_sum_and_it_equals_the_weighted_mean(federation, drop) -> None:
    # Prepare
    tmp_path, cfg = federation
    s = _settings(cfg)
    plain = [_plain_update(cfg, i) for i in range(len(SIZES))]
    # Execute: one DP + SecAgg+ round; site 3 (node 12) drops out before sending its masked vector.
    grid = _run_round(cfg, drop_node_at_stage=drop, research=True)
    # Assert 1: nothing the server received is, or correlates with, a site's plain or quantized update.
    quantized = [np.concatenate([q.ravel() for q in quantize([u * (n / s.max_weight) for u in upd],
                                                             s.clipping_range, s.quantization_range)])
                 for upd, n in plain]
    flat_plain = [np.concatenate([u.ravel() for u in upd]) for upd, _ in plain]
    masked_seen = 0
    for msg in grid.received:
        assert not msg.has_error(), msg.error if msg.has_error() else None
        assert all(len(rec) == 0 for rec in msg.content.array_records.values())  # no weights in the clear
        rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if rec is None or Key.MASKED_PARAMETERS not in rec:
            continue
        masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in rec[Key.MASKED_PARAMETERS]])[1:]
        masked_seen += 1
        # Independent vectors of n values have a sample correlation of about N(0, 1/n): 6 standard deviations
        # (0.095 for BreastMNIST's ~4,000-weight model; a fixed 0.05 was only 3 and failed by chance).
        bound = 6 / np.sqrt(masked.size)
        for q, p in zip(quantized, flat_plain, strict=True):
            assert abs(np.corrcoef(masked.astype(float), q.astype(float))[0, 1]) < bound
            assert abs(np.corrcoef(masked.astype(float), p)[0, 1]) < bound
    assert masked_seen == (2 if drop else 3)
    # Assert 2: the global model moved by the weighted mean of the surviving sites' updates.
    survivors = plain[:2] if drop else plain
    total = sum(n for _, n in survivors)
    mean = [sum(u[k] * n for u, n in survivors) / total for k in range(len(survivors[0][0]))]
    state, _ = load_checkpoint(tmp_path / "run" / "model-final.safetensors")
    names = list(build_model(cfg.model, dataset_info(cfg.dataset)).state_dict())
    moved = [state[k].numpy() - w for k, w in zip(names, _initial(cfg), strict=True)]
    tolerance = len(survivors) * s.step / (total / s.max_weight) + 1e-6
    worst = max(float(np.abs(m - e).max()) for m, e in zip(moved, mean, strict=True))
    assert worst <= tolerance
    assert max(float(np.abs(e).max()) for e in mean) > 100 * tolerance  # the check can tell a real update
    # Assert 3: the final model was validated by its own stage, by every site still online
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["val"] == {} and rows[1]["val"]["sites"] == len(SIZES) - (1 if drop else 0)
    kinds = [m.metadata.message_type for m in grid.received]
    assert kinds.count("evaluate") == len(SIZES) - (1 if drop else 0)  # one evaluation exchange: the final model


def test_site_requiring_secure_aggregation_refuses_an_unmasked_round(federation) -> None:
    # Prepare: the coordinator turned secure aggregation off; sites require it.
    _, cfg = federation
    cfg = cfg.replace(secure_aggregation=False)
    from flwr.app import Context, RecordDict

    from server.app import main

    grid = LoopbackGrid(client_app, {10 + i: {"partition-id": i, "require-secure-aggregation": "true"}
                                     for i in range(len(SIZES))}, cfg.to_flower())
    # Execute: the run fails, with the sites' reason, and writes no model as if it were a result.
    with pytest.raises(NothingAggregated, match=r"site-0, site-1, site-2 refused: .*requires secure aggregation"):
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: every training request was answered with the policy error, no update left a site.
    train_replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train_replies) == 3
    assert all(m.has_error() and "requires secure aggregation" in m.error.reason for m in train_replies)
    assert not list((tmp_path_of(cfg)).glob("model-*.safetensors"))
    assert json.loads((tmp_path_of(cfg) / "federated.json").read_text())["aggregated_rounds"] == 0


def test_under_scaffold_the_server_learns_only_the_weighted_mean_of_the_sites_control_variates(federation) -> None:
    # Prepare: each site's reply (update and control variate c_i) replayed in this process.
    from common import control_variates as cv
    from server.resume import ResumeState

    tmp_path, cfg = federation
    cfg = cfg.replace(scaffold=True)
    s = _settings(cfg)
    start = _initial(cfg) + cv.encode([np.zeros_like(w) for w in _initial(cfg)], config=cfg)
    replies = []
    for i in range(len(SIZES)):
        from flwr.app import Context, RecordDict

        ctx = Context(run_id=1, node_id=10 + i, node_config={"partition-id": i,
                                                             "state-dir": str(tmp_path / f"replay-{i}")},
                      state=RecordDict(), run_config=cfg.to_flower())
        site = SiteClient(ctx, randomness=reproducible(seed=cfg.seed, site=i))
        reply, n, _ = site.fit(start, {"server-round": 1, "secure-aggregation": 1})
        replies.append((cv.decode(cv.split(reply, model_arrays=len(_initial(cfg)))[1], config=cfg), n))
    # Execute: one DP + SecAgg+ round with SCAFFOLD.
    grid = _run_round(cfg, research=True)
    # Assert: no array left a site in the clear, and the coordinator's c is the weighted mean of the c_i.
    assert all(len(rec) == 0 for msg in grid.received for rec in msg.content.array_records.values()
               if msg.metadata.message_type == "train")
    control = ResumeState.load(tmp_path / "run").strategy_arrays["control"]
    total = sum(n for _, n in replies)
    expected = cv.weighted_mean([c for c, _ in replies], [n for _, n in replies])
    tolerance = len(SIZES) * s.step / (total / s.max_weight) / cv.wire_scale(cfg) + 1e-7
    assert max(float(np.abs(c - e).max()) for c, e in zip(control, expected, strict=True)) <= tolerance
    assert max(float(np.abs(e).max()) for e in expected) > 1000 * tolerance  # a real mean gradient
