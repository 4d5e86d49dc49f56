"""DICOM objects in and out: the one module of medsilo that imports pydicom.

Reading turns one DICOM Part 10 file into header facts (which never leave the node) and
pixels in [0, 1] with the display pipeline a radiologist's viewer applies: Modality LUT
(rescale slope/intercept), VOI window (from the file, a preset for the modality, or a robust
min-max), MONOCHROME1 inversion, RGB/YBR/palette colour. Compressed transfer syntaxes decode
through pydicom's pixel-data plugins (pylibjpeg for JPEG baseline/lossless/extended, JPEG 2000 and RLE;
pyjpegls for JPEG-LS; deflate natively).

Every failure becomes :class:`Rejected` with a reason that names the problem and the fix and
never carries a tag value, a UID, a date or a name. pydicom's own warnings (which can quote tag
values) are silenced while a file is read.

Writing builds realistic objects for the simulated hospital archives and for results a PACS
can store.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: Attributes that identify a patient, a visit or the people involved (PS3.15 Annex E, the usual suspects).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "MilitaryRank", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "NameOfPhysiciansReadingStudy", "StationName", "StudyID", "DeviceSerialNumber",
    "IssuerOfPatientID", "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory",
)

#: Display windows (center, width) used when a file carries none, per modality.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "CT": (40.0, 400.0),  # soft tissue
}

#: Transfer syntaxes medsilo writes, by short name (``medsilo simulate-archive --codecs``).
WRITE_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg": JPEGBaseline8Bit,
}

SOP_CLASSES = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "US": UID("1.2.840.10008.5.1.4.1.1.6.1"),  # Ultrasound Image Storage
    "CT": UID("1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
    "MR": UID("1.2.840.10008.5.1.4.1.1.4"),  # MR Image Storage
    "OT": UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image Storage
}

log = logging.getLogger("medsilo")


class Rejected(Exception):
    """A file medsilo will not train on; ``reason`` names why and the fix, never a value from the file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Refuse objects before decoding them when their header promises absurd sizes (decompression bombs)."""

    max_side: int = 16384
    max_values: int = 1 << 28  # rows x columns x frames x samples
    max_frames: int = 4096


@dataclass(frozen=True)
class Header:
    """What medsilo keeps of a DICOM header. It stays on the node (UIDs identify patients)."""

    sop_class: str
    modality: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    samples: int
    photometric: str
    bits_stored: int
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_key: str
    #: slice position along the slice normal, one per frame, when the object has a geometry
    positions: tuple[float, ...] = ()
    instance_number: int = 0
    phi: tuple[str, ...] = ()  # keywords of populated identifying attributes (never their values)
    burned_in_annotation: bool = False


@dataclass(frozen=True)
class Image:
    """One decoded object: ``pixels`` float32 ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)`` in [0, 1]."""

    header: Header
    pixels: np.ndarray


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's and highdicom's warnings and log lines while reading: they may quote tag values (PHI)."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise Rejected(f"{keyword} is not a number; fix the header or exclude the file") from None


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _slice_positions(ds: Dataset, frames: int) -> tuple[float, ...]:
    """Each frame's position along the slice normal (empty when the object has no geometry)."""
    def normal(orientation: Any) -> np.ndarray | None:
        try:
            o = np.asarray([float(v) for v in orientation], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if o.shape != (6,):
            return None
        n = np.cross(o[:3], o[3:])
        return n if np.linalg.norm(n) > 1e-6 else None

    def position(value: Any) -> np.ndarray | None:
        try:
            p = np.asarray([float(v) for v in value], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        return p if p.shape == (3,) else None

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame
        shared = ds.get("SharedFunctionalGroupsSequence")
        orient = None
        if shared and "PlaneOrientationSequence" in shared[0]:
            orient = shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient")
        out = []
        for item in ds.PerFrameFunctionalGroupsSequence:
            o = orient
            if "PlaneOrientationSequence" in item:
                o = item.PlaneOrientationSequence[0].get("ImageOrientationPatient")
            n = normal(o) if o is not None else None
            p = position(item.PlanePositionSequence[0].get("ImagePositionPatient")) \
                if "PlanePositionSequence" in item else None
            if n is None or p is None:
                return ()
            out.append(float(p @ n))
        return tuple(out) if len(out) == frames else ()
    n = normal(ds.get("ImageOrientationPatient")) if "ImageOrientationPatient" in ds else None
    p = position(ds.get("ImagePositionPatient")) if "ImagePositionPatient" in ds else None
    if n is None or p is None or frames != 1:
        return ()
    return (float(p @ n),)


def _populated(ds: Dataset, keyword: str) -> bool:
    """Whether an attribute holds a value, judged from its raw bytes where possible (no value conversion)."""
    elem = ds.get_item(keyword)
    if elem is None:
        return False
    raw = getattr(elem, "value", None) if getattr(elem, "is_raw", False) else None
    if isinstance(raw, bytes):
        return bool(raw.strip(b" \x00"))
    return bool(str(ds.get(keyword, "") or "").strip())


def _header(ds: Dataset, limits: Limits) -> Header:
    """Check the object is a decodable image within limits and extract what medsilo needs."""
    if len(ds) == 0:
        raise Rejected("no DICOM elements could be read (truncated or not DICOM); re-export the file from the PACS")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        raise Rejected("no file meta information (Transfer Syntax UID); re-export as a DICOM Part 10 file")
    sop_class = UID(str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")))
    if not sop_class:
        raise Rejected("no SOP Class UID: not a DICOM composite object; exclude the file")
    class_name = sop_class.name
    if "Image Storage" in class_name and "PixelData" not in ds:
        raise Rejected(f"{class_name} object without pixel data; re-send the complete instance from the PACS")
    if "Image Storage" not in class_name or "PixelData" not in ds:
        raise Rejected(f"not an image object ({class_name}); only image storage objects are used for training")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3):
        raise Rejected("image dimensions missing or invalid (Rows, Columns, NumberOfFrames, SamplesPerPixel)")
    if max(rows, cols) > limits.max_side or frames > limits.max_frames or \
            rows * cols * frames * samples > limits.max_values:
        raise Rejected(
            f"image of {rows}x{cols}x{frames} frames x{samples} samples exceeds the decode limits "
            f"(side {limits.max_side}, frames {limits.max_frames}, {limits.max_values} values); "
            "a decompression bomb or an object that is not meant for this task"
        )
    syntax = UID(str(ts))
    if syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise Rejected(
                f"transfer syntax {syntax.name} cannot be decoded here; install its pydicom plugin "
                "(pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls) or transcode the file"
            )
    phi = tuple(k for k in PHI_KEYWORDS if _populated(ds, k))
    return Header(
        sop_class=class_name,
        modality=_str(ds, "Modality").upper() or "OT",
        transfer_syntax=syntax.name,
        rows=rows,
        columns=cols,
        frames=frames,
        samples=samples,
        photometric=_str(ds, "PhotometricInterpretation").upper(),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 8)),
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        sop_uid=_str(ds, "SOPInstanceUID"),
        patient_key=_str(ds, "PatientID") or _str(ds, "StudyInstanceUID"),
        positions=_slice_positions(ds, frames),
        instance_number=_int(ds, "InstanceNumber", 0),
        phi=phi,
        burned_in_annotation=_str(ds, "BurnedInAnnotation").upper() == "YES",
    )


