"""A site's personalised model: DP-SGD fine-tuning of the global model, charged to the site's ledger first."""

from __future__ import annotations

import io
import math
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import SiteData
from client.dp.budget import Refused
from client.dp.ledger import DataSource, Ledger
from client.dp.rng import os_entropy
from client.personalise import PERSONALISE, load_global_model, personalisation_config, personalise
from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import Split, dataset_info
from common.errors import DataError
from common.models import build_model
from common.site_policy import SitePolicy

ROOT = Path(__file__).resolve().parents[1]
INFO = dataset_info("breastmnist")
#: The rdp accountant keeps most of these tests fast; the mechanism and the ledger are the same for prv.
BASE = RunConfig(dataset="breastmnist", model="cnn", batch_size=32, seed=0, accountant="rdp")


def _split(n: int, seed: int) -> Split:
    """28-pixel images whose label says which half is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(60, 120, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i][:, 14:] += 80 * int(label)
    return Split(images, labels.astype(np.int64))


def _site(n: int = 200) -> SiteData:
    return SiteData("site-0", INFO, _split(n, 0), _split(40, 1))


#: Opacus's PRV ε is an upper bound up to ~0.02 above the true ε; dp_accounting's pessimistic PLD sits at most
#: ~2e-3 above it (see tests/test_privacy.py, which measures both).
PRV_SLACK, PLD_SLACK = 0.025, 2e-3


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of ``history`` by Google's dp_accounting PLD accountant (neither Opacus nor medsilo's accounting)."""
    import dp_accounting
    from dp_accounting import pld

    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), t)
        for s, q, t in history])
    acct = pld.PLDAccountant(value_discretization_interval=1e-3)
    acct.compose(event)
    return float(acct.get_epsilon(delta))


def test_the_personalisation_charged_in_the_ledger_is_the_epsilon_an_independent_accountant_computes(tmp_path) -> None:
    # Prepare: a ledger that already holds a federated run's DP-SGD (the site's earlier releases)
    ledger = Ledger(tmp_path / "state", DataSource("src-0123456789abcdef", "test"))
    federation = (1.1, 0.1, 120)
    assert ledger.charge(run=1, server_round=1, mechanism="dp-sgd", entry=federation, epsilon=8, delta=1e-5,
                         lifetime_epsilon=None, lifetime_delta=1e-5, accountant="prv").granted
    config = personalisation_config(BASE.replace(accountant="prv"), epsilon=2.0, epochs=2)
    model = build_model("cnn", INFO, seed=0)

    # Execute
    done = personalise(model, _site(), config, ledger=ledger, policy=None, randomness=os_entropy(), run=77)

    # Assert: the ledger holds the count release and the planned steps, at the rate the DP count implies
    plan = done.plan
    q = 1 / math.ceil(plan.records_estimate / 32)
    steps = 2 * int(1 / q)
    assert plan.sample_rate == pytest.approx(q) and plan.steps_per_round == steps == done.steps
    assert ledger.history(77) == [(20.0, 1.0, 1), (plan.noise_multiplier, q, steps)]  # σ_N = 10·sqrt(8/2)
    own = _independent_epsilon([(20.0, 1.0, 1), (plan.noise_multiplier, q, steps)], 1e-5)
    assert own - PLD_SLACK <= done.epsilon <= own + PRV_SLACK
    assert 2.0 - 0.02 <= done.epsilon <= 2.0  # σ spends the personalisation ε, not more
    total = _independent_epsilon([federation, (20.0, 1.0, 1), (plan.noise_multiplier, q, steps)], 1e-5)
    assert total - PLD_SLACK <= done.epsilon_lifetime <= total + PRV_SLACK  # the site's total: the composition
    assert done.epsilon_lifetime < _independent_epsilon([federation], 1e-5) + 2.0  # cheaper than adding the ε
    assert ledger.round_state(77, 1, PERSONALISE) == "completed"


def test_a_personalisation_past_the_lifetime_budget_is_refused_before_anything_is_charged_or_trained(
        tmp_path) -> None:
    # Prepare: a federation that spent most of the policy's lifetime budget
    ledger = Ledger(tmp_path / "state", DataSource("src-0123456789abcdef", "test"))
    assert ledger.charge(run=1, server_round=1, mechanism="dp-sgd", entry=(1.1, 0.1, 120), epsilon=8, delta=1e-5,
                         lifetime_epsilon=None, lifetime_delta=1e-5, accountant="rdp").granted
    spent = ledger.spent(delta=1e-5, accountant="rdp")
    policy = SitePolicy(epsilon_per_run=8.0, epsilon_lifetime=spent + 0.05, min_noise_multiplier=0.0)
    config = personalisation_config(BASE, epsilon=2.0, epochs=2)
    model = build_model("cnn", INFO, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = ledger.history()

    # Execute
    with pytest.raises(Refused) as refused:
        personalise(model, _site(), config, ledger=ledger, policy=policy, randomness=os_entropy())

    # Assert
    assert "lifetime budget" in str(refused.value) and "nothing was charged" in str(refused.value)
    assert ledger.history() == history
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_personalisation_above_the_policys_epsilon_per_run_is_refused(tmp_path) -> None:
    # Prepare
    ledger = Ledger(tmp_path / "state", DataSource("src-0123456789abcdef", "test"))
    config = personalisation_config(BASE, epsilon=9.0, epochs=1)

    # Execute
    with pytest.raises(Refused) as refused:
        personalise(build_model("cnn", INFO), _site(), config, ledger=ledger, policy=SitePolicy(),
                    randomness=os_entropy())

    # Assert
    assert "epsilon=9.0 exceeds epsilon-per-run=8.0" in str(refused.value)
    assert ledger.history() == []


def test_a_checkpoint_that_does_not_fit_the_model_is_one_clear_error(tmp_path) -> None:
    # Prepare: the coordinator's file holds another model's weights; another holds a non-finite weight
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, build_model("scatnet", INFO).state_dict(), {})
    state = build_model("cnn", INFO).state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("inf")
    poisoned = tmp_path / "poisoned.safetensors"
    save_checkpoint(poisoned, state, {})
    pickled = tmp_path / "model.pt"
    torch.save(build_model("cnn", INFO).state_dict(), pickled)

    # Execute
    errors = []
    for path in (other, poisoned, pickled):
        with pytest.raises(DataError) as caught:
            load_global_model(path, BASE, INFO)
        errors.append(str(caught.value))

    # Assert
    assert str(other) in errors[0] and "does not fit model cnn" in errors[0]
    assert first in errors[1] and "non-finite" in errors[1]
    assert "only .safetensors" in errors[2]


