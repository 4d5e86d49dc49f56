"""Segmentation: metrics on hand-computed cases, volume padding / slice reassembly, patient-level DP records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from common.datasets import dataset_info, load
from common.models import build_model, model_problems
from common.segmentation_metrics import dice, hd95, summarize, volume_metrics
from common.training import DiceCELoss, PatientSamples, tensor_dataset, training_dataset
from common.volumes import from_slices, pad_or_crop, restore_shape, seeded_split, to_slices

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "msd" / "Task04_Hippocampus"
needs_data = pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="MSD Task04_Hippocampus not in ../shared/data/msd")


# ---------------------------------------------------------------- metrics, hand-computed
def test_dice_and_hd95_of_empty_masks_are_undefined_or_infinite() -> None:
    # Prepare
    empty = np.zeros((5, 5, 5), bool)
    one = empty.copy()
    one[2, 2, 2] = True
    # Execute / Assert: both empty -> undefined; one empty -> Dice 0 and no finite surface distance.
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty))
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert hd95(one, empty) == math.inf


def test_perfect_overlap_gives_dice_one_and_distance_zero() -> None:
    # Prepare
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 3:5, 1:7] = True
    # Execute / Assert
    assert dice(mask, mask) == 1.0
    assert hd95(mask, mask) == 0.0


def test_no_overlap_gives_dice_zero_and_the_hand_computed_distance() -> None:
    # Prepare: two single voxels 3 apart along x, and two 1x1x2 bars 4 apart (distances all 4).
    a = np.zeros((10, 10, 10), bool)
    b = a.copy()
    a[1, 5, 5] = True
    b[4, 5, 5] = True
    c = np.zeros((10, 10, 10), bool)
    d = c.copy()
    c[1, 5, 5:7] = True
    d[5, 5, 5:7] = True
    # Execute / Assert
    assert dice(a, b) == 0.0 and hd95(a, b) == pytest.approx(3.0)
    assert dice(c, d) == 0.0 and hd95(c, d) == pytest.approx(4.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)  # anisotropic voxels, in mm


def test_partial_overlap_and_per_class_summary() -> None:
    # Prepare: class 1 overlaps 2 of (2 + 4) voxels; class 2 is perfect in volume 0 and absent everywhere in volume 1.
    ref = np.zeros((2, 4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, 0, 0:2] = 1
    pred[0, 0, 0, 0:4] = 1
    ref[0, 3, 3, 3] = pred[0, 3, 3, 3] = 2
    ref[1, 1, 1, 1] = pred[1, 1, 1, 1] = 1
    # Execute
    per_volume = [volume_metrics(ref[i], pred[i], 3) for i in range(2)]
    summary = summarize(per_volume, ["anterior", "posterior"])
    # Assert: Dice = 2*2/(2+4); class 2 of volume 1 is undefined and left out of its mean.
    assert per_volume[0]["dice"] == [pytest.approx(2 / 3), 1.0]
    assert math.isnan(per_volume[1]["dice"][1])
    assert summary["dice"] == {"anterior": pytest.approx((2 / 3 + 1) / 2), "posterior": 1.0}
    assert summary["dice_mean"] == pytest.approx(((2 / 3 + 1) / 2 + 1) / 2)
    assert summary["hd95_infinite"] == 0 and summary["n_volumes"] == 2


# ---------------------------------------------------------------- volumes
def test_slice_reassembly_and_padding_round_trip() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    small = rng.integers(0, 3, (31, 45, 27)).astype(np.uint8)
    large = rng.integers(0, 3, (36, 60, 44)).astype(np.uint8)
    shape = (32, 56, 40)
    # Execute
    padded = pad_or_crop(small, shape)
    slices = to_slices(padded)
    restored = restore_shape(from_slices(slices), small.shape)
    cropped_back = restore_shape(pad_or_crop(large, shape), large.shape)
    # Assert: a volume that fits comes back exactly; a larger one keeps its centre, the cropped border is 0.
    assert len(slices) == 32 and slices[0].shape == (56, 40)
    assert np.array_equal(from_slices(slices), padded)
    assert np.array_equal(restored, small)
    assert np.array_equal(cropped_back[2:34, 2:58, 2:42], large[2:34, 2:58, 2:42])
    assert not cropped_back[:2].any() and not cropped_back[:, :, 42:].any()


def test_split_is_fixed_and_disjoint() -> None:
    # Prepare
    cases = [f"case_{i:03d}" for i in range(200)]
    # Execute
    first = seeded_split(cases, (150, 20, 30))
    second = seeded_split(list(reversed(cases)), (150, 20, 30))
    # Assert: independent of input order (and of any run seed); no case in two splits.
    assert first == second
    assert [len(s) for s in first] == [150, 20, 30]
    assert len(set(first[0]) | set(first[1]) | set(first[2])) == 200


@needs_data
def test_hippocampus_loads_every_mask_whole_in_the_fixed_shape() -> None:
    # Prepare
    from common.volumes import NiftiSource

    info = dataset_info("msd-hippocampus")
    source = NiftiSource(HIPPOCAMPUS)
    # Execute
    data = load("msd-hippocampus")
    # Assert
    assert (len(data.train), len(data.val), len(data.test)) == (150, 20, 30)
    assert data.train.images.shape[1:] == info.volume_shape and data.train.images.dtype == np.uint8
    assert data.test.shapes is not None and len(data.test.shapes) == 30
    for split in (data.train, data.val, data.test):
        assert set(np.unique(split.labels)) == {0, 1, 2}
    # No foreground voxel is lost by padding / cropping (checked on the test volumes, against the files).
    _, _, test_cases = seeded_split(source.cases(), (150, 20, 30))
    for i, case in enumerate(test_cases[:10]):
        _, mask = source.read(case)
        assert np.array_equal(restore_shape(data.test.labels[i], data.test.shapes[i]), mask)


# ---------------------------------------------------------------- models and loss
@pytest.mark.parametrize("name", ["unet2d", "unet3d"])
def test_unets_segment_whole_volumes_and_are_opacus_compatible(name: str) -> None:
    # Prepare
    info = dataset_info("msd-hippocampus")
    net = build_model(name, info, seed=0)
    x = torch.randn(2, 1, *info.volume_shape)  # type: ignore[misc]
    # Execute
    out = net(x)
    # Assert
    assert out.shape == (2, 3, *info.volume_shape)  # type: ignore[misc]
    assert ModuleValidator.validate(net, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_2d_unet_segments_each_slice_from_its_own_pixels() -> None:
    # Prepare
    net = build_model("unet2d", dataset_info("msd-hippocampus"), seed=0).eval()
    x = torch.randn(1, 1, 6, 16, 16)
    changed = x.clone()
    changed[:, :, 3] = torch.randn(16, 16)
    # Execute
    with torch.no_grad():
        before, after = net(x), net(changed)
    # Assert: only slice 3's prediction changes, and slice 0 alone gives slice 0's prediction.
    assert torch.allclose(before[:, :, [0, 1, 2, 4, 5]], after[:, :, [0, 1, 2, 4, 5]], atol=1e-6)
    assert not torch.allclose(before[:, :, 3], after[:, :, 3])
    with torch.no_grad():
        alone = net(x[:, :, :1])
    assert torch.allclose(alone[:, :, 0], before[:, :, 0], atol=1e-5)


def test_2d_unet_separates_classes_that_differ_only_by_position() -> None:
    # Prepare: a uniform band across every slice; its upper half is class 1, its lower half class 2. The
    # pixels are identical, so only the voxel coordinates (at the input and at the head) can tell them apart.
    torch.manual_seed(0)
    net = build_model("unet2d", dataset_info("msd-hippocampus"), seed=0)
    x = torch.zeros(2, 1, 2, 16, 16)
    y = torch.zeros(2, 2, 16, 16, dtype=torch.long)
    x[..., 4:12] = 1.0
    y[..., :8, 4:12], y[..., 8:, 4:12] = 1, 2
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = DiceCELoss()
    # Execute
    for _ in range(60):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        pred = net(x).argmax(1).numpy()
    # Assert
    scores = volume_metrics(y.numpy()[0], pred[0], 3)["dice"]
    assert min(scores) > 0.9, scores


def test_segmentation_models_only_for_segmentation_data() -> None:
    assert "segmentation model" in model_problems("unet2d", dataset_info("breastmnist"))[0]
    assert "unet2d" in model_problems("cnn-3d", dataset_info("msd-hippocampus"))[0]
    assert model_problems("auto", dataset_info("msd-hippocampus")) == []


def test_dice_ce_loss_is_a_mean_of_per_record_losses() -> None:
    # Prepare
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4, 8, 8)
    target = torch.randint(0, 3, (3, 4, 8, 8))
    loss = DiceCELoss()
    # Execute
    whole = loss(logits, target)
    each = torch.stack([loss(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    perfect = loss(torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50, target)
    # Assert: per-record decomposition (what per-record clipping needs); near 0 for a confident perfect prediction.
    assert whole == pytest.approx(float(each.mean()), rel=1e-5)
    assert float(perfect) < 1e-3


def test_dice_ce_loss_does_not_reward_suppressing_a_class_absent_from_the_record() -> None:
    # Prepare: the record shows only class 1; two predictions differ only in the (tiny) probability of class 2.
    target = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    target[0, :, 2:5, 2:5] = 1
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 8
    suppressed = logits.clone()
    suppressed[:, 2] -= 20
    # Execute
    loss = DiceCELoss()
    # Assert: no Dice term for class 2, so suppressing it further gains (almost) nothing.
    assert float(loss(logits, target)) - float(loss(suppressed, target)) < 1e-3


# ---------------------------------------------------------------- patient-level DP records
def _toy_patients(n: int = 3, slices: int = 10) -> tuple[torch.utils.data.TensorDataset, object]:
    info = dataset_info("msd-hippocampus")
    torch.manual_seed(0)
    x = torch.randn(n, 1, slices, 16, 16)
    y = torch.randint(0, 3, (n, slices, 16, 16))
    return torch.utils.data.TensorDataset(x, y), info


def test_patient_samples_draw_each_record_from_one_patient_only() -> None:
    # Prepare
    base, _ = _toy_patients()
    samples = PatientSamples(base, slices=4, seed=1)
    # Execute
    records = [samples[i] for i in range(3)]
    # Assert: each record holds 4 of its own patient's slices, with the matching masks.
    for i, (x, y) in enumerate(records):
        assert x.shape == (1, 4, 16, 16) and y.shape == (4, 16, 16)
        own = base.tensors[0][i, 0]
        matches = [int(torch.nonzero((own == s).all(-1).all(-1)).flatten()[0]) for s in x[0]]
        assert len(set(matches)) == 4
        assert all(torch.equal(y[j], base.tensors[1][i, k]) for j, k in enumerate(matches))


@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_per_sample_gradient_is_the_per_patient_gradient(mode: str) -> None:
    # Prepare: a batch of 3 patients, each a record of 4 slices.
    base, info = _toy_patients()
    samples = PatientSamples(base, slices=4, seed=0)
    x = torch.stack([samples[i][0] for i in range(3)])
    y = torch.stack([samples[i][1] for i in range(3)])
    net = build_model("unet2d", info, seed=0)
    reference = []
    for i in range(3):  # each patient's own gradient, computed alone
        net.zero_grad()
        DiceCELoss()(net(x[i : i + 1]), y[i : i + 1]).backward()
        reference.append([p.grad.clone() for p in net.parameters()])
    # Execute: Opacus's per-sample gradients of the batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "hooks":
            gsm = GradSampleModule(build_model("unet2d", info, seed=0))
            DiceCELoss()(gsm(x), y).backward()
            per_sample = [p.grad_sample for p in gsm.parameters()]
        else:
            from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

            fresh = build_model("unet2d", info, seed=0)
            DiceCELoss()(call_for_per_sample_grads(fresh, batch_size=3, loss_reduction="mean")(x), y).backward()
            per_sample = [p.grad_sample for p in fresh.parameters()]
    # Assert: one gradient per patient (not per slice), equal to that patient's own gradient.
    for g, ref_index in zip(per_sample, range(len(per_sample)), strict=True):
        assert g.shape[0] == 3
        for i in range(3):
            assert torch.allclose(g[i], reference[i][ref_index], atol=1e-6, rtol=1e-4)


def test_training_dataset_makes_one_record_per_patient() -> None:
    # Prepare
    from common.datasets import Split

    info = dataset_info("msd-hippocampus")
    split = Split(np.zeros((5, *info.volume_shape), np.uint8), np.zeros((5, *info.volume_shape), np.int64))  # type: ignore[misc]
    # Execute
    slice_wise = training_dataset(split, info, "unet2d", seed=0)
    patches = training_dataset(split, info, "unet3d", seed=0)
    # Assert: as many records as patients, so Opacus's sample rate batch/len is per patient.
    assert len(slice_wise) == len(patches) == 5 == len(tensor_dataset(split, info))
    assert slice_wise[0][0].shape[1] == 4 and patches[0][0].shape[1:] == (16, 32, 24)


# ---------------------------------------------------------------- end to end
@needs_data
@pytest.mark.slow
def test_two_site_one_round_segmentation_federation_improves_dice(tmp_path) -> None:
    # Prepare
    out = tmp_path / "run"
    # Execute: one round, no DP, no references: the federated model must beat the initial one. Each
    # hospital holds its volumes as a DICOM archive (MR series + DICOM-SEG) and reads it as a deployed node does.
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--dataset", "msd-hippocampus", "--sites", "2",
         "--partition", "iid", "--rounds", "1", "--local-epochs", "3", "--no-dp", "--no-compare", "--dicom",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    segs = sorted((out / "sites").glob("site-0?/dicom/*/SEG/*.dcm"))
    assert len(segs) == 170 and not list((out / "sites").glob("site-*.npz"))  # 150 train + 20 val patients
    import pydicom  # the archive's synthetic identities must not reach any output of the run

    phi = {str(v) for seg in segs[::17] for v in (pydicom.dcmread(seg, stop_before_pixels=True).get(k)
                                                  for k in ("PatientName", "PatientID", "AccessionNumber")) if v}
    outputs = result.stdout + result.stderr + "".join(
        (out / name).read_text() for name in ("summary.json", "metrics.jsonl", "federated.json", "report.md"))
    assert len(phi) >= 20 and not [v for v in phi if v in outputs]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    initial, trained = rounds[0]["test"]["dice_mean"], rounds[1]["test"]["dice_mean"]
    assert trained > initial + 0.1, (initial, trained)
    assert {s["site"] for s in rounds[1]["val_sites"]} == {"site-0", "site-1"}
    assert all("dice_mean" in s for s in rounds[1]["val_sites"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["federated"]["dice"]) == {"anterior", "posterior"}
    assert summary["privacy_unit"] == "patient" and summary["model"] == "unet2d"
    for name in ("report.md", "plots/dice.png", "plots/contours.png", "model-best.safetensors"):
        assert (out / name).is_file(), name