def _window(ds: Dataset, modality: str, override: tuple[float, float] | None) -> tuple[float, float] | None:
    if override is not None:
        return override
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        try:
            c, w = float(center), float(width)
        except (TypeError, ValueError):
            c, w = 0.0, 0.0
        if w >= 1:
            return c, w
    return WINDOW_PRESETS.get(modality)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOI LINEAR function of PS3.3 C.11.2.1.2.1, scaled to [0, 1] (in place on float32 input)."""
    x -= center - 0.5
    x /= max(width - 1.0, 1.0)
    x += 0.5
    return np.clip(x, 0.0, 1.0, out=x)


def _robust_range(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _modality_values(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (HU for CT) as float32: the Modality LUT or rescale slope/intercept."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    values = raw.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def _display(ds: Dataset, header: Header, raw: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Stored values -> display values in [0, 1], frame axis first."""
    if header.frames == 1:
        raw = raw[None]
    photometric = header.photometric
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds).astype(np.float32)
        return rgb / float(max(rgb.max(), 1.0) if rgb.max() > 255 else 255.0)
    if header.samples == 3:  # RGB (pydicom converts YBR to RGB while decoding)
        top = float((1 << min(header.bits_stored, 16)) - 1)
        return (raw.astype(np.float32) / top).clip(0.0, 1.0)
    values = _modality_values(ds, raw)
    win = _window(ds, header.modality, window)
    if win is not None:
        out = _linear_window(values, *win)
    elif "VOILUTSequence" in ds:
        lut = apply_voi(values, ds).astype(np.float32)
        out = _robust_range(lut)
    else:
        out = _robust_range(values)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _dcmread(path: str | Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse a Part 10 file (call inside :func:`_quiet`); every failure is a :class:`Rejected`."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise Rejected(
            "not a DICOM Part 10 file (no 'DICM' preamble); if it is DICOM without file meta, "
            "re-export it from the PACS (pydicom would need force=True, which medsilo does not guess)"
        ) from None
    except (OSError, EOFError) as exc:
        raise Rejected(f"unreadable file ({type(exc).__name__}); check it is complete and readable") from None
    except Exception as exc:
        raise Rejected(f"malformed DICOM ({type(exc).__name__}); re-export the file from the PACS") from None