def _kit(tmp_path: Path, *, lifetime: float = 24.0) -> Path:
    kit = tmp_path / "kit"
    kit.mkdir(exist_ok=True)
    (kit / "kit.toml").write_text('[kit]\nrole = "site"\nfederation = "f"\nsite = "hospital-a"\n'
                                  'superlink = "localhost:9092"\n')
    (kit / "site-policy.toml").write_text(f"[privacy]\nepsilon-per-run = 2.0\nepsilon-lifetime = {lifetime}\n"
                                          "delta = 1e-5\nmin-noise-multiplier = 0.3\n")
    return kit


def _site_file(path: Path) -> None:
    train, val = _split(200, 0), _split(40, 1)
    buf = io.BytesIO()
    np.savez(buf, train_images=train.images, train_labels=train.labels, val_images=val.images,
             val_labels=val.labels)
    path.write_bytes(buf.getvalue())


def test_site_personalise_writes_the_model_owner_only_and_charges_the_nodes_ledger(tmp_path) -> None:
    # Prepare: a hospital kit, its data file and the coordinator's global model
    from client.dp.ledger import ledgers_in
    from client.personalise import site_personalise

    kit = _kit(tmp_path)
    data = tmp_path / "site.npz"
    _site_file(data)
    checkpoint = tmp_path / "model-best.safetensors"
    save_checkpoint(checkpoint, build_model("cnn", INFO, seed=0).state_dict(),
                    {"dataset": "breastmnist", "model": "cnn", "threshold": 0.4, "round": 3})

    # Execute
    path, record = site_personalise(kit=kit, data=str(data), labels=None, checkpoint=checkpoint, epsilon=2.0,
                                    delta=None, epochs=1, lr=None, dataset=None, model=None, out=tmp_path / "out")

    # Assert: owner-only files, a loadable model of the same architecture, the charge in the node's ledger
    for written in (path, tmp_path / "out" / "personalised.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    _, meta = load_global_model(path, BASE, INFO)
    assert meta["personalised"]["epsilon"] == record["personalised"]["epsilon"] <= 2.0
    assert meta["threshold"] == 0.4 and meta["global_round"] == 3
    (ledger,), _ = ledgers_in(kit / "state")
    assert ledger.source.label == str(data.resolve())
    assert ledger.spent(delta=1e-5, accountant="prv") == pytest.approx(record["personalised"]["epsilon_lifetime"])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_site_personalise_refuses_when_the_lifetime_budget_is_spent_and_writes_nothing(tmp_path) -> None:
    # Prepare: the node's data source already spent most of its lifetime budget in a federation
    from client.dp.ledger import data_source

    data = tmp_path / "site.npz"
    _site_file(data)
    ledger = Ledger(tmp_path / "kit" / "state", data_source({"data-path": str(data)}, {}))
    assert ledger.charge(run=1, server_round=1, mechanism="dp-sgd", entry=(1.1, 0.1, 120), epsilon=8, delta=1e-5,
                         lifetime_epsilon=None, lifetime_delta=1e-5, accountant="prv").granted
    history = ledger.history()
    kit = _kit(tmp_path, lifetime=round(max(2.0, ledger.spent(delta=1e-5, accountant="prv") + 0.05), 3))
    checkpoint = tmp_path / "model-best.safetensors"
    save_checkpoint(checkpoint, build_model("cnn", INFO, seed=0).state_dict(), {"dataset": "breastmnist",
                                                                                 "model": "cnn"})

    # Execute: the hospital's command, in its own process
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "site", "personalise", "--kit", str(kit), "--data", str(data),
         "--checkpoint", str(checkpoint), "--epsilon", "2", "--epochs", "1", "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)

    # Assert: ε = 2 fits the per-run cap; the lifetime cap refuses it, before anything is charged or written
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "personalisation refused" in result.stderr and "lifetime budget" in result.stderr
    assert ledger.history() == history
    assert not (tmp_path / "out").exists()
