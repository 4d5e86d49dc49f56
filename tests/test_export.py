"""Model export (TorchScript, ONNX, model card) and inference with Grad-CAM explanations at the hospital."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.explain import grad_cam
from client.inference import ExportedModel, predict
from common.checkpoint import save_checkpoint
from common.cli import main as cli
from common.datasets import dataset_info, to_tensor_layout
from common.errors import ConfigError, DataError
from common.io import atomic_write_json
from common.models import ExplainableModel, build_model, fixed_front
from common.training import predict_proba
from server.export import export_run

INFO = dataset_info("pneumoniamnist")


def _run_folder(root: Path, model: torch.nn.Module, name: str = "cnn") -> Path:
    """A finished run folder as the coordinator writes it (checkpoint, federated.json, summary.json)."""
    run = root / "run"
    meta = {"dataset": INFO.name, "task": INFO.task.value, "labels": list(INFO.labels), "model": name, "round": 3,
            "threshold": 0.42, "dp": True, "epsilon": 8.0, "delta": 1e-5}
    save_checkpoint(run / "model-best.safetensors", model.state_dict(), meta)
    privacy = [{"site": f"site-{i}", "epsilon": 7.9, "delta": 1e-5, "accountant": "prv", "rounds_trained": 4}
               for i in range(3)]
    atomic_write_json(run / "federated.json", {"rounds": 4, "strategy": "fedavgm", "privacy": privacy,
                                               "best": {"auc": 0.91, "auc_ci": [0.88, 0.93], "round": 3}})
    atomic_write_json(run / "summary.json", {"sites": 3, "dataset_release": "v2/v3", "dataset_md5": INFO.md5})
    return run


def _images(n: int = 6, size: int = 28) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size)).astype(np.uint8)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["cnn", "scatnet", "scatnet-mirror", "scatcnn"])
def test_exported_model_predicts_the_same_as_the_in_memory_model(tmp_path, name: str) -> None:
    # Prepare: a model, its run folder, and test images written as PNG files.
    model = build_model(name, INFO, seed=3).eval()
    run = _run_folder(tmp_path, model, name)
    images = _images()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(inputs / f"case-{i}.png")
    expected = predict_proba(model, to_tensor_layout(images, INFO), INFO.task)  # training-time preprocessing
    # Execute: export, then predict through the command line with TorchScript, and with ONNX Runtime.
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert cli(["predict", "--model", str(tmp_path / "bundle"), str(inputs), "--out", str(tmp_path / "ts")]) == 0
    onnx_model = ExportedModel.load(tmp_path / "bundle" / "model.onnx")
    onnx_probs = onnx_model.probabilities(to_tensor_layout(images, INFO))[:, 0]
    # Assert
    rows = json.loads((tmp_path / "ts" / "predictions.json").read_text())["predictions"]
    scripted = np.array([r["probabilities"][INFO.labels[1]] for r in rows])
    np.testing.assert_allclose(scripted, expected, rtol=0, atol=1e-6)
    # ONNX Runtime sums in another order; the scattering's 21 x 21 wavelet filters add a little float32 rounding
    np.testing.assert_allclose(onnx_probs, expected, rtol=0, atol=1e-5 if name == "cnn" else 5e-5)
    assert [r["label"] for r in rows] == [INFO.labels[int(p >= 0.42)] for p in expected]
    assert all(Path(r["heatmap_png"]).is_file() for r in rows)


def test_model_card_describes_task_preprocessing_training_and_privacy(tmp_path) -> None:
    # Prepare
    run = _run_folder(tmp_path, build_model("cnn", INFO, seed=0))
    # Execute
    card = export_run(run, tmp_path / "bundle")
    # Assert
    data = json.loads((tmp_path / "bundle" / "model-card.json").read_text())
    assert data["task"] == "binary-class" and data["classes"] == ["normal", "pneumonia"]
    pre = data["preprocessing"]
    assert (pre["channels"], pre["size"], pre["spatial_dims"], pre["layout"]) == (1, 28, 2, "NCHW")
    assert pre["normalization"] == "window" and pre["scale"] == "v / 127.5 - 1" and "pad to square" in pre["geometry"]
    assert data["sites"] == 3 and data["rounds"] == 4 and data["checkpoint_round"] == 3
    assert [p["epsilon"] for p in data["privacy"]] == [7.9] * 3 and data["privacy"][0]["delta"] == 1e-5
    assert data["metrics"]["auc"] == 0.91 and data["dataset"]["md5"] == INFO.md5
    assert data["dataset"]["version"] == "MedMNIST v2/v3, 28 px"  # the release summary.json recorded
    assert data["medsilo_version"] and data["threshold"] == 0.42
    assert set(card.files) == {"model.pt", "model.onnx"}
    md = (tmp_path / "bundle" / "model-card.md").read_text()
    assert "site-2 | 7.900" in md and "v / 127.5 - 1" in md and "pneumonia" in md


def test_export_problems_are_reported_together_and_a_changed_model_file_is_refused(tmp_path) -> None:
    # Prepare
    run = _run_folder(tmp_path, build_model("cnn", INFO, seed=0))
    export_run(run, tmp_path / "bundle")
    # Execute / Assert: wrong arguments, all at once.
    with pytest.raises(ConfigError) as err:
        export_run(tmp_path / "nowhere", tmp_path / "bundle")
    assert len(err.value.problems) == 2
    # A byte changed in the TorchScript file: it no longer matches the card's SHA-256.
    script = tmp_path / "bundle" / "model.pt"
    data = bytearray(script.read_bytes())
    data[-100] ^= 0xFF
    script.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the model card"):
        ExportedModel.load(tmp_path / "bundle")


# ------------------------------------------------------------------------------ DICOM
def test_a_dicom_image_predicts_like_the_same_pixels_as_png_and_goes_back_as_dicom(tmp_path) -> None:
    # Prepare: one 8-bit image as a DICOM object (the simulations' synthetic writer) and as PNG, 40 x 56 (not square).
    import client.dicom as dicom
    from simulations import synthetic_dicom

    model = build_model("cnn", INFO, seed=0)
    export_run(_run_folder(tmp_path, model), tmp_path / "bundle")
    pixels = np.random.default_rng(3).integers(0, 256, (40, 56)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    identity = synthetic_dicom.Identity(patient_name="Doe^Jane", patient_id="MRN1", birth_date="19800101", sex="F",
                                        accession="ACC1", study_uid=dicom.new_uid(), series_uid=dicom.new_uid(),
                                        study_date="20240101", institution="Test Hospital")
    equipment = synthetic_dicom.Equipment(manufacturer="ACME", model="X1", station="S1", modality="DX")
    (tmp_path / "scan.dcm").write_bytes(dicom.dataset_bytes(synthetic_dicom.image_dataset(
        pixels / 255.0, identity=identity, equipment=equipment, instance_number=1)))
    bundle = ExportedModel.load(tmp_path / "bundle")
    # Execute
    from_dicom = predict(bundle, [tmp_path / "scan.dcm"], tmp_path / "out", dicom_out=True)[0]
    from_png = predict(bundle, [tmp_path / "scan.png"], tmp_path / "png", dicom_out=True)[0]
    # Assert: same probabilities; the DICOM input's result is a Secondary Capture in the patient's study with the
    # full-size overlay; a PNG input has no study to go back to
    assert from_dicom.probabilities == pytest.approx(from_png.probabilities, abs=1e-6)
    (written,) = from_dicom.written
    result = dicom.read_image(written)
    assert result.header.study_uid == identity.study_uid and result.header.patient_key == "MRN1"
    assert result.header.sop_class == "Secondary Capture Image Storage" and result.pixels.shape == (1, 40, 56, 3)
    assert from_png.written == []


# ------------------------------------------------------------------------------ Grad-CAM
def _lesion_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy backgrounds; half carry a bright disc of radius 3 (the lesion) at a random place."""
    images = rng.normal(90, 25, (n, 28, 28))
    labels = rng.integers(0, 2, n)
    centres = rng.integers(5, 23, (n, 2))
    yy, xx = np.mgrid[:28, :28]
    for i in np.flatnonzero(labels):
        cy, cx = centres[i]
        images[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] += 120
    return np.clip(images, 0, 255).astype(np.uint8), labels, centres