def _pixels(ds: Dataset, header: Header) -> np.ndarray:
    """The stored pixel array, checked against the header (call inside :func:`_quiet`)."""
    try:
        raw = ds.pixel_array
    except Exception as exc:
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        if "less than expected" in text or "truncat" in text.lower():
            raise Rejected("pixel data is truncated; re-export the file from the PACS") from None
        raise Rejected(
            f"pixel data could not be decoded ({header.transfer_syntax}: {type(exc).__name__}); "
            "transcode the file to an uncompressed or lossless syntax"
        ) from None
    expected = (header.rows, header.columns) if header.frames == 1 else (header.frames, header.rows, header.columns)
    if tuple(raw.shape[: len(expected)]) != expected:
        raise Rejected("decoded pixel array does not match Rows/Columns/NumberOfFrames; fix the header")
    return np.asarray(raw)


def read_image(
    path: str | Path, *, limits: Limits = Limits(), window: tuple[float, float] | None = None
) -> Image:
    """Read and decode one DICOM file.

    Parameters
    ----------
    path
        A DICOM Part 10 file.
    limits
        Size limits checked before any pixel is decoded.
    window
        ``(center, width)`` replacing the file's VOI window and the modality preset.

    Raises
    ------
    Rejected
        With the reason and the fix; never a value read from the file.

    """
    with _quiet():
        ds = _dcmread(path)
        header = _header(ds, limits)
        raw = _pixels(ds, header)
        try:
            pixels = _display(ds, header, raw, window)
        except Exception as exc:
            raise Rejected(f"display pipeline failed ({type(exc).__name__}); check the LUT attributes") from None
    if not np.isfinite(pixels).all():
        raise Rejected("decoded pixels are not finite; check RescaleSlope/RescaleIntercept")
    return Image(header=header, pixels=pixels)


# ------------------------------------------------------------------------------------------ volumes and masks
#: Segmentation Storage and RT Structure Set Storage: the two ways a hospital stores expert masks.
SEG_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
RTSTRUCT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")


@dataclass(frozen=True)
class Facts:
    """What a file is and what it belongs to, read from its header alone. Stays on the node (UIDs identify)."""

    kind: str  # "image", "seg" or "rtstruct"
    patient_key: str
    study_uid: str
    series_uid: str
    sop_uid: str
    #: a mask's image series (DICOM-SEG: Referenced Series Sequence; RT-STRUCT: RT Referenced Series Sequence)
    referenced_series: str = ""


def _referenced_series(ds: Dataset, kind: str) -> str:
    if kind == "seg":
        found = {_str(item, "SeriesInstanceUID") for item in ds.get("ReferencedSeriesSequence") or []}
        where = "Referenced Series Sequence"
    else:
        found = {
            _str(series, "SeriesInstanceUID")
            for frame in ds.get("ReferencedFrameOfReferenceSequence") or []
            for study in frame.get("RTReferencedStudySequence") or []
            for series in study.get("RTReferencedSeriesSequence") or []
        }
        where = "RT Referenced Series Sequence"
    found -= {""}
    if len(found) != 1:
        raise Rejected(
            f"a {'DICOM-SEG' if kind == 'seg' else 'RT-STRUCT'} must reference exactly one image series "
            f"({where} names {len(found)}); export one mask object per segmented series"
        )
    return found.pop()


