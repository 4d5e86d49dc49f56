"""Models on fixed features train on features computed once: the same training, without the recomputation.

A site keeps those features on its disk (:class:`common.features.FeatureCache`) between rounds and runs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import client.trainer as trainer
import common.features as features
from client.dp import sgd
from client.dp.rng import reproducible
from common.config import RunConfig
from common.datasets import Split, dataset_info
from common.models import build_model, fixed_front
from common.scattering import Scattering2D
from common.training import on_fixed_features, tensor_dataset

INFO = dataset_info("pneumoniamnist")


def _dataset(n: int = 48) -> torch.utils.data.TensorDataset:
    rng = np.random.default_rng(0)
    return tensor_dataset(Split(rng.integers(0, 255, (n, 28, 28)).astype(np.uint8), rng.integers(0, 2, n)), INFO)


@pytest.mark.parametrize("name", ["scatnet", "scatnet-mirror", "scatcnn"])
def test_the_trainable_part_on_fixed_features_is_the_whole_model(name: str) -> None:
    # Prepare
    model = build_model(name, INFO, seed=0).eval()
    x = _dataset().tensors[0][:8]

    # Execute
    split = fixed_front(model)
    assert split is not None
    front, trainable = split

    # Assert: same outputs; the front has no parameters, the trainable part all of them
    torch.testing.assert_close(trainable(front(x)), model(x))
    assert list(front.parameters()) == []
    assert [id(p) for p in trainable.parameters()] == [id(p) for p in model.parameters()]


def test_models_that_learn_from_the_first_layer_have_no_fixed_front() -> None:
    model = build_model("cnn", INFO)
    data = _dataset()
    assert fixed_front(model) is None
    assert on_fixed_features(model, data, augmented=False) == (model, data)


def test_augmented_training_recomputes_the_features() -> None:
    model, data = build_model("scatcnn", INFO), _dataset()
    net, used = on_fixed_features(model, data, augmented=True)
    assert net is model and used is data


@pytest.mark.parametrize("dp", [False, True])
def test_training_on_precomputed_features_equals_training_the_whole_model(
    dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: one round of 2 local epochs, with and without DP, from the same initial weights
    cfg = RunConfig(dataset="pneumoniamnist", model="scatcnn", batch_size=16, rounds=1, local_epochs=2,
                    epsilon=8.0, accountant="rdp", dp=dp)
    data = _dataset()

    def one_round() -> tuple[list[torch.Tensor], float]:
        model = build_model("scatcnn", INFO, seed=1)
        if dp:
            result = sgd.train_dp(model, data, INFO.task, cfg, sgd.plan_for_records(cfg, len(data)),
                                  randomness=reproducible(seed=5, site=0), server_round=1)
        else:
            result = trainer.train_plain(model, data, INFO.task, cfg, seed=5)
        return [p.detach().clone() for p in model.parameters()], result.train_loss

    # Execute: as medsilo trains, then with the features recomputed at every step
    cached, cached_loss = one_round()
    monkeypatch.setattr(trainer, "on_fixed_features", lambda model, dataset, **_: (model, dataset))
    whole, whole_loss = one_round()

    # Assert: the same Poisson batches, clipping and noise give the same weights (float rounding aside)
    assert cached_loss == pytest.approx(whole_loss, rel=1e-4)
    for a, b in zip(cached, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_server_evaluation_reuses_the_test_features_across_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the test split, and two "rounds" of the global model with different weights
    import server.evaluation as evaluation
    from common.training import predict_proba

    x, y = _dataset(40).tensors
    test_set = evaluation.TestSet(info=INFO, x=x, labels=y.numpy().ravel())
    calls = []
    real = evaluation.precompute
    monkeypatch.setattr(evaluation, "precompute", lambda *a, **k: calls.append(1) or real(*a, **k))
    rounds = [build_model("scatcnn", INFO, seed=s) for s in (1, 2)]

    # Execute
    scores = [test_set.scores(m) for m in rounds]

    # Assert: each round scored exactly as the whole model scores, from features computed once
    for model, got in zip(rounds, scores, strict=True):
        np.testing.assert_allclose(got, predict_proba(model, x, INFO.task), rtol=0, atol=1e-6)
    assert not np.allclose(scores[0], scores[1])
    assert len(calls) == 1
    assert test_set.scores(build_model("cnn", INFO, seed=1)).shape == (40,)  # no fixed front: the whole model


CPU = torch.device("cpu")


def _front(name: str) -> torch.nn.Module:
    """The fixed front of a new ``name`` model."""
    split = fixed_front(build_model(name, INFO))
    assert split is not None
    return split[0]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the record sets whose fixed features are computed (anywhere through ``common.features``)."""
    calls: list[int] = []
    real = features.precompute
    monkeypatch.setattr(features, "precompute", lambda front, x, **k: calls.append(len(x)) or real(front, x, **k))
    return calls


def test_the_cache_computes_features_once_and_later_objects_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    calls = _counting(monkeypatch)
    front = _front("scatcnn")
    x = _dataset(20).tensors[0]
    expected = features.precompute(front, x, device=CPU)
    calls.clear()

    # Execute: a first round, then a fresh object on the same folder (the next ClientApp process)
    first = features.FeatureCache(tmp_path).features(front, x, device=CPU)
    later = features.FeatureCache(tmp_path)
    second = later.features(front, x, device=CPU)

    # Assert: computed once, read back exactly, one private file in the cache folder
    assert calls == [20]  # the second object computed nothing
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o077 == 0