def _train_lesion_detector(name: str) -> torch.nn.Module:
    """Model ``name`` trained to detect the lesion; a model on fixed features trains on them, computed once."""
    rng = np.random.default_rng(0)
    images, labels, _ = _lesion_images(1024, rng)
    model = build_model(name, INFO, seed=0)
    split = fixed_front(model)
    front, net = split if split is not None else (torch.nn.Identity(), model)
    with torch.no_grad():
        x = front(torch.from_numpy(to_tensor_layout(images, INFO)))
    y = torch.from_numpy(labels).float()
    steps, batch = (60, 32) if split is None else (100, 64)  # a linear model takes more, larger steps
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(steps):
            idx = torch.from_numpy(rng.integers(0, len(x), batch))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx])[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _lesion_heatmap(root: Path, model: torch.nn.Module, name: str, centre: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Grad-CAM of ``model`` (in memory; its export checked equal) on an image with a lesion at ``centre``.

    Returns the heatmap and the lesion's mask. ``model`` must really detect lesions for checks on its heatmap
    to mean anything: asserted first.
    """
    test, test_labels, _ = _lesion_images(256, np.random.default_rng(1))
    accuracy = np.mean((predict_proba(model, to_tensor_layout(test, INFO), INFO.task) >= 0.5) == test_labels)
    assert accuracy > 0.9, accuracy
    image = np.clip(np.random.default_rng(2).normal(90, 25, (28, 28)), 0, 255)
    yy, xx = np.mgrid[:28, :28]
    lesion = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 9
    image[lesion] += 120
    sample = torch.from_numpy(to_tensor_layout(np.clip(image, 0, 255).astype(np.uint8)[None], INFO))
    export_run(_run_folder(root, model, name), root / "bundle")
    heat_memory = grad_cam(ExplainableModel(model).eval(), sample)
    heat_export = ExportedModel.load(root / "bundle").heatmap(sample[0].numpy())
    assert heat_export is not None
    np.testing.assert_allclose(heat_memory, heat_export, atol=1e-5)  # the exported TorchScript file explains alike
    return heat_memory, lesion


@pytest.mark.parametrize(("name", "centre"), [("cnn", (7, 20)), ("cnn", (20, 7)), ("cnn", (22, 22)),
                                           ("scatnet-mirror", (7, 20)), ("scatnet-mirror", (20, 7))])
def test_heatmap_peak_lies_on_a_planted_lesion(tmp_path, name: str, centre: tuple[int, int]) -> None:
    # Prepare: a model that learned to detect the lesion (the CNN, or the mirror-invariant linear model)
    model = _train_lesion_detector(name)
    # Execute: Grad-CAM of an image with the lesion at ``centre``, in memory and exported
    heat, lesion = _lesion_heatmap(tmp_path, model, name, centre)
    # Assert: the peak lies on the lesion
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert lesion[peak], (peak, centre)
    assert heat[lesion].mean() > 1.4 * heat[~lesion].mean()
    if name == "scatnet-mirror":  # it scores an image and its mirror alike, yet points at the lesion only
        assert heat[lesion].mean() > 5 * heat[lesion[:, ::-1]].mean()


# ------------------------------------------------------------------------------ segmentation
SEG_INFO = dataset_info("msd-hippocampus")


def _seg_run(root: Path) -> tuple[Path, torch.nn.Module]:
    model = build_model("unet2d", SEG_INFO, seed=0).eval()  # its random weights give all three labels
    run = root / "seg-run"
    meta = {"dataset": SEG_INFO.name, "task": SEG_INFO.task.value, "labels": list(SEG_INFO.labels),
            "model": "unet2d", "round": 2}
    save_checkpoint(run / "model-best.safetensors", model.state_dict(), meta)
    atomic_write_json(run / "federated.json", {"rounds": 2, "strategy": "fedavg", "privacy": [],
                                               "best": {"dice_mean": 0.8, "round": 2}})
    return run, model


def _as_trained(model: torch.nn.Module, values: np.ndarray) -> np.ndarray:
    """The label mask the training and evaluation code gives a volume (scale, pad / crop, arg-max, restore)."""
    from common.training import predict_labels
    from common.volumes import pad_or_crop, restore_shape, scale_intensity

    assert SEG_INFO.volume_shape is not None
    record = pad_or_crop(scale_intensity(values), SEG_INFO.volume_shape)[None]  # spelled out: the test's oracle
    return restore_shape(predict_labels(model, to_tensor_layout(record, SEG_INFO))[0], values.shape)


def test_a_segmentation_model_exports_and_segments_nifti_and_dicom_as_trained(tmp_path) -> None:
    import nibabel

    from client.dicom import dataset_bytes, new_uid, read_seg_mask, read_volume
    from simulations.synthetic_dicom import Equipment, Identity, image_dataset

    # Prepare: a run folder; one volume (smaller than the model's shape in two axes, larger in one) as NIfTI
    # with 1.2 mm voxels, and the same volume as a 16-bit MR series stored out of order
    run, model = _seg_run(tmp_path)
    values = np.random.default_rng(4).normal(500, 100, (30, 50, 44)).astype(np.float32)
    nifti = tmp_path / "in" / "brain.nii.gz"
    nifti.parent.mkdir()
    nibabel.save(nibabel.Nifti1Image(values, np.diag([1.2, 1.2, 1.2, 1.0])), nifti)
    identity = Identity(patient_name="Doe^Jane", patient_id="MRN1", birth_date="19800101", sex="F",
                        accession="A1", study_uid=new_uid(), series_uid=new_uid(), study_date="20240101",
                        institution="Test Hospital")
    equipment = Equipment(manufacturer="ACME", model="MR1", station="S1", modality="MR", bits_stored=16,
                          pixel_spacing=1.0, transfer_syntax="jpeg-ls")
    display = (values - values.min()) / (values.max() - values.min())
    series = tmp_path / "in" / "dicom"
    series.mkdir()
    for k, z in enumerate(np.random.default_rng(0).permutation(len(values))):
        ds = image_dataset(display[z], identity=identity, equipment=equipment, instance_number=int(z) + 1,
                           position=(0.0, 0.0, 2.0 * float(z)))
        (series / f"IM{k:03d}.dcm").write_bytes(dataset_bytes(ds))
    # Execute: export, then predict both inputs through the command line, with DICOM results
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert cli(["predict", "--model", str(tmp_path / "bundle"), str(nifti), str(series), "--dicom-out",
                "--out", str(tmp_path / "out")]) == 0
    # Assert: the card says how to feed the model
    card = ExportedModel.load(tmp_path / "bundle").card
    assert card.task == "segmentation" and card.preprocessing.volume_shape == [32, 56, 40]
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert [r["input"] for r in rows] == [str(nifti), "dicom-1"]
    # NIfTI: the mask the training code gives, in the input's shape and affine, volumes from 1.2 mm voxels
    expected = _as_trained(model, values)
    assert len(np.unique(expected)) == 3
    written = nibabel.load(tmp_path / "out" / "brain-seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    np.testing.assert_allclose(written.affine, np.diag([1.2, 1.2, 1.2, 1.0]))
    assert rows[0]["voxels"] == {c: int((expected == k).sum()) for k, c in enumerate(SEG_INFO.labels, start=1)}
    assert rows[0]["volumes_ml"]["anterior"] == pytest.approx(rows[0]["voxels"]["anterior"] * 1.2**3 / 1000, 1e-3)
    # DICOM: the same on the series as read, and the DICOM-SEG carries exactly that mask onto the series
    volume = read_volume(sorted(series.iterdir()))
    expected_dicom = _as_trained(model, volume.values)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "dicom-1-seg.npy"), expected_dicom)
    seg = tmp_path / "out" / "dicom-1-medsilo-seg.dcm"
    np.testing.assert_array_equal(read_seg_mask(seg, volume, SEG_INFO.labels), expected_dicom)
    assert rows[1]["volumes_ml"]["posterior"] == pytest.approx(rows[1]["voxels"]["posterior"] * 2.0 / 1000, 1e-3)
    import pydicom

    stored = pydicom.dcmread(seg)
    assert (stored.PatientID, stored.StudyInstanceUID) == ("MRN1", identity.study_uid)  # filed with the images
    assert {s.SegmentAlgorithmType for s in stored.SegmentSequence} == {"AUTOMATIC"}
    assert stored.SegmentSequence[0].SegmentAlgorithmName == card.name


def test_segmentation_predict_survives_a_de_identified_series_and_a_broken_nifti(tmp_path) -> None:
    from client.dicom import dataset_bytes, new_uid
    from simulations.synthetic_dicom import Equipment, Identity, image_dataset

    # Prepare: a series whose de-identification removed the Frame of Reference (a DICOM-SEG needs it),
    # one single-slice series (no slice spacing, so no volume in mL), and a file that is not NIfTI
    run, _ = _seg_run(tmp_path)
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "bundle")]) == 0
    equipment = Equipment(manufacturer="ACME", model="MR1", station="S1", modality="MR", pixel_spacing=1.0)
    rng = np.random.default_rng(0)
    for name, count in (("deid", 4), ("single", 1)):
        identity = Identity(patient_name="", patient_id="", birth_date="", sex="", accession="", study_uid=new_uid(),
                            series_uid=new_uid(), study_date="", institution="")
        for z in range(count):
            ds = image_dataset(rng.random((20, 16)), identity=identity, equipment=equipment, instance_number=z + 1,
                               position=(0.0, 0.0, float(z)))
            if name == "deid":
                del ds.FrameOfReferenceUID
            (tmp_path / "in" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / name / f"IM{z}.dcm").write_bytes(dataset_bytes(ds))
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a NIfTI image")
    # Execute
    code = cli(["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "in"), "--dicom-out",
                "--out", str(tmp_path / "out")])
    # Assert: both series are segmented; the reasons are recorded; nothing stopped the run
    assert code == 0
    rows = {r["input"]: r for r in json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]}
    assert set(rows) == {"in-1", "in-2"}
    by_slices = {r["shape"][0]: r for r in rows.values()}
    assert by_slices[1]["volumes_ml"] is None and by_slices[4]["volumes_ml"] is not None
    assert any("a DICOM-SEG cannot be built on this series" in p for p in by_slices[4]["problems"])
    assert all(Path(w).suffix == ".npy" for w in by_slices[4]["written"])


def test_segmentation_predict_keeps_inputs_named_alike_apart_and_records_a_bad_volume(tmp_path) -> None:
    import nibabel

    # Prepare: two folders each holding an img.nii.gz, the first also given by name, and an all-NaN volume
    run, _ = _seg_run(tmp_path)
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "bundle")]) == 0
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        nibabel.save(nibabel.Nifti1Image(rng.normal(size=(30, 50, 44)).astype(np.float32), np.eye(4)),
                     tmp_path / folder / "img.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.full((8, 8, 8), np.nan, dtype=np.float32), np.eye(4)),
                 tmp_path / "a" / "nan.nii.gz")
    (tmp_path / "file").write_text("not a folder")
    # Execute
    code = cli(["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "a" / "img.nii.gz"),
                str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    refused = cli(["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "b"), "--out",
                   str(tmp_path / "file")])
    # Assert: three volumes (the repeated one once), two distinct masks, the NaN volume recorded, not fatal
    assert code == 0 and refused != 0
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert len(rows) == 3
    written = sorted(w for r in rows for w in r["written"])
    assert [Path(w).name for w in written] == ["img-2-seg.nii.gz", "img-seg.nii.gz"]
    (bad,) = [r for r in rows if r["problems"]]
    assert "non-finite values" in bad["problems"][0] and bad["written"] == []