def read_facts(path: str | Path) -> Facts:
    """Classify one file as an image slice, a DICOM-SEG or an RT-STRUCT without decoding pixels.

    Raises
    ------
    Rejected
        For anything else (reports, presentation states, non-DICOM files) and for masks that do not
        name the one image series they segment.

    """
    with _quiet():  # values are converted (and may warn, quoting them) only when read below
        ds = _dcmread(path, stop_before_pixels=True)
        try:
            sop_class = UID(_str(ds, "SOPClassUID"))
            kind = {SEG_STORAGE: "seg", RTSTRUCT_STORAGE: "rtstruct"}.get(sop_class, "image")
            if kind == "image" and "Image Storage" not in sop_class.name:
                what = "no SOP Class UID" if not sop_class else \
                    "an unknown SOP class" if sop_class.name == str(sop_class) else sop_class.name
                raise Rejected(f"not an image, DICOM-SEG or RT-STRUCT ({what}); only those are used for "
                               "segmentation")
            return Facts(
                kind=kind,
                patient_key=_str(ds, "PatientID") or _str(ds, "StudyInstanceUID"),
                study_uid=_str(ds, "StudyInstanceUID"),
                series_uid=_str(ds, "SeriesInstanceUID"),
                sop_uid=_str(ds, "SOPInstanceUID"),
                referenced_series=_referenced_series(ds, kind) if kind != "image" else "",
            )
        except Rejected:
            raise
        except Exception as exc:
            raise Rejected(f"malformed header ({type(exc).__name__}); re-export the file from the PACS") from None


@dataclass(frozen=True)
class Volume:
    """An image series as one volume, slices in order of their position along the slice normal.

    ``values`` is float32 ``(slices, rows, cols)`` in modality units (the Modality LUT applied, no
    display window). The geometry places a point in patient coordinates (mm) on a voxel.
    """

    values: np.ndarray
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]  # the slice files, in slice order
    frame_of_reference: str
    origins: np.ndarray  # (slices, 3): each slice's Image Position (Patient)
    row_direction: np.ndarray  # (3,): direction of increasing column index
    column_direction: np.ndarray  # (3,): direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    positions: np.ndarray  # (slices,): position along the slice normal, increasing

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds.get(keyword) or []], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise Rejected(f"{keyword} is missing or malformed; a slice needs its geometry for a mask to be placed on it")
    return values


def read_volume(paths: Sequence[str | Path], *, limits: Limits = Limits()) -> Volume:
    """Read the single-frame grayscale slices of one series into a :class:`Volume`.

    Raises
    ------
    Rejected
        When a slice cannot be decoded, lacks geometry, or the slices disagree on matrix, orientation,
        spacing or frame of reference, or two share a position (a mask could not be placed).

    """
    slices = []
    with _quiet():
        for path in paths:
            ds = _dcmread(path)
            header = _header(ds, limits)
            if header.frames != 1 or header.samples != 1:
                raise Rejected("segmentation reads single-frame grayscale slices; convert enhanced multi-frame or "
                               "colour series to classic single-frame images")
            orientation = _floats(ds, "ImageOrientationPatient", 6)
            geometry = (header.rows, header.columns, *orientation.round(4), *_floats(ds, "PixelSpacing", 2).round(4),
                        _str(ds, "FrameOfReferenceUID"))
            origin = _floats(ds, "ImagePositionPatient", 3)
            if not header.positions:  # _slice_positions found no slice normal (degenerate orientation)
                raise Rejected("ImageOrientationPatient does not span a plane; fix the header or re-export the series")
            values = _modality_values(ds, _pixels(ds, header))
            slices.append((header.positions[0], header.sop_uid, origin, geometry, values, Path(path)))
    if not slices:
        raise Rejected("an image series without slices; re-send the series from the PACS")
    if len({s[3] for s in slices}) != 1:
        raise Rejected("the series' slices differ in matrix size, orientation, pixel spacing or frame of reference; "
                       "a segmentation needs one regular stack (split or resample the series)")
    slices.sort(key=lambda s: s[0])
    positions = np.asarray([s[0] for s in slices])
    gaps = np.diff(positions)
    if len(gaps) and gaps.min() < 1e-3:
        raise Rejected("two slices of the series share a position (duplicate instances or several stacks); "
                       "remove the duplicates or split the series")
    if len(gaps) > 1 and gaps.max() > 1.5 * float(np.median(gaps)):
        raise Rejected("the series has a gap of more than 1.5 slice spacings (a slice is missing or unreadable); "
                       "re-send the complete series")
    geometry = slices[0][3]
    return Volume(
        values=np.stack([s[4] for s in slices]).astype(np.float32, copy=False),
        sop_uids=tuple(s[1] for s in slices),
        files=tuple(s[5] for s in slices),
        frame_of_reference=str(geometry[-1]),
        origins=np.stack([s[2] for s in slices]),
        row_direction=np.asarray(geometry[2:5], dtype=np.float64),
        column_direction=np.asarray(geometry[5:8], dtype=np.float64),
        pixel_spacing=(float(geometry[8]), float(geometry[9])),
        positions=positions,
    )


