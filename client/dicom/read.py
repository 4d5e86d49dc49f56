"""Reading DICOM objects: headers, decoded images, a file's facts, size limits, and :class:`Rejected`.

Reading turns one DICOM Part 10 file into header facts (which never leave the node) and
pixels in [0, 1] with the display pipeline a radiologist's viewer applies: Modality LUT
(rescale slope/intercept), VOI window (from the file, a preset for the modality, or a robust
min-max), MONOCHROME1 inversion, RGB/YBR/palette colour. Compressed transfer syntaxes decode
through pydicom's pixel-data plugins (pylibjpeg for JPEG baseline/lossless/extended, JPEG 2000 and RLE;
pyjpegls for JPEG-LS; deflate natively).

Every failure becomes :class:`Rejected` with a reason that names the problem and the fix and
never carries a tag value, a UID, a date or a name. pydicom's own warnings (which can quote tag
values) are silenced while a file is read (:func:`_quiet`, which the package's other modules use too).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.uid import UID

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


# ------------------------------------------------------------------------------------------ facts
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

