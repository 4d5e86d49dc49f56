"""A hospital's DICOM series with DICOM-SEG or RT-STRUCT masks as a segmentation source."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom  # tests craft RT-STRUCTs and broken files; medsilo's own code imports pydicom only in client/dicom/
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client.data import load_site_data
from client.dicom import RTSTRUCT_STORAGE, Rejected, dataset_bytes, match_classes, new_uid, segmentation_dataset
from client.series import DicomSegmentationSource, index_folder, segmentation_site
from common.config import RunConfig
from common.datasets import dataset_info
from common.errors import DataError
from simulations.synthetic_dicom import Equipment, Identity, image_dataset

CLASSES = ("anterior", "posterior")
SHAPE = (6, 20, 16)  # slices, rows, columns
SPACING = (0.5, 0.8)  # between rows, between columns (mm)
ORIGIN = np.array([10.0, -20.0, 30.0])
SLICE_GAP = 2.5


def _identity(patient: str) -> Identity:
    return Identity(patient_name=f"Doe^{patient}", patient_id=f"MRN-{patient}", birth_date="19800101", sex="F",
                    accession=f"ACC-{patient}", study_uid=new_uid(), series_uid=new_uid(), study_date="20240101",
                    institution="Test Hospital")


def _series(folder: Path, values: np.ndarray, identity: Identity, *, codec: str = "explicit") -> list[Dataset]:
    """Write ``values`` (in [0, 1]) as MR slices, files in shuffled order, with a non-trivial geometry."""
    eq = Equipment(manufacturer="ACME", model="MR1", station="S1", modality="MR", bits_stored=12,
                   rescale_slope=2.0, transfer_syntax=codec)
    slices = []
    for z in range(values.shape[0]):
        ds = image_dataset(values[z], identity=identity, equipment=eq, instance_number=z + 1,
                           position=tuple(ORIGIN + np.array([0.0, 0.0, z * SLICE_GAP])))
        ds.PixelSpacing = list(SPACING)
        slices.append(ds)
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(np.random.default_rng(1).permutation(len(slices))):
        (folder / f"IM{k:03d}.dcm").write_bytes(dataset_bytes(slices[z]))
    return slices


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:4, 3:8, 2:6] = 1
    mask[2:5, 10:15, 8:12] = 2
    return mask


def _case(root: Path, patient: str, *, classes: tuple[str, ...] = CLASSES, mask: np.ndarray | None = None) -> tuple:
    values = np.random.default_rng(len(patient)).random(SHAPE)
    slices = _series(root / patient / "MR", values, _identity(patient))
    mask = _mask() if mask is None else mask
    seg = segmentation_dataset(slices, mask, classes)
    (root / patient / "SEG.dcm").write_bytes(dataset_bytes(seg))
    return values, mask, slices


def _rtstruct(path: Path, slices: list[Dataset], rois: dict[str, list[np.ndarray]]) -> None:
    """An RT Structure Set with one ROI per name; each contour is an ``(n, 3)`` array in patient mm."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    first = slices[0]
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID"):
        setattr(ds, keyword, first.get(keyword))
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [float(v) for v in points.ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _square(z: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """A closed contour through the centres of the corner pixels ``rows`` x ``cols`` of slice ``z`` (mm)."""
    (r0, r1), (c0, c1) = rows, cols
    corners = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    return np.array([ORIGIN + np.array([c * SPACING[1], r * SPACING[0], z * SLICE_GAP]) for r, c in corners])


# ------------------------------------------------------------------------------ DICOM-SEG
def test_seg_mask_and_slices_round_trip_from_a_shuffled_series(tmp_path: Path) -> None:
    # Prepare: a compressed 12-bit series stored out of order, with its DICOM-SEG
    values = np.random.default_rng(0).random(SHAPE)
    slices = _series(tmp_path / "P1" / "MR", values, _identity("P1"), codec="rle")
    (tmp_path / "P1" / "SEG.dcm").write_bytes(dataset_bytes(segmentation_dataset(slices, _mask(), CLASSES)))
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute
    (case,) = source.cases()
    image, mask = source.read(case)
    # Assert: the exact mask, the slices in position order, in modality units (slope 2 on 12-bit values)
    np.testing.assert_array_equal(mask, _mask())
    np.testing.assert_allclose(image / (2 * 4095), values, atol=1e-3)


def test_segments_are_matched_to_classes_by_name_not_number(tmp_path: Path) -> None:
    # Prepare: segment 1 is "Posterior hippocampus", segment 2 "Anterior hippocampus"
    swapped = np.choose(_mask(), [0, 2, 1]).astype(np.uint8)
    _case(tmp_path, "P1", classes=("Posterior hippocampus", "Anterior hippocampus"), mask=swapped)
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute
    _, mask = source.read(source.cases()[0])
    # Assert: class k of the task is label k whatever the SEG's numbering
    np.testing.assert_array_equal(mask, _mask())


def test_class_matching_names_the_missing_or_ambiguous_class_never_the_labels() -> None:
    # Execute / Assert
    assert match_classes({3: "POSTERIOR", 7: "anterior-hippocampus"}, CLASSES, what="x") == [7, 3]
    with pytest.raises(Rejected) as missing:
        match_classes({1: "Anterior", 2: "Secret label"}, CLASSES, what="the DICOM-SEG")
    assert "no segment named after the class 'posterior'" in missing.value.reason
    assert "Secret" not in missing.value.reason
    with pytest.raises(Rejected, match="2 segments named after the class 'anterior'"):
        match_classes({1: "left anterior", 2: "right anterior", 3: "posterior"}, CLASSES, what="the DICOM-SEG")


# ------------------------------------------------------------------------------ RT-STRUCT
def test_rtstruct_contours_fill_the_hand_computed_pixels_and_holes(tmp_path: Path) -> None:
    # Prepare: anterior is two touching rectangles on slice 1; posterior a 9x9 square with a hole on slice 4
    slices = _series(tmp_path / "P1" / "MR", np.random.default_rng(0).random(SHAPE), _identity("P1"))
    _rtstruct(tmp_path / "P1" / "RS.dcm", slices, {
        "Anterior": [_square(1, (3, 7), (2, 5)), _square(1, (3, 7), (5, 8))],  # two touching: one region
        "Posterior": [_square(4, (5, 13), (4, 12)), _square(4, (8, 10), (7, 9))],
        "Brain": [_square(2, (0, 19), (0, 15))],  # a structure that is not a class is ignored
    })
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute
    _, mask = source.read(source.cases()[0])
    # Assert
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[1, 3:8, 2:9] = 1
    expected[4, 5:14, 4:13] = 2
    expected[4, 9, 8] = 0  # inside the hole's outline (rows 8-10, columns 7-9); the outline stays
    np.testing.assert_array_equal(mask, expected)


def test_a_contour_off_the_slices_is_rejected_with_the_fix(tmp_path: Path) -> None:
    # Prepare: a contour half-way between slices 1 and 2
    slices = _series(tmp_path / "P1" / "MR", np.random.default_rng(0).random(SHAPE), _identity("P1"))
    between = _square(1, (3, 7), (2, 5)) + np.array([0.0, 0.0, SLICE_GAP / 2])
    _rtstruct(tmp_path / "P1" / "RS.dcm", slices, {"anterior": [between], "posterior": [_square(3, (1, 4), (1, 4))]})
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute / Assert
    with pytest.raises(DataError, match=r"not on one of the series' slices.*re-contour"):
        source.read(source.cases()[0])


# ------------------------------------------------------------------------------ a hospital folder
def test_bad_files_and_broken_cases_are_reported_without_phi_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: three good patients; a junk file; a SEG without its series; a SEG lacking a class;
    # a second segmented series of a patient who already has one
    for patient in ("P1", "P2", "P3"):
        _case(tmp_path, patient)
    (tmp_path / "notes.txt").write_text("not DICOM")
    _, _, orphan_slices = _case(tmp_path / "gone", "P4")
    for path in (tmp_path / "gone" / "P4" / "MR").iterdir():
        path.unlink()
    _case(tmp_path, "P5", classes=("anterior", "tumour"))
    second = _identity("P1")
    slices = _series(tmp_path / "P1b" / "MR", np.random.default_rng(3).random(SHAPE),
                     Identity(**{**second.__dict__, "patient_id": "MRN-P1", "patient_name": "Doe^P1"}))
    (tmp_path / "P1b" / "SEG.dcm").write_bytes(dataset_bytes(segmentation_dataset(slices, _mask(), CLASSES)))
    info = dataset_info("msd-hippocampus")
    # Execute
    with caplog.at_level(logging.INFO, logger="medsilo"):
        train, val = segmentation_site(tmp_path, info)
    index = index_folder(tmp_path)
    # Assert: P1, P2, P3 are read, whole, in the task's shape; the rest is counted with reasons
    assert len(train) + len(val) == 3 and len(val) >= 1 and len(train) >= 1
    assert train.images.shape[1:] == info.volume_shape and train.shapes is not None
    assert train.shapes.tolist()[0] == list(SHAPE)
    assert sorted(np.unique(np.concatenate([train.labels, val.labels])).tolist()) == [0, 1, 2]
    assert list(index.rejected) == ["notes.txt"] and index.orphan_masks == 1 and index.extra_series == 1
    text = caplog.text
    assert "no segment named after the class 'posterior'" in text and "not a DICOM Part 10 file" in text
    for secret in ("MRN-", "Doe^", "P1", *(s.SOPInstanceUID for s in slices), orphan_slices[0].StudyInstanceUID):
        assert secret not in text


def test_a_folder_without_segmented_series_is_one_clear_error(tmp_path: Path) -> None:
    # Prepare: a series without any mask
    _series(tmp_path / "P1" / "MR", np.random.default_rng(0).random(SHAPE), _identity("P1"))
    # Execute / Assert
    with pytest.raises(DataError, match="no usable image series with a DICOM-SEG or RT-STRUCT mask"):
        segmentation_site(tmp_path, dataset_info("msd-hippocampus"))


def test_a_node_trains_segmentation_from_its_dicom_folder_and_a_pacs_needs_a_state_folder(tmp_path: Path) -> None:
    # Prepare: a deployed node's data-path names the PACS export
    for patient in ("P1", "P2", "P3", "P4"):
        _case(tmp_path / "export", patient)
    config = RunConfig(dataset="msd-hippocampus")
    # Execute
    site = load_site_data({"data-path": str(tmp_path / "export"), "site-name": "h1"}, config)
    # Assert
    assert site.name == "h1" and len(site.train) + len(site.val) == 4
    assert site.train.labels.dtype == np.int64 and site.train.labels.shape[1:] == (32, 56, 40)
    with pytest.raises(DataError, match="a DICOMweb site needs a state folder for its spool"):
        load_site_data({"data-path": "https://pacs.example/dicom-web"}, config)  # no folder is made up from a URL


# ------------------------------------------------------------------------------ pre-flight
def test_site_check_reports_each_case_cropped_voxels_and_skips_without_phi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.cli import main as cli

    # Prepare: two good patients, one whose SEG lacks a class, one whose mask reaches outside the task's shape
    _case(tmp_path, "P1")
    _case(tmp_path, "P2")
    _case(tmp_path, "P3", classes=("anterior", "tumour"))
    wide = np.zeros((6, 20, 60), dtype=np.uint8)  # 60 columns: the task keeps the centre 40
    wide[2, 5:8, 0:4] = 1  # 12 voxels in the cropped-away margin
    wide[3, 5:8, 20:24] = 2
    values = np.random.default_rng(9).random(wide.shape)
    slices = _series(tmp_path / "P4" / "MR", values, _identity("P4"))
    (tmp_path / "P4" / "SEG.dcm").write_bytes(dataset_bytes(segmentation_dataset(slices, wide, CLASSES)))
    # Execute
    code = cli(["site", "check", "--dataset", "msd-hippocampus", "--data", str(tmp_path),
                "--json", str(tmp_path.parent / "check.json")])
    out = capsys.readouterr().out
    # Assert
    assert code == 0
    assert "3 usable case(s) of 4" in out and "anterior 60, posterior 60" in out
    assert "skipped: the DICOM-SEG has no segment named after the class 'posterior'" in out
    assert "12 mask voxel(s) lie outside the task's 32x56x40 volume" in out
    for secret in ("MRN-", "Doe^", "P1", "P4", slices[0].SOPInstanceUID, slices[0].SeriesInstanceUID):
        assert secret not in out
    report = (tmp_path.parent / "check.json").read_text()
    assert '"ready": true' in report and "MRN-" not in report


def test_site_check_of_a_folder_without_masks_is_not_ready_and_labels_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.cli import main as cli

    # Prepare
    _series(tmp_path / "P1" / "MR", np.random.default_rng(0).random(SHAPE), _identity("P1"))
    # Execute
    code = cli(["site", "check", "--dataset", "msd-hippocampus", "--data", str(tmp_path)])
    out = capsys.readouterr().out
    refused = cli(["site", "check", "--dataset", "msd-hippocampus", "--data", str(tmp_path), "--labels", "x.csv"])
    err = capsys.readouterr().err
    # Assert
    assert code == 1 and "NOT READY" in out and "no usable image series" in out
    assert refused != 0 and "segmentation takes its labels from the DICOM-SEG / RT-STRUCT masks" in err


# ------------------------------------------------------------------------------ geometry and malformed masks
def test_rtstruct_on_a_sagittal_series_lands_on_the_right_slice_row_and_column(tmp_path: Path) -> None:
    # Prepare: sagittal slices (rows run head to foot, columns anterior to posterior) stacked along x; the
    # slice normal points to -x, so the file at the largest x is the first slice of the volume
    rows_dir, cols_dir = np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0])  # down the rows, along a row
    values = np.random.default_rng(0).random(SHAPE)
    slices = _series(tmp_path / "P1" / "MR", values, _identity("P1"))
    for z, ds in enumerate(slices):
        ds.ImageOrientationPatient = [*cols_dir, *rows_dir]
        ds.ImagePositionPatient = [*(ORIGIN + np.array([z * SLICE_GAP, 0.0, 0.0]))]
    for path in (tmp_path / "P1" / "MR").iterdir():
        path.unlink()
    for z, ds in enumerate(slices):
        (tmp_path / "P1" / "MR" / f"IM{z:03d}.dcm").write_bytes(dataset_bytes(ds))

    def point(z: int, r: int, c: int) -> np.ndarray:
        return ORIGIN + np.array([z * SLICE_GAP, 0, 0]) + c * SPACING[1] * cols_dir + r * SPACING[0] * rows_dir

    contour = np.array([point(1, r, c) for r, c in ((3, 2), (3, 5), (7, 5), (7, 2))])
    next_file = contour + np.array([SLICE_GAP, 0, 0])
    _rtstruct(tmp_path / "P1" / "RS.dcm", slices, {"anterior": [contour], "posterior": [next_file]})
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute
    image, mask = source.read(source.cases()[0])
    # Assert: file 1 is slice 4 of 6 (x order reversed), file 2 is slice 3
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[4, 3:8, 2:6] = 1
    expected[3, 3:8, 2:6] = 2
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(image[4] / (2 * 4095), values[1], atol=1e-3)