def _number(item: Dataset, keyword: str, what: str) -> int:
    """An integer attribute of a sequence item (Segment Number, ROI Number), or :class:`Rejected`."""
    try:
        return int(item.get(keyword))
    except (TypeError, ValueError):
        raise Rejected(f"{what} has a missing or non-integer {keyword}; re-export it") from None


def _normalise(name: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def match_classes(names: Mapping[int, str], classes: Sequence[str], *, what: str) -> list[int]:
    """The segment (or ROI) numbers of ``classes``, in class order, matched by name.

    A name matches a class when, ignoring case and punctuation, it equals the class or contains it as
    whole words (``"Anterior hippocampus"`` is ``anterior``). Names matching no class are ignored.

    Raises
    ------
    Rejected
        When a class has no segment or several; the reason names the class, never the file's labels.

    """
    normal = {number: _normalise(name) for number, name in names.items()}
    out = []
    for cls in classes:
        key = _normalise(cls)
        exact = [n for n, name in normal.items() if name == key]
        found = exact or [n for n, name in normal.items() if f" {key} " in f" {name} "]
        if len(found) != 1:
            problem = "no segment" if not found else f"{len(found)} segments"
            raise Rejected(
                f"{what} has {problem} named after the class '{cls}' (segments are matched to the task's classes "
                f"{', '.join(classes)} by name); label exactly one segment per class"
            )
        out.append(found[0])
    return out


def read_seg_mask(path: str | Path, volume: Volume, classes: Sequence[str]) -> np.ndarray:
    """A DICOM-SEG's segments as a label mask on ``volume``: uint8 ``(slices, rows, cols)``, class ``k`` is ``k``.

    Segments are matched to ``classes`` by name (:func:`match_classes`); frames are placed by the source
    image each references (highdicom), and a slice the SEG does not mention is background.

    Raises
    ------
    Rejected
        When the SEG cannot be read, lacks a class, its segments overlap, or its frames do not reference
        the series' images.

    """
    import highdicom

    with _quiet():
        try:
            seg = highdicom.seg.segread(path)
        except Exception as exc:
            raise Rejected(f"malformed DICOM-SEG ({type(exc).__name__}); re-export the segmentation") from None
        labels = {_number(item, "SegmentNumber", "the DICOM-SEG"): _str(item, "SegmentLabel")
                  for item in seg.get("SegmentSequence") or []}
        numbers = match_classes(labels, classes, what="the DICOM-SEG")
        try:
            referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
        except Exception as exc:
            raise Rejected(f"the DICOM-SEG's source image references are malformed ({type(exc).__name__}); "
                           "re-export it") from None
        outside = referenced - set(volume.sop_uids)
        if not referenced or outside:
            raise Rejected(
                f"the DICOM-SEG references {len(outside)} of its {len(referenced)} source image(s) that are not "
                "slices of the series read; send the complete series with its segmentation"
            )
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(volume.sop_uids), segment_numbers=numbers, combine_segments=True,
                relabel=True, assert_missing_frames_are_empty=True,
            )
        except Exception as exc:
            raise Rejected(
                f"the DICOM-SEG cannot be placed on its image series ({type(exc).__name__}): its frames must reference "
                "the series' images (Source Image Sequence) and its class segments must not overlap; re-export it"
            ) from None
    mask = np.asarray(pixels).astype(np.uint8)
    if mask.shape != volume.values.shape:
        raise Rejected("the DICOM-SEG's frames differ in size from the series' slices; re-export it on the series")
    return mask


@dataclass(frozen=True)
class Contours:
    """An RT-STRUCT's closed planar contours per class: ``(points, 3)`` arrays in patient coordinates (mm)."""

    frame_of_reference: str
    per_class: tuple[tuple[np.ndarray, ...], ...]


