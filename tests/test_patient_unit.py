"""Patient-level DP-SGD (client/dp/patients.py) and the patient grouping a site's data carries (client/data.py)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import default_collate

from client.data import load_site_data
from client.dp.patients import PatientRecords, patient_gradients, patient_groups, per_image_loss, train_patients_dp
from common.config import RunConfig
from common.datasets import Task
from common.errors import DataError
from common.training import loss_function

#: Patients of 3, 1 and 2 images, interleaved (padding to K = 3 for two of them).
KEYS = ["p-b", "p-a", "p-b", "p-c", "p-b", "p-c"]


def _cnn(outputs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, outputs),
    )


def _records(task: Task, n: int = len(KEYS), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if task is Task.BINARY:
        return x, torch.randint(0, 2, (n, 1), generator=g).float()
    return x, torch.randint(0, 3, (n,), generator=g)


def _own_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor,
                   groups: np.ndarray) -> list[list[torch.Tensor]]:
    """Each patient's gradient of the training loss over that patient's images alone (plain autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for patient in range(int(groups.max()) + 1):
        idx = torch.from_numpy(np.flatnonzero(groups == patient))
        loss = loss_function(task)(model(x[idx]), y[idx])
        out.append(list(torch.autograd.grad(loss, params)))
    return out


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of several tensors taken as one vector."""
    return float(torch.cat([t.flatten() for t in tensors]).norm())


class _RecordingSGD(torch.optim.SGD):
    """SGD that remembers, at every step, the gradient it stepped on and how many patients were sampled."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        super().__init__(params, lr=lr)
        self.grads: list[list[torch.Tensor]] = []
        self.batch_sizes: list[int] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        ps = [p for group in self.param_groups for p in group["params"]]
        self.grads.append([p.grad.detach().clone() for p in ps])
        self.batch_sizes.append(int(ps[0].grad_sample.shape[0]))  # still set when DPOptimizer steps
        return super().step(closure)


def _train(model: nn.Module, records: PatientRecords, opt: torch.optim.Optimizer, acct: RDPAccountant, *,
           task: Task = Task.MULTICLASS, q: float = 1.0, sigma: float = 0.0, clip: float = 1.0,
           expected: float = 1.0, epochs: int = 1, seed: int = 0,
           after_step: Callable[[], None] | None = None) -> tuple[float, int]:
    return train_patients_dp(
        model, records, task=task, optimizer=opt, accountant=acct, sample_rate=q, noise_multiplier=sigma,
        max_grad_norm=clip, expected_batch_size=expected, epochs=epochs,
        sampling_generator=torch.Generator().manual_seed(seed), noise_generator=torch.Generator().manual_seed(seed + 1),
        after_step=after_step,
    )


# ------------------------------------------------------------------------------ grouping and per-patient gradients
def test_patient_groups_are_first_seen_indices_for_ints_and_strings() -> None:
    # Prepare
    strings, ints = np.asarray(KEYS), np.asarray([7, 3, 7, 9, 7, 9])
    # Execute
    from_strings, from_ints = patient_groups(strings), patient_groups(ints)
    # Assert
    assert from_strings.tolist() == from_ints.tolist() == [0, 1, 0, 2, 0, 2]
    assert patient_groups([]).shape == (0,)


def test_patient_records_stack_each_patients_images_with_padding_masked() -> None:
    # Prepare
    x, y = _records(Task.MULTICLASS)
    # Execute
    records = PatientRecords((x, y), patient_groups(KEYS))
    xs, ys, mask = records[2]  # patient "p-c": records 3 and 5
    # Assert
    assert len(records) == 3 and records.max_images == 3
    assert xs.shape == (3, 1, 8, 8) and ys.shape == (3,) and mask.tolist() == [True, True, False]
    assert torch.equal(xs[:2], x[[3, 5]]) and torch.equal(ys[:2], y[[3, 5]]) and not xs[2].any()


@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTICLASS])
def test_patient_gradient_is_the_gradient_of_that_patients_own_mean_loss(task: Task) -> None:
    # Prepare
    model = _cnn(1 if task is Task.BINARY else 3)
    x, y = _records(task)
    groups = patient_groups(KEYS)
    records = PatientRecords((x, y), groups)
    xb, yb, mb = default_collate([records[i] for i in range(len(records))])
    params = [p for p in model.parameters() if p.requires_grad]
    # Execute
    grads = patient_gradients(model, per_image_loss(task), xb, yb, mb, params)
    # Assert
    expected = _own_gradients(model, task, x, y, groups)
    assert [g.shape for g in grads] == [(3, *p.shape) for p in params]
    for patient, own in enumerate(expected):
        for g, e in zip(grads, own, strict=True):
            torch.testing.assert_close(g[patient], e, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ DP-SGD over patients
def test_noiseless_step_is_the_per_patient_clipped_sum_over_the_expected_batch_size() -> None:
    # Prepare
    model = _cnn(3)
    x, y = _records(Task.MULTICLASS)
    groups = patient_groups(KEYS)
    own = _own_gradients(model, Task.MULTICLASS, x, y, groups)
    norms = [_norm(grads) for grads in own]
    clip = float(np.median(norms))  # one patient clipped, one at the bound, one below
    lr, expected_size = 0.5, 2.5
    before = [p.detach().clone() for p in model.parameters()]
    factors = [min(1.0, clip / n) for n in norms]
    update = [-lr * sum(f * grads[i] for f, grads in zip(factors, own, strict=True)) / expected_size
              for i in range(len(before))]
    # Execute
    _, steps = _train(model, PatientRecords((x, y), groups), torch.optim.SGD(model.parameters(), lr=lr),
                      RDPAccountant(), clip=clip, expected=expected_size)
    # Assert
    assert steps == 1 and factors.count(1.0) >= 1 and min(factors) < 1.0
    for p, b, u in zip(model.parameters(), before, update, strict=True):
        torch.testing.assert_close(p.detach() - b, u, atol=1e-6, rtol=1e-4)


def test_a_patient_with_three_copies_of_an_image_contributes_at_most_the_clipping_norm() -> None:
    # Prepare
    model = _cnn(3)
    x, y = _records(Task.MULTICLASS, n=1)
    x3, y3 = x.repeat(3, 1, 1, 1), y.repeat(3)
    own = _own_gradients(model, Task.MULTICLASS, x, y, np.zeros(1, np.int64))[0]
    clip = 0.25 * _norm(own)  # every image's gradient exceeds C
    before = [p.detach().clone() for p in model.parameters()]
    # Execute
    _train(model, PatientRecords((x3, y3), np.zeros(3, np.int64)), torch.optim.SGD(model.parameters(), lr=1.0),
           RDPAccountant(), clip=clip, expected=1.0)
    # Assert: one clipped patient (norm C), not three clipped images (norm 3C)
    moved = _norm([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    assert moved == pytest.approx(clip, rel=1e-4)


class _SilentModel(nn.Module):
    """A linear model with a parameter that no loss depends on: its updates are DP-SGD's noise alone."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 3)
        self.silent = nn.Parameter(torch.zeros(4000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_noise_is_one_draw_per_step_with_std_sigma_c_over_the_expected_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import opacus.optimizers.optimizer as dp_optimizer

    draws: list[bool] = []
    generate = dp_optimizer._generate_noise

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        draws.append(bool(kwargs.get("secure_mode")))
        return generate(*args, **kwargs)

    monkeypatch.setattr(dp_optimizer, "_generate_noise", recording)
    model = _SilentModel()
    x, y = _records(Task.MULTICLASS, n=12)
    records = PatientRecords((x, y), np.arange(12) // 2)  # 6 patients of 2 images
    opt = _RecordingSGD(list(model.parameters()), lr=1.0)
    sigma, clip, expected_size, q = 1.3, 0.7, 3.0, 0.5
    # Execute
    _, steps = _train(model, records, opt, RDPAccountant(), q=q, sigma=sigma, clip=clip, expected=expected_size,
                      epochs=25)
    # Assert
    silent = [p is model.silent for p in model.parameters()].index(True)
    noise = torch.stack([grads[silent] for grads in opt.grads])  # (steps, 4000): the silent parameter's gradients
    assert steps == 50 and max(opt.batch_sizes) > 1
    assert draws == [True] * (steps * len(list(model.parameters())))  # one secure draw per parameter and step
    assert float(noise.std()) == pytest.approx(sigma * clip / expected_size, rel=0.02)
    per_step = noise.std(dim=1)  # the same std whatever the number of sampled patients
    assert float(per_step.max() / per_step.min()) < 1.15
    assert abs(float(torch.corrcoef(torch.stack([noise[:-1].flatten(), noise[1:].flatten()]))[0, 1])) < 0.02


def test_an_empty_poisson_batch_still_takes_a_noised_step_that_the_accountant_counts() -> None:
    # Prepare
    model = _cnn(3)
    x, y = _records(Task.MULTICLASS)
    records = PatientRecords((x, y), patient_groups(KEYS))
    opt = _RecordingSGD(list(model.parameters()), lr=0.1)
    acct = RDPAccountant()
    q, sigma, epochs = 0.1, 0.8, 2
    calls: list[int] = []
    # Execute
    loss, steps = _train(model, records, opt, acct, q=q, sigma=sigma, epochs=epochs, seed=3,
                         after_step=lambda: calls.append(1))
    # Assert
    assert steps == epochs * int(1 / q) == len(opt.batch_sizes) == len(calls)
    assert acct.history == [(sigma, q, epochs * int(1 / q))]
    empty = [i for i, b in enumerate(opt.batch_sizes) if b == 0]
    assert empty and len(empty) < steps and loss > 0
    for i in empty:  # the weights moved by noise alone
        assert all(g.abs().sum() > 0 for g in opt.grads[i])
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


# ------------------------------------------------------------------------------ a site's privacy unit
def _site_file(path: Path, n_train: int, **extra: np.ndarray) -> Path:
    arrays: dict[str, Any] = {
        "train_images": np.zeros((n_train, 28, 28), np.uint8), "train_labels": np.zeros(n_train, np.int64),
        "val_images": np.zeros((3, 28, 28), np.uint8), "val_labels": np.zeros(3, np.int64), **extra,
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def test_site_file_with_train_patients_trains_patients_and_without_them_records(tmp_path: Path) -> None:
    # Prepare
    config = RunConfig(dataset="breastmnist")
    grouped = _site_file(tmp_path / "grouped.npz", 6, train_patients=np.asarray(KEYS))
    plain = _site_file(tmp_path / "plain.npz", 6)
    # Execute
    site = load_site_data({"data-path": str(grouped)}, config)
    other = load_site_data({"data-path": str(plain)}, config)
    # Assert
    assert site.privacy_unit == "patient" and site.num_patients == 3
    assert site.train_patients is not None and site.train_patients.tolist() == [0, 1, 0, 2, 0, 2]
    assert other.privacy_unit == "record" and other.train_patients is None and other.num_patients is None


def test_site_file_whose_train_patients_has_the_wrong_length_is_one_data_error(tmp_path: Path) -> None:
    # Prepare
    bad = _site_file(tmp_path / "bad.npz", 6, train_patients=np.arange(5))
    # Execute
    with pytest.raises(DataError) as err:
        load_site_data({"data-path": str(bad)}, RunConfig(dataset="breastmnist"))
    # Assert
    message = str(err.value)
    assert str(bad) in message and "train_patients" in message and "(5,)" in message and "6 record" in message


def test_dicom_site_groups_training_records_by_patient_and_logs_only_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    from client.preprocessing import Preprocessing
    from client.site_check import check_source, record_patient_keys, training_records
    from common.datasets import load
    from simulations.archive import write_archive

    data = load("breastmnist")
    write_archive(tmp_path / "site", data.train.images[:40], data.train.labels[:40], data.info, site=1, seed=4)
    caplog.set_level(logging.INFO, logger="medsilo")
    # Execute
    site = load_site_data({"data-path": str(tmp_path / "site"), "state-dir": str(tmp_path / "state")},
                          RunConfig(dataset="breastmnist"))
    # Assert
    settings = Preprocessing.for_dataset("breastmnist", size=28, channels=1, spatial_dims=2)
    check = check_source(str(tmp_path / "site"), settings, state_dir=tmp_path / "state",
                         labels=tmp_path / "site" / "labels.csv", classes=data.info.labels)
    _, _, val = training_records(check)
    keys = [k for k, v in zip(record_patient_keys(check), val.tolist(), strict=True) if not v]
    assert site.privacy_unit == "patient" and site.train_patients is not None
    assert site.train_patients.tolist() == patient_groups(keys).tolist() and len(keys) == len(site.train)
    assert site.num_patients == len(set(keys)) < len(site.train)  # some patients have several images
    assert not any(k in caplog.text for k in set(keys))


def test_one_process_without_its_sampling_generator_is_refused_before_training() -> None:
    # Prepare
    model = _cnn(3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _records(Task.MULTICLASS)
    # Execute
    with pytest.raises(ValueError, match="one process received no sampling and noise generator") as err:
        train_patients_dp(model, PatientRecords((x, y), patient_groups(KEYS)), task=Task.MULTICLASS,
                          optimizer=torch.optim.SGD(model.parameters(), lr=1.0), accountant=RDPAccountant(),
                          sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.5,
                          epochs=1, sampling_generator=None, noise_generator=torch.Generator())
    # Assert: nothing trained, and the error says what is expected
    assert "expected both on the process that samples and noises" in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
