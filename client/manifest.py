"""A site's label manifest: a CSV mapping DICOM UIDs to labels, validated against its archive.

Columns (header row, case-insensitive): at least one of ``StudyInstanceUID``, ``SeriesInstanceUID``,
``SOPInstanceUID``, and ``label``. A label is a class index or a class name of the task; for a
multi-label task, several separated by ``;``. A record takes the most specific match (instance,
then series, then study).

Problems name the CSV line, never a UID: the report may be shown on a shared screen.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.ingest import Unit
from common.errors import DataError

LEVELS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass
class Manifest:
    """Labels by UID per level, plus what was wrong with the file."""

    labels: dict[str, dict[str, tuple[int, ...]]]
    lines: dict[str, dict[str, int]]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Labelled:
    """Labels for the ingested records and the validation report."""

    labels: np.ndarray  # (N,) or (N, L); rows without a label are dropped from ``keep``
    keep: np.ndarray  # indices of units that have a label
    unlabelled: list[Unit]
    errors: list[str]
    warnings: list[str]
    per_class: dict[str, int]


def _lines(numbers: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(n) for n in sorted(numbers)[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def _parse_label(text: str, classes: Sequence[str], multilabel: bool) -> tuple[int, ...] | None:
    parts = [t.strip() for t in text.split(";")] if multilabel else [text.strip()]
    if not parts or any(not p for p in parts):
        return None
    lowered = [c.lower() for c in classes]
    out = []
    for p in parts:
        if p.isdigit() and int(p) < len(classes):
            out.append(int(p))
        elif p.lower() in lowered:
            out.append(lowered.index(p.lower()))
        else:
            return None
    return tuple(sorted(set(out)))


def read_manifest(path: str | Path, classes: Sequence[str], *, multilabel: bool = False) -> Manifest:
    """Parse and check a manifest; every problem is collected, none raised.

    Raises
    ------
    DataError
        Only when the file cannot be read at all or has no usable header.

    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"labels file {path} cannot be read ({type(exc).__name__}); save it as UTF-8 CSV") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise DataError(f"labels file {path} is empty; expected a header such as 'SOPInstanceUID,label'")
    cols = {h.strip().lower(): i for i, h in enumerate(header)}
    levels = [lv for lv in LEVELS if lv.lower() in cols]
    if "label" not in cols or not levels:
        raise DataError(
            f"labels file {path} has columns {header!r}; expected 'label' and at least one of {', '.join(LEVELS)}"
        )
    m = Manifest(labels={lv: {} for lv in LEVELS}, lines={lv: {} for lv in LEVELS})
    bad_label: list[int] = []
    no_uid: list[int] = []
    conflicts: list[int] = []
    dupes: list[int] = []
    names = ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    for lineno, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cell = row[cols["label"]] if cols["label"] < len(row) else ""
        label = _parse_label(cell, classes, multilabel)
        level = next((lv for lv in levels if cols[lv.lower()] < len(row) and row[cols[lv.lower()]].strip()), None)
        if level is None:
            no_uid.append(lineno)
            continue
        if label is None:
            bad_label.append(lineno)
            continue
        uid = row[cols[level.lower()]].strip()
        if uid in m.labels[level]:
            (dupes if m.labels[level][uid] == label else conflicts).append(lineno)
            if m.labels[level][uid] != label:
                continue
        m.labels[level][uid] = label
        m.lines[level][uid] = lineno
    if no_uid:
        m.errors.append(f"lines {_lines(no_uid)}: no UID; fill {' or '.join(levels)}")
    if bad_label:
        m.errors.append(f"lines {_lines(bad_label)}: missing or unknown label; use a class index or name ({names})")
    if conflicts:
        m.errors.append(f"lines {_lines(conflicts)}: the same UID has a different label earlier; keep one row per UID")
    if dupes:
        m.warnings.append(f"lines {_lines(dupes)}: duplicate rows (same UID, same label); remove them")
    return m


def label_units(
    manifest: Manifest, units: Sequence[Unit], classes: Sequence[str], *, multilabel: bool = False
) -> Labelled:
    """Match records to manifest rows and report unknown UIDs, unlabelled records and absent classes."""
    used: dict[str, set[str]] = {lv: set() for lv in LEVELS}
    keep, labels, unlabelled = [], [], []
    for i, u in enumerate(units):
        found = None
        for level, uid in zip(LEVELS, (u.sop_uid, u.series_uid, u.study_uid), strict=True):
            if uid and uid in manifest.labels[level]:
                found = manifest.labels[level][uid]
                used[level].add(uid)
                break
        if found is None:
            unlabelled.append(u)
            continue
        keep.append(i)
        labels.append(found)
    warnings = list(manifest.warnings)
    unknown = [manifest.lines[lv][uid] for lv in LEVELS for uid in manifest.labels[lv] if uid not in used[lv]]
    if unknown:
        warnings.append(f"lines {_lines(unknown)}: UID matches no ingested image (missing or rejected file?)")
    if multilabel:
        arr = np.zeros((len(labels), len(classes)), dtype=np.int64)
        for r, lab in enumerate(labels):
            arr[r, list(lab)] = 1
        counts = arr.sum(axis=0) if len(labels) else np.zeros(len(classes), dtype=np.int64)
    else:
        arr = np.asarray([lab[0] for lab in labels], dtype=np.int64)
        counts = np.bincount(arr, minlength=len(classes)) if len(labels) else np.zeros(len(classes), dtype=np.int64)
    per_class = {c: int(n) for c, n in zip(classes, counts, strict=True)}
    absent = [c for c, n in per_class.items() if n == 0]
    if absent:
        warnings.append(f"classes with no labelled image at this site: {', '.join(absent)}")
    return Labelled(labels=arr, keep=np.asarray(keep, dtype=np.int64), unlabelled=unlabelled,
                    errors=list(manifest.errors), warnings=warnings, per_class=per_class)