def read_rtstruct(path: str | Path, classes: Sequence[str]) -> Contours:
    """The closed planar contours of the ROIs named after ``classes`` (:func:`match_classes`).

    Raises
    ------
    Rejected
        When the file is not a readable RT-STRUCT, lacks a class, or a class's ROI has no closed contour.

    """
    with _quiet():
        ds = _dcmread(path)
        if UID(_str(ds, "SOPClassUID")) != RTSTRUCT_STORAGE:
            raise Rejected("not an RT Structure Set; masks come from DICOM-SEG or RT-STRUCT objects")
        rois = {_number(item, "ROINumber", "the RT-STRUCT"): item for item in ds.get("StructureSetROISequence") or []}
        numbers = match_classes({n: _str(item, "ROIName") for n, item in rois.items()}, classes, what="the RT-STRUCT")
        contours = {_number(item, "ReferencedROINumber", "the RT-STRUCT"): item.get("ContourSequence") or []
                    for item in ds.get("ROIContourSequence") or []}
        frames = {_str(rois[n], "ReferencedFrameOfReferenceUID") for n in numbers} - {""}
        if len(frames) > 1:
            raise Rejected("the RT-STRUCT's class ROIs lie in different frames of reference; export them on one series")
        per_class = []
        for cls, number in zip(classes, numbers, strict=True):
            polygons = []
            for contour in contours.get(number, []):
                if _str(contour, "ContourGeometricType").upper() != "CLOSED_PLANAR":
                    continue  # points and open polylines enclose nothing
                try:
                    points = np.asarray([float(v) for v in contour.get("ContourData") or []], dtype=np.float64)
                except (TypeError, ValueError):
                    points = np.zeros(1)
                if points.size < 9 or points.size % 3 or not np.isfinite(points).all():
                    raise Rejected(f"a contour of class '{cls}' has malformed Contour Data (x, y, z triplets, at least "
                                   "three points); re-export the structure set")
                polygons.append(points.reshape(-1, 3))
            if not polygons:
                raise Rejected(f"the RT-STRUCT's ROI for class '{cls}' has no closed planar contour; "
                               "contour the structure or export it as a DICOM-SEG")
            per_class.append(tuple(polygons))
    return Contours(frame_of_reference=frames.pop() if frames else "", per_class=tuple(per_class))