def test_other_records_or_another_front_are_computed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    calls = _counting(monkeypatch)
    cache = features.FeatureCache(tmp_path)
    x = _dataset(20).tensors[0]
    changed = x.clone()
    changed[3, 0, 5, 5] += 1.0  # one pixel of one record
    j2 = _front("scatcnn")
    other = torch.nn.Sequential(Scattering2D(J=1, L=4))  # another setting of the same transform

    # Execute
    a = cache.features(j2, x, device=CPU)
    b = cache.features(j2, changed, device=CPU)
    c = cache.features(other, x, device=CPU)
    cache.features(j2, x, device=CPU)

    # Assert: three record sets computed, the repeat read from disk, each file its own features
    assert calls == [20, 20, 20]
    assert not torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
    assert c.shape == (20, 5, 14, 14) and a.shape == (20, 81, 7, 7)


def test_a_changed_implementation_behind_the_same_settings_is_computed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: features cached by one version of the scattering, then its coarser wavelets change (an upgrade)
    calls = _counting(monkeypatch)
    front = _front("scatcnn")
    x = _dataset(10).tensors[0]
    cache = features.FeatureCache(tmp_path)
    old = cache.features(front, x, device=CPU)
    before = repr(front)

    # Execute
    front[0].psi[1].mul_(1.5)
    new = cache.features(front, x, device=CPU)

    # Assert: same description, yet not the stale features
    assert repr(front) == before
    assert calls == [10, 10]
    torch.testing.assert_close(new, features.precompute(front, x, device=CPU))
    assert not torch.allclose(new, old)


def test_a_damaged_cache_file_is_computed_again_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a cache file cut short (a disk error), and one of another record count
    calls = _counting(monkeypatch)
    front = _front("scatnet")
    x = _dataset(12).tensors[0]
    cache = features.FeatureCache(tmp_path)
    good = cache.features(front, x, device=CPU)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(path.read_bytes()[:200])

    # Execute
    with caplog.at_level(logging.WARNING):
        again = cache.features(front, x, device=CPU)
    np.save(path, np.zeros((3, 5), np.float32))
    with caplog.at_level(logging.WARNING):
        third = cache.features(front, x, device=CPU)

    # Assert: never trusted, computed again each time, the file replaced by a good one
    assert calls == [12, 12, 12]
    torch.testing.assert_close(again, good, rtol=0, atol=0)
    torch.testing.assert_close(third, good, rtol=0, atol=0)
    assert "damaged" in caplog.text and "does not match" in caplog.text
    torch.testing.assert_close(features.FeatureCache(tmp_path).features(front, x, device=CPU), good)
    assert calls == [12, 12, 12]


def test_the_cache_keeps_to_its_size_limit_least_recently_used_first(tmp_path: Path) -> None:
    # Prepare: room for about two record sets' features
    front = _front("scatnet")
    sets = [_dataset(10 + i).tensors[0] for i in range(3)]
    per_set = features.precompute(front, sets[0], device=CPU).numel() * 4
    cache = features.FeatureCache(tmp_path, max_bytes=int(2.5 * per_set))

    # Execute: A, B, read A again, then C
    names = []
    for x in (sets[0], sets[1], sets[0], sets[2]):
        cache.features(front, x, device=CPU)
        names.append(features.fingerprint(front, x))

    # Assert: B, the least recently used, made room for C
    left = {p.stem for p in tmp_path.glob("*.npy")}
    assert left == {names[0], names[3]}


def test_an_unwritable_cache_still_returns_the_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a cache folder that cannot be created (its parent is a file)
    (tmp_path / "state").write_text("not a folder")
    front = _front("scatnet")
    x = _dataset(8).tensors[0]

    # Execute
    with caplog.at_level(logging.WARNING):
        out = features.FeatureCache(tmp_path / "state" / "cache").features(front, x, device=CPU)

    # Assert
    torch.testing.assert_close(out, features.precompute(front, x, device=CPU))
    assert "not written" in caplog.text


def test_a_site_computes_its_features_once_over_rounds_and_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a BreastMNIST-sized site (its auto model is scatnet) and a fresh client per message, as Flower runs it
    import io

    from flwr.app import Context, RecordDict

    from client.data import site_file
    from client.site import SiteClient

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    images = (rng.integers(0, 120, (60, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, train_images=images[:40], train_labels=labels[:40], val_images=images[40:],
             val_labels=labels[40:])
    site_file(tmp_path, 0).write_bytes(buffer.getvalue())
    cfg = RunConfig(dataset="breastmnist", model="scatnet", site_data_dir=str(tmp_path), batch_size=16, rounds=3)
    params = [v.numpy() for v in build_model("auto", dataset_info("breastmnist"), seed=0).state_dict().values()]
    calls = _counting(monkeypatch)

    def client() -> SiteClient:
        return SiteClient(Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                                  state=RecordDict(), run_config=cfg.to_flower()))

    # Execute: three rounds, each validating the model it receives (from round 2 on) and training
    for rnd in (1, 2, 3):
        update, _, _ = client().fit(params, {"server-round": rnd, "validate-round": rnd - 1 if rnd > 1 else -1})
        params = [p + u for p, u in zip(params, update, strict=True)]
    client().evaluate(params, {})

    # Assert: the training and the validation records' features, each computed once, kept in the state folder
    assert sorted(calls) == [20, 40]
    state = tmp_path / "site-00-state"
    assert len(list((state / features.CACHE_FOLDER).glob("*.npy"))) == 2
