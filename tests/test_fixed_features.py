"""Models on fixed features train on features computed once: the same training, without the recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import client.trainer as trainer
from common.config import RunConfig
from common.datasets import Split, dataset_info
from common.models import build_model, fixed_front
from common.training import on_fixed_features, tensor_dataset

INFO = dataset_info("pneumoniamnist")


def _dataset(n: int = 48) -> torch.utils.data.TensorDataset:
    rng = np.random.default_rng(0)
    return tensor_dataset(Split(rng.integers(0, 255, (n, 28, 28)).astype(np.uint8), rng.integers(0, 2, n)), INFO)


@pytest.mark.parametrize("name", ["scatnet", "scatcnn"])
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
            result = trainer.train_dp(model, data, INFO.task, cfg, trainer.plan_privacy(cfg, len(data)), [], seed=5)
        else:
            result = trainer.train_plain(model, data, INFO.task, cfg, seed=5)
        return [p.detach().clone() for p in model.parameters()], result.train_loss

    # Execute: as medsilo trains, then with the features recomputed at every step
    cached, cached_loss = one_round()
    monkeypatch.setattr(trainer, "on_fixed_features", lambda model, dataset, augmented: (model, dataset))
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
