"""DICOM in: decoding, the display pipeline, rejections with reasons, the cache, manifests, ``site check``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom  # tests craft broken files; medsilo's own code imports pydicom only in the client/dicom/ package
import pytest
from pydicom.data import get_testdata_file

from client.dicom import Rejected, dataset_bytes, new_uid, read_image
from client.ingest import ingest
from client.manifest import label_units, read_manifest
from client.preprocessing import Preprocessing, assemble_volume, to_model_input
from client.site_check import check_source, training_records
from common.cli import main as cli
from common.datasets import dataset_info, load
from simulations.archive import write_archive
from simulations.synthetic_dicom import Equipment, Identity, image_dataset


def _identity() -> Identity:
    return Identity(patient_name="Doe^Jane", patient_id="MRN123", birth_date="19800101", sex="F",
                    accession="ACC1", study_uid=new_uid(), series_uid=new_uid(), study_date="20240101",
                    institution="Test Hospital")


def _write(path: Path, display: np.ndarray, **equipment) -> Path:
    eq = Equipment(manufacturer="ACME", model="X1", station="S1", **{"modality": "DX", **equipment})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dataset_bytes(image_dataset(display, identity=_identity(), equipment=eq, instance_number=1)))
    return path


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_lossless_syntaxes_decode_to_the_same_pixels(name: str) -> None:
    # Prepare
    reference = read_image(get_testdata_file("MR_small.dcm")).pixels
    # Execute
    image = read_image(get_testdata_file(name))
    # Assert
    assert image.pixels.shape == (1, 64, 64)
    np.testing.assert_allclose(image.pixels, reference, atol=1e-6)


@pytest.mark.parametrize(("name", "syntax"), [
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline"), ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless"),
    ("SC_rgb_jls_lossy_line.dcm", "JPEG-LS"), ("SC_rgb_gdcm_KY.dcm", "JPEG 2000"), ("SC_rgb_rle.dcm", "RLE"),
    ("image_dfl.dcm", "Deflated"), ("SC_ybr_full_422_uncompressed.dcm", "Explicit VR"),
])
def test_hospital_codecs_and_colour_spaces_decode(name: str, syntax: str) -> None:
    # Execute
    image = read_image(get_testdata_file(name))
    # Assert: decoded, in [0, 1], RGB objects as RGB (YBR converted), the syntax reported
    assert syntax in image.header.transfer_syntax
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0 and image.pixels.std() > 0.01
    if image.header.samples == 3:
        assert image.pixels.shape[-1] == 3


def test_rgb_jpeg_matches_its_uncompressed_original() -> None:
    # Prepare: the same picture stored lossless (RLE) and as JPEG baseline (YBR)
    plain = read_image(get_testdata_file("SC_rgb_rle.dcm")).pixels
    # Execute
    jpeg = read_image(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).pixels
    # Assert: lossy but close (colour conversion applied)
    assert np.abs(jpeg - plain).mean() < 0.05


def test_modality_lut_window_and_monochrome1_restore_the_display(tmp_path: Path) -> None:
    # Prepare: one picture stored by three devices: 8-bit, 12-bit with slope 2 and offset, MONOCHROME1 16-bit
    display = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    files = [
        _write(tmp_path / "a.dcm", display, bits_stored=8),
        _write(tmp_path / "b.dcm", display, bits_stored=12, rescale_slope=2.0, rescale_intercept=-100.0),
        _write(tmp_path / "c.dcm", display, bits_stored=16, monochrome1=True, transfer_syntax="jpeg-ls"),
    ]
    # Execute
    images = [read_image(f) for f in files]
    # Assert: every device's object displays as the original picture
    for image in images:
        np.testing.assert_allclose(image.pixels[0], display, atol=1.0 / 250)
    assert images[2].header.photometric == "MONOCHROME1"


def test_window_override_and_ct_preset() -> None:
    # Prepare: a CT slice (stored values -> HU via the Modality LUT)
    path = get_testdata_file("CT_small.dcm")
    # Execute
    preset = read_image(path).pixels  # CT_small carries no window: the soft-tissue preset applies
    bone = read_image(path, window=(400.0, 1800.0)).pixels
    # Assert: a wider window compresses contrast
    assert preset.std() > bone.std() > 0


# ------------------------------------------------------------------------------ rejections
def _truncated(tmp_path: Path) -> Path:
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    out = tmp_path / "cut.dcm"
    out.write_bytes(data[:140])  # preamble + a few bytes: pydicom yields an empty dataset with a warning
    return out


def _bomb(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 500
    out = tmp_path / "bomb.dcm"
    ds.save_as(out)
    return out


def _presentation_state(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    out = tmp_path / "gsps.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: Path(get_testdata_file("MR_truncated.dcm")), "pixel data is truncated"),
    (_truncated, "no DICOM elements could be read"),
    (lambda d: Path(get_testdata_file("no_meta.dcm")), "not a DICOM Part 10 file"),
    (lambda d: Path(get_testdata_file("meta_missing_tsyntax.dcm")), "no file meta information"),
    (lambda d: Path(get_testdata_file("test-SR.dcm")), "not an image object (Comprehensive SR Storage)"),
    (lambda d: Path(get_testdata_file("rtdose.dcm")), "not an image object (RT Dose Storage)"),
    (_presentation_state, "Presentation State"),
    (lambda d: Path(get_testdata_file("liver_1frame.dcm")), "not an image object (Segmentation Storage)"),
    (_bomb, "exceeds the decode limits"),
    (lambda d: Path(get_testdata_file("JPEG-lossy.dcm")), "could not be decoded (JPEG Extended"),
])
def test_bad_files_are_rejected_with_a_reason_and_the_fix(tmp_path: Path, make, reason: str) -> None:
    # Prepare
    path = make(tmp_path)
    # Execute
    with pytest.raises(Rejected) as info:
        read_image(path)
    # Assert: the reason, and nothing from the header (no names, IDs or UIDs)
    assert reason in info.value.reason
    assert "Doe" not in info.value.reason and "1.2.840.10008.5.1.4.1.1.4." not in info.value.reason


def test_every_file_ends_ingested_or_rejected_and_a_fifo_does_not_hang(tmp_path: Path) -> None:
    # Prepare: good images, broken objects, a text file and a FIFO (a naive reader would block on it)
    src = tmp_path / "in"
    for i in range(3):
        _write(src / f"good{i}.dcm", np.full((32, 32), i / 3, dtype=np.float32) + np.eye(32, dtype=np.float32) / 4)
    for name in ("test-SR.dcm", "MR_truncated.dcm", "rtplan.dcm", "CT_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    (src / "notes.txt").write_text("not dicom")
    os.mkfifo(src / "pipe")
    settings = Preprocessing(modalities=("DX",))
    # Execute
    result = ingest(src, settings, cache_dir=tmp_path / "cache", workers=2, timeout_s=20)
    # Assert: count in = ingested + rejected; each rejection has its reason (CT is the wrong modality here)
    assert result.files_in == 9 == len(result.files) + len(result.rejected)
    assert len(result.units) == 3 and result.images.shape == (3, 28, 28)
    reasons = dict((Path(p).name, r) for p, r in result.rejected)
    assert "modality CT is not one this task uses" in reasons["CT_small.dcm"]
    assert "not a regular file" in reasons["pipe"]
    assert set(reasons) == {"test-SR.dcm", "MR_truncated.dcm", "rtplan.dcm", "CT_small.dcm", "notes.txt", "pipe"}


# ------------------------------------------------------------------------------ cache
def test_cache_decodes_once_and_invalidates_on_content_or_settings(tmp_path: Path) -> None:
    # Prepare
    src = tmp_path / "in"
    for i in range(4):
        _write(src / f"im{i}.dcm", np.random.default_rng(i).random((40, 40), dtype=np.float32))
    settings = Preprocessing()
    first = ingest(src, settings, cache_dir=tmp_path / "cache", workers=1)
    # Execute: again; then one file changed; then other settings
    again = ingest(src, settings, cache_dir=tmp_path / "cache", workers=1)
    _write(src / "im2.dcm", np.zeros((40, 40), dtype=np.float32))
    changed = ingest(src, settings, cache_dir=tmp_path / "cache", workers=1)
    resized = ingest(src, Preprocessing(size=32), cache_dir=tmp_path / "cache", workers=1)
    # Assert
    assert first.decoded == 4 and again.decoded == 0 and changed.decoded == 1 and resized.decoded == 4
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(again.images))
    row = next(u.row for u in changed.units if u.files[0].endswith("im2.dcm"))
    assert int(np.asarray(changed.images[row]).max()) == 0
    assert resized.images.shape == (4, 32, 32)


# ------------------------------------------------------------------------------ preprocessing
def test_2d_records_keep_aspect_and_channels() -> None:
    # Prepare: a wide RGB frame
    frame = np.zeros((1, 40, 80, 3), dtype=np.float32)
    frame[0, :, :, 0] = 1.0
    # Execute
    gray = to_model_input(frame, Preprocessing(size=28, channels=1))
    rgb = to_model_input(frame, Preprocessing(size=28, channels=3))
    # Assert: padded to square (top/bottom rows dark), luma of pure red, 3 channels kept
    assert gray.shape == (28, 28) and rgb.shape == (28, 28, 3)
    assert gray[14, 14] == round(0.299 * 255) and gray[0, 14] == 0
    assert rgb[14, 14, 0] == 255 and rgb[14, 14, 1] == 0


def test_series_slices_are_ordered_by_position_not_by_file(tmp_path: Path) -> None:
    # Prepare: slices whose intensity encodes their depth, handed over in a shuffled order
    settings = Preprocessing(size=8, spatial_dims=3)
    rng = np.random.default_rng(0)
    order = rng.permutation(8)
    slices = [([float(z) * 2.5], int(rng.integers(100)), np.full((8, 8), z / 7, dtype=np.float16)) for z in order]
    # Execute
    volume = assemble_volume(slices, settings)
    # Assert: depth increases along the first axis
    assert volume.shape == (8, 8, 8)
    assert (np.diff(volume[:, 0, 0].astype(int)) > 0).all()
    with pytest.raises(Rejected, match="missing slices"):
        assemble_volume([s for s in slices if s[0][0] != 5 * 2.5], settings)
    with pytest.raises(Rejected, match="same position"):
        assemble_volume([*slices, slices[0]], settings)


def test_3d_archive_round_trips_through_dicom_series(tmp_path: Path) -> None:
    # Prepare: two adrenal CT volumes written as CT series (files in random order)
    data = load("adrenalmnist3d")
    write_archive(tmp_path / "site", data.train.images[:2], data.train.labels[:2], data.info, site=0, seed=0,
                  upsample=1)
    settings = Preprocessing.for_dataset("adrenalmnist3d", size=28, channels=1, spatial_dims=3)
    # Execute
    check = check_source(str(tmp_path / "site"), settings, state_dir=tmp_path / "state",
                         labels=tmp_path / "site" / "labels.csv", classes=data.info.labels)
    # Assert: one record per series, equal to the source volume up to 12-bit quantisation
    assert check.ready and len(check.ingested.units) == 2 and len(check.ingested.files) == 56
    for unit in check.ingested.units:
        vol = np.asarray(check.ingested.images[unit.row]).astype(int)
        err = min(np.abs(vol - data.train.images[i].astype(int)).mean() for i in range(2))
        assert err < 1.0


# ------------------------------------------------------------------------------ manifest
def test_manifest_problems_are_reported_by_line_without_uids(tmp_path: Path) -> None:
    # Prepare
    info = dataset_info("breastmnist")
    csv = tmp_path / "labels.csv"
    csv.write_text("SOPInstanceUID,label\n1.2.3,0\n1.2.3,1\n1.2.4,7\n,0\n1.2.5,malignant\n1.2.5,0\n1.2.9,1\n")
    # Execute
    manifest = read_manifest(csv, info.labels)
    from client.ingest import Unit

    units = [Unit(key="k", row=0, files=("f",), study_uid="9", series_uid="8", sop_uid="1.2.3", patient_key="p",
                  modality="US")]
    labelled = label_units(manifest, units, info.labels)
    # Assert: conflicting, unknown label and missing UID are errors; duplicate, unknown UID, absent class warnings
    text = " ".join(labelled.errors)
    assert "lines 3: the same UID has a different label" in text
    assert "lines 4: missing or unknown label" in text and "lines 5: no UID" in text
    warn = " ".join(labelled.warnings)
    assert "lines 7: duplicate rows" in warn and "UID matches no ingested image" in warn
    assert "classes with no labelled image at this site: normal, benign" in warn
    assert "1.2." not in text + warn


def test_site_check_command_reports_and_exits_by_readiness(tmp_path: Path, capsys) -> None:
    # Prepare: a simulated hospital archive with synthetic PHI, plus one SR object
    data = load("breastmnist")
    site = write_archive(tmp_path / "site", data.train.images[:12], data.train.labels[:12], data.info, site=1,
                         seed=3)
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "site" / "dicom" / "report.dcm")
    # Execute
    ok = cli(["site", "check", "--data", str(tmp_path / "site"), "--labels", str(tmp_path / "site" / "labels.csv"),
              "--dataset", "breastmnist", "--state-dir", str(tmp_path / "state"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    (tmp_path / "other.csv").write_text("SOPInstanceUID,label\n1.2.3.4,0\n")
    not_ready = cli(["site", "check", "--data", str(tmp_path / "site"), "--labels", str(tmp_path / "other.csv"),
                     "--dataset", "breastmnist", "--state-dir", str(tmp_path / "state")])
    # Assert
    report = json.loads((tmp_path / "r.json").read_text())
    assert ok == 0 and not_ready == 1 and "READY" in out
    assert isinstance(report["ingested"], list) and isinstance(report["rejected"], list)
    assert len(report["ingested"]) == 12 and len(report["rejected"]) == 1
    assert report["summary"]["files"] == 13 and "US" in report["summary"]["modalities"]
    assert report["phi_findings"]["attributes"]["PatientName"] == 12
    assert not any(value in out for value in site.phi)  # PHI attribute names only, never values


def test_site_check_without_labels_checks_the_folders_manifest_as_the_node_reads_it(tmp_path: Path, capsys) -> None:
    # Prepare: an archive whose labels.csv (the node's default manifest) names one UID of another archive
    data = load("breastmnist")
    write_archive(tmp_path / "site", data.train.images[:12], data.train.labels[:12], data.info, site=1, seed=3)
    good = (tmp_path / "site" / "labels.csv").read_text()
    # Execute: with the folder's own manifest; with a broken one; without --dataset to check labels against
    ok = cli(["site", "check", "--data", str(tmp_path / "site"), "--dataset", "breastmnist",
              "--state-dir", str(tmp_path / "state"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    (tmp_path / "site" / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3.4,0\n")
    broken = cli(["site", "check", "--data", str(tmp_path / "site"), "--dataset", "breastmnist",
                  "--state-dir", str(tmp_path / "state")])
    (tmp_path / "site" / "labels.csv").write_text(good)
    no_dataset = cli(["site", "check", "--data", str(tmp_path / "site"), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    # Assert: the manifest is checked (not counted as a rejected file), a broken one is NOT READY, and without
    # --dataset the command asks for it instead of printing READY unchecked.
    report = json.loads((tmp_path / "r.json").read_text())
    assert ok == 0 and "READY" in out and "labels.csv (the node's default manifest" in out
    assert report["rejected"] == [] and report["summary"]["files"] == 12 and len(report["ingested"]) == 12
    assert broken == 1
    assert no_dataset == 2 and "holds labels.csv" in err and "pass --dataset" in err


def test_node_training_split_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    # Prepare
    data = load("breastmnist")
    write_archive(tmp_path / "site", data.train.images[:60], data.train.labels[:60], data.info, site=2, seed=5)
    settings = Preprocessing.for_dataset("breastmnist", size=28, channels=1, spatial_dims=2)
    check = check_source(str(tmp_path / "site"), settings, state_dir=tmp_path / "state",
                         labels=tmp_path / "site" / "labels.csv", classes=data.info.labels)
    # Execute
    images, labels, val = training_records(check, val_fraction=0.2)
    # Assert
    patients = np.asarray([check.ingested.units[i].patient_key for i in check.labelled.keep])
    assert len(images) == len(labels) == 60 and 0 < val.sum() < 60
    assert not set(patients[val]) & set(patients[~val])


def test_augmentation_is_seeded_per_record_and_trains_under_dp() -> None:
    # Prepare
    import torch

    from client.dp.rng import reproducible
    from client.dp.sgd import plan_for_records, train_dp
    from client.preprocessing import augment
    from common.config import RunConfig
    from common.datasets import Split
    from common.models import build_model
    from common.training import tensor_dataset

    x = torch.rand(8, 1, 28, 28)
    # Execute
    a = augment(x, generator=torch.Generator().manual_seed(1))
    b = augment(x, generator=torch.Generator().manual_seed(1))
    c = augment(x, generator=torch.Generator().manual_seed(2))
    info = dataset_info("breastmnist")
    cfg = RunConfig(dataset="breastmnist", augment=True, batch_size=16, rounds=1, local_epochs=1, epsilon=8.0,
                    accountant="rdp")
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 255, (64, 28, 28)).astype(np.uint8), rng.integers(0, 2, 64))
    plan = plan_for_records(cfg, 64)
    result = train_dp(build_model("cnn", info, seed=0), tensor_dataset(split, info), info.task, cfg, plan,
                      randomness=reproducible(seed=0, site=0), server_round=1)
    # Assert: same seed, same batch; another seed, another batch; shapes kept; every planned DP step taken
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert result.steps == plan.steps_per_round and np.isfinite(result.train_loss)


def test_a_decoder_exceeding_the_time_limit_costs_only_its_file(tmp_path: Path) -> None:
    # Prepare: files, and a time limit no worker can meet (stands in for a decoder that hangs)
    src = tmp_path / "in"
    for i in range(2):
        _write(src / f"im{i}.dcm", np.full((16, 16), 0.5, dtype=np.float32))
    # Execute: returns (never hangs), the workers are killed
    result = ingest(src, Preprocessing(), cache_dir=tmp_path / "cache", workers=2, timeout_s=0.001)
    retry = ingest(src, Preprocessing(), cache_dir=tmp_path / "cache", workers=2, timeout_s=60)
    # Assert: each file rejected with the time-limit reason, not remembered: with a sane limit both are ingested
    assert len(result.rejected) == 2 and len(result.units) == 0
    assert all("did not finish within" in reason for _, reason in result.rejected)
    assert len(retry.units) == 2


def test_archive_command_writes_every_record_of_every_site(tmp_path: Path, capsys) -> None:
    # Prepare / Execute: BreastMNIST (546 + 78 records) as two hospitals' archives
    code = cli(["archive", "--dataset", "breastmnist", "--sites", "2", "--scanner-shift", "0.5",
                "--out", str(tmp_path / "arch")])
    # Assert: every train and validation record is one image with one manifest row; nothing half-written
    assert code == 0
    rows = [len((tmp_path / "arch" / f"site-0{i}" / "labels.csv").read_text().splitlines()) - 1 for i in range(2)]
    files = [len(list((tmp_path / "arch" / f"site-0{i}" / "dicom").rglob("*.dcm"))) for i in range(2)]
    assert rows == files and sum(files) == 546 + 78
    assert not (tmp_path / ".arch.partial").exists() and "medsilo site check" in capsys.readouterr().out


def test_result_secondary_capture_joins_the_source_study(tmp_path: Path) -> None:
    # Prepare: a source image and a heatmap overlay
    from types import SimpleNamespace

    from client.dicom import write_result

    src = _write(tmp_path / "src.dcm", np.full((32, 32), 0.5, dtype=np.float32))
    overlay = np.zeros((32, 32, 3), dtype=np.uint8)
    overlay[8:16, 8:16, 0] = 255
    # Execute
    out = write_result(SimpleNamespace(path=src), SimpleNamespace(label="pneumonia", probabilities={
        "normal": 0.2, "pneumonia": 0.8}), overlay, tmp_path / "out")
    # Assert: same patient and study, a new series referencing the source, the overlay and the prediction
    source, result = pydicom.dcmread(src), pydicom.dcmread(out)
    assert result.StudyInstanceUID == source.StudyInstanceUID and result.PatientID == source.PatientID
    assert result.SeriesInstanceUID != source.SeriesInstanceUID
    assert result.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert result.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and "pneumonia=0.8000" in result.ImageComments
    np.testing.assert_array_equal(result.pixel_array, overlay)
    assert read_image(out).pixels.shape == (1, 32, 32, 3)  # and medsilo reads its own result back


def test_a_dataset_built_from_keywords_and_pixels_reads_back_and_refuses_unknown_keywords(tmp_path: Path) -> None:
    # Prepare: the neutral writer the synthetic archive composes; a 12-bit MR image whose header has a sequence
    from client.dicom import SOP_CLASSES, build_dataset

    stored = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) % 4096
    attributes = {"PatientID": "MRN9", "Modality": "MR", "Rows": 20, "Columns": 24, "SamplesPerPixel": 1,
                  "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11,
                  "PixelRepresentation": 0, "WindowCenter": "2048", "WindowWidth": "4096",
                  "SourceImageSequence": [{"ReferencedSOPInstanceUID": "1.2.3"}]}
    # Execute
    path = tmp_path / "built.dcm"
    path.write_bytes(dataset_bytes(build_dataset(SOP_CLASSES["MR"], attributes, sop_uid="1.2.4", pixels=stored,
                                                 codec="rle")))
    # Assert: a Part 10 file in the asked syntax with the attributes, a sequence item and the exact pixels
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless and ds.SOPInstanceUID == "1.2.4"
    assert ds.PatientID == "MRN9" and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == "1.2.3"
    np.testing.assert_array_equal(ds.pixel_array, stored)
    assert read_image(path).header.sop_class == "MR Image Storage"
    with pytest.raises(ValueError, match="'PatientNmae' is not a DICOM keyword"):
        build_dataset(SOP_CLASSES["OT"], {"PatientNmae": "Doe^Jane"})
    with pytest.raises(ValueError, match="pass sop_class and sop_uid"):
        build_dataset(SOP_CLASSES["OT"], {"SOPInstanceUID": "1.2.5"})