# ------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class Identity:
    """Who and what an object is about: written into the header (synthetic in simulations)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_uid: str
    series_uid: str
    study_date: str
    institution: str
    referring_physician: str = ""
    study_description: str = ""
    series_number: int = 1


@dataclass(frozen=True)
class Equipment:
    """The acquiring device: how it stores the pixels."""

    manufacturer: str
    model: str
    station: str
    modality: str
    bits_stored: int = 8  # 8, 12 or 16
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    monochrome1: bool = False
    transfer_syntax: str = "explicit"
    pixel_spacing: float = 0.5
    extra: dict[str, str] = field(default_factory=dict)


def encode_stored(display: np.ndarray, equipment: Equipment) -> tuple[np.ndarray, float, float]:
    """Display values in [0, 1] -> stored integers plus the (center, width) window that displays them back.

    Stored values use ``bits_stored`` bits; the Modality LUT maps them to
    ``slope * stored + intercept`` and the returned window maps that range back to [0, 1].
    """
    top = (1 << equipment.bits_stored) - 1
    x = 1.0 - display if equipment.monochrome1 else display
    stored = np.clip(np.rint(x * top), 0, top)
    lo = equipment.rescale_intercept
    hi = equipment.rescale_slope * top + equipment.rescale_intercept
    width = (hi - lo) + 1.0
    center = lo + (width - 1.0) / 2.0 + 0.5
    dtype = np.uint8 if equipment.bits_stored <= 8 else np.uint16
    return stored.astype(dtype), center, width


def image_dataset(
    display: np.ndarray,
    *,
    identity: Identity,
    equipment: Equipment,
    instance_number: int,
    sop_uid: str | None = None,
    position: tuple[float, float, float] | None = None,
    rgb: bool = False,
) -> Dataset:
    """A complete image object for ``display`` (2D in [0, 1]; ``(rows, cols, 3)`` when ``rgb``)."""
    modality = equipment.modality
    sop_class = SOP_CLASSES.get(modality, SOP_CLASSES["OT"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.AccessionNumber = identity.accession
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID = identity.accession[-6:]
    ds.StudyDescription = identity.study_description
    ds.ReferringPhysicianName = identity.referring_physician
    ds.InstitutionName = identity.institution
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model
    ds.StationName = equipment.station
    ds.Modality = modality
    ds.SeriesNumber = identity.series_number
    ds.InstanceNumber = instance_number
    ds.BurnedInAnnotation = "NO"
    ds.PixelSpacing = [equipment.pixel_spacing, equipment.pixel_spacing]
    for keyword, value in equipment.extra.items():
        setattr(ds, keyword, value)
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = equipment.pixel_spacing
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[identity.study_uid, "frame-of-reference"])
    ds.Rows, ds.Columns = int(display.shape[0]), int(display.shape[1])
    if rgb:
        pixels = np.clip(np.rint(display * 255), 0, 255).astype(np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
    else:
        pixels, center, width = encode_stored(display, equipment)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if equipment.monochrome1 else "MONOCHROME2"
        ds.BitsAllocated = 8 if equipment.bits_stored <= 8 else 16
        ds.BitsStored = equipment.bits_stored
        ds.HighBit, ds.PixelRepresentation = equipment.bits_stored - 1, 0
        if modality in ("CT", "MR", "CR", "DX") or equipment.rescale_slope != 1 or equipment.rescale_intercept != 0:
            ds.RescaleSlope = f"{equipment.rescale_slope:g}"
            ds.RescaleIntercept = f"{equipment.rescale_intercept:g}"
            ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.WindowCenter = f"{center:.4f}"
        ds.WindowWidth = f"{width:.4f}"
    ds.PixelData = pixels.tobytes()
    _compress(ds, pixels, equipment.transfer_syntax)
    return ds


#: Segmented property type when the caller names none (SNOMED CT "Anatomical structure").
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")


def segmentation_dataset(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    classes: Sequence[str],
    *,
    structure: tuple[str, str, str] = ANATOMICAL_STRUCTURE,
    algorithm: str | None = None,
    series_number: int = 9902,
) -> Dataset:
    """A DICOM-SEG (binary segments, written by highdicom) of ``mask`` on the image series ``sources``.

    Parameters
    ----------
    sources
        The series' slices, in the order of ``mask``'s first axis.
    mask
        uint8 ``(slices, rows, cols)``; voxels of class ``k`` (1-based, in ``classes`` order) hold ``k``.
    classes
        Segment labels, one per class.
    structure
        ``(code value, coding scheme, meaning)`` of the segmented anatomy.
    algorithm
        The model that produced the mask (an automatic segmentation); ``None`` for an expert's (manual).
    series_number
        The new SEG series' number in the study.

    """
    import highdicom
    from pydicom.sr.codedict import codes

    if mask.ndim != 3 or len(sources) != mask.shape[0]:
        raise ValueError(f"mask of shape {mask.shape} for {len(sources)} source slices; expected (slices, rows, cols)")
    identification = None if algorithm is None else highdicom.AlgorithmIdentificationSequence(
        name=algorithm, version="1", family=codes.cid7162.ArtificialIntelligence)
    kind = highdicom.seg.SegmentAlgorithmTypeValues
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=k, segment_label=cls,
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=highdicom.sr.CodedConcept(*structure),
            algorithm_type=kind.MANUAL if algorithm is None else kind.AUTOMATIC,
            algorithm_identification=identification,
        )
        for k, cls in enumerate(classes, start=1)
    ]
    with _quiet():
        return highdicom.seg.Segmentation(
            source_images=list(sources), pixel_array=mask.astype(np.uint8),
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=series_number, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="medsilo", manufacturer_model_name="medsilo",
            software_versions="medsilo", device_serial_number="none",
            series_description=f"{algorithm} segmentation" if algorithm else "expert segmentation",
        )


def _compress(ds: Dataset, pixels: np.ndarray, codec: str) -> None:
    if codec not in WRITE_SYNTAXES:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(WRITE_SYNTAXES)}")
    syntax = WRITE_SYNTAXES[codec]
    if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        return
    if syntax == JPEGBaseline8Bit:  # pydicom has no JPEG encoder: Pillow encodes, pydicom encapsulates
        from PIL import Image as PILImage
        from pydicom.encaps import encapsulate

        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline stores 8-bit pixels; use bits_stored=8")
        buf = io.BytesIO()
        PILImage.fromarray(pixels).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.LossyImageCompression = "01"
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        return
    with _quiet():
        ds.compress(syntax, arr=pixels, generate_instance_uid=False)


def dataset_bytes(ds: Any) -> bytes:
    """A dataset (e.g. from a DICOMweb retrieve) serialised as a Part 10 file."""
    buf = io.BytesIO()
    with _quiet():
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def new_uid() -> str:
    """A fresh DICOM UID (pydicom's root + random suffix)."""
    return str(generate_uid())


# ------------------------------------------------------------------------------------------ results
#: Patient and General Study module attributes copied from the source image, so the PACS files the result
#: with the patient's study (the result stays inside the hospital).
_PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


def result_dataset(
    source_path: str | Path, overlay_rgb: np.ndarray, *, label: str, probabilities: dict[str, float],
    model_name: str = "medsilo",
) -> Dataset:
    """A Secondary Capture of ``overlay_rgb`` (uint8 ``(rows, cols, 3)``) in the source image's study.

    The patient and study attributes come from the source file; the result gets a new series and instance,
    references the source image, and carries the predicted label and probabilities in its comments.

    Raises
    ------
    Rejected
        When the source file cannot be read as DICOM.

    """
    with _quiet():
        try:
            src = pydicom.dcmread(source_path, stop_before_pixels=True)
        except Exception as exc:
            raise Rejected(f"source image unreadable ({type(exc).__name__}); results need the DICOM source") from None
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError(f"overlay must be uint8 (rows, cols, 3), got {overlay_rgb.dtype} {overlay_rgb.shape}")
    sc = SOP_CLASSES["OT"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sc
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sc, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = src.get("SpecificCharacterSet", "ISO_IR 100")
    for keyword in _PATIENT_STUDY:
        if keyword in src:
            setattr(ds, keyword, src.get(keyword))
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesNumber = 9901
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"{model_name} Grad-CAM"
    ds.ConversionType = "WSD"  # workstation
    ds.Manufacturer = "medsilo"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "Grad-CAM heatmap of a federated model's prediction, overlaid on the source image"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.get("SOPClassUID", "")
    ref.ReferencedSOPInstanceUID = src.get("SOPInstanceUID", "")
    ds.SourceImageSequence = [ref]
    probs = ", ".join(f"{k}={v:.4f}" for k, v in probabilities.items())
    ds.ImageComments = f"Predicted {label} ({probs}). Research use only: not for diagnostic use."[:10240]
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = int(overlay_rgb.shape[0]), int(overlay_rgb.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(overlay_rgb).tobytes()
    return ds


def write_result(record: Any, prediction: Any, overlay_rgb: np.ndarray, out_dir: str | Path) -> Path:
    """Write the prediction for ``record`` (read from a DICOM file) as a Secondary Capture in ``out_dir``.

    ``record.path`` is the source file; ``prediction.label`` and ``prediction.probabilities`` the result.
    """
    from common.io import atomic_write_bytes  # the writer is the only side effect here

    ds = result_dataset(record.path, overlay_rgb, label=str(prediction.label),
                        probabilities=dict(prediction.probabilities))
    target = Path(out_dir) / f"{Path(record.path).stem}-medsilo-sc.dcm"
    atomic_write_bytes(target, dataset_bytes(ds))
    return target


def write_segmentation_result(
    volume: Volume, mask: np.ndarray, classes: Sequence[str], out_dir: str | Path, *, name: str, algorithm: str,
    structure: tuple[str, str, str] = ANATOMICAL_STRUCTURE,
) -> Path:
    """Write a model's label mask on ``volume`` as a DICOM-SEG ``out_dir/<name>-medsilo-seg.dcm``.

    The SEG belongs to the source series' patient and study, references every source slice, and marks its
    segments as automatic, produced by ``algorithm`` (a PACS files it with the images it outlines).

    Raises
    ------
    Rejected
        When a source slice can no longer be read.

    """
    from common.io import atomic_write_bytes  # the writer is the only side effect here

    with _quiet():
        sources = [_dcmread(path, stop_before_pixels=True) for path in volume.files]
    try:
        ds = segmentation_dataset(sources, mask, classes, structure=structure, algorithm=algorithm)
    except Exception as exc:
        raise Rejected(
            f"a DICOM-SEG cannot be built on this series ({type(exc).__name__}): it copies the patient and study "
            "modules and needs a Frame of Reference UID; de-identified series may lack them (use the .npy mask)"
        ) from None
    target = Path(out_dir) / f"{name}-medsilo-seg.dcm"
    atomic_write_bytes(target, dataset_bytes(ds))
    return target