def test_malformed_conflicting_and_incomplete_masks_are_skipped_with_reasons(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    _, _, p1 = _case(tmp_path, "P1")  # its SEG's segment numbers are broken below
    seg = pydicom.dcmread(tmp_path / "P1" / "SEG.dcm")
    seg.SegmentSequence[0].SegmentNumber = None
    seg.save_as(tmp_path / "P1" / "SEG.dcm")
    _, mask2, p2 = _case(tmp_path, "P2")  # a good SEG plus an RT-STRUCT of the same series: the SEG wins
    _rtstruct(tmp_path / "P2" / "RS.dcm", p2, {"anterior": [_square(1, (1, 2), (1, 2))],
                                               "posterior": [_square(2, (1, 2), (1, 2))]})
    p3 = _series(tmp_path / "P3" / "MR", np.random.default_rng(5).random(SHAPE), _identity("P3"))
    other = _series(tmp_path / "elsewhere", np.random.default_rng(6).random(SHAPE), _identity("P3"))
    wrong = segmentation_dataset(other, _mask(), CLASSES)  # frames reference another series' instances...
    wrong.ReferencedSeriesSequence[0].SeriesInstanceUID = p3[0].SeriesInstanceUID  # ...but it claims P3's
    (tmp_path / "P3" / "SEG.dcm").write_bytes(dataset_bytes(wrong))
    for path in (tmp_path / "elsewhere").iterdir():
        path.unlink()
    _, _, p4 = _case(tmp_path, "P4")  # a slice goes missing
    missing = next(p for p in (tmp_path / "P4" / "MR").iterdir()
                   if pydicom.dcmread(p).SOPInstanceUID == p4[3].SOPInstanceUID)
    missing.unlink()
    source = DicomSegmentationSource(tmp_path, CLASSES)
    # Execute
    with caplog.at_level(logging.INFO, logger="medsilo"):
        train, val = segmentation_site(tmp_path, dataset_info("msd-hippocampus"))
    # Assert: only P2 is used, with the SEG's mask; each other case is skipped with its reason
    assert len(train) == 1 and len(val) == 0
    kinds = {case.slices[0].parent.parent.name: case.mask_kind for case in source.index.cases.values()}
    assert kinds["P2"] == "seg"
    assert int((train.labels > 0).sum()) == int((mask2 > 0).sum())
    text = caplog.text
    assert "non-integer SegmentNumber" in text or "malformed DICOM-SEG" in text
    assert "source image(s) that are not slices of the series read" in text
    assert "a gap of more than 1.5 slice spacings" in text
    assert "Doe^" not in text and "MRN-" not in text and p1[0].SOPInstanceUID not in text


def test_site_check_over_dicomweb_warns_about_instances_it_could_not_retrieve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.series
    from client.pacs import SpoolResult
    from common.cli import main as cli

    # Prepare: a PACS whose search lists 200 instances, of which 40 fail to download (the spool holds two cases)
    spool = tmp_path / "state" / "pacs-spool"
    _case(spool, "P1")
    _case(spool, "P2")

    def fake_sync(url: str, folder: Path, **_: object) -> SpoolResult:
        assert Path(folder) == spool
        return SpoolResult(folder=spool, listed=200, fetched=160, failed=["retrieve failed (HTTPError)"] * 40)

    monkeypatch.setattr(client.series, "sync", fake_sync)
    # Execute
    code = cli(["site", "check", "--dataset", "msd-hippocampus", "--data", "https://pacs.example/dicom-web",
                "--state-dir", str(tmp_path / "state")])
    out = capsys.readouterr().out
    # Assert: the two cases are usable, the report names the PACS and says the spool may be incomplete
    assert code == 0 and "segmentation source https://pacs.example/dicom-web: 2 usable case(s)" in out
    assert "40 instance(s) could not be retrieved from the PACS this time" in out


def test_a_new_process_reads_the_site_from_the_node_cache_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.series

    # Prepare: a folder of three cases, read once with a cache folder (as a node with a state-dir does)
    for patient in ("P1", "P2", "P3"):
        _case(tmp_path / "export", patient)
    info = dataset_info("msd-hippocampus")
    cache = tmp_path / "state" / "segmentation-cache"
    first_train, first_val = segmentation_site(tmp_path / "export", info, cache_dir=cache)
    client.series._read_site.cache_clear()  # a new ClientApp process: nothing in memory
    reads: list[int] = []
    real_read_volume = client.series.read_volume
    monkeypatch.setattr(client.series, "read_volume", lambda *a, **k: reads.append(1) or real_read_volume(*a, **k))
    # Execute: read again (from the cache), then after a file changed (from the folder)
    train, val = segmentation_site(tmp_path / "export", info, cache_dir=cache)
    reads_cached = len(reads)
    client.series._read_site.cache_clear()
    (cache / "msd-prostate-0123.npz").write_bytes(b"another task's cache")  # shares the 'msd-' prefix
    _case(tmp_path / "export", "P4")
    changed_train, changed_val = segmentation_site(tmp_path / "export", info, cache_dir=cache)
    # Assert: identical records without decoding a slice; a changed folder is read again and replaces the cache
    assert reads_cached == 0
    np.testing.assert_array_equal(train.images, first_train.images)
    np.testing.assert_array_equal(train.labels, first_train.labels)
    assert train.labels.dtype == np.int64 and not train.images.flags.writeable
    assert train.shapes is not None and first_train.shapes is not None
    np.testing.assert_array_equal(train.shapes, first_train.shapes)
    assert len(val) == len(first_val)
    assert len(reads) == 4 and len(changed_train) + len(changed_val) == 4
    (mine,) = cache.glob("msd-hippocampus-*.npz")  # the stale one of this task is gone...
    assert (mine.stat().st_mode & 0o077) == 0 and (cache / "msd-prostate-0123.npz").is_file()  # ...no other's
