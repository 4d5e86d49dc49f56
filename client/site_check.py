"""A hospital's pre-flight check of its DICOM source, and the records a node trains on.

``medsilo site check`` prints the table and writes the JSON; the client node calls
:func:`check_source` and :func:`training_records` on the same source with the same cache, so a
check warms the cache the node will read. The report names files and reasons for the hospital's
eyes only; what the node sends to the coordinator is model updates and aggregate metrics.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.ingest import Ingested, ingest, summary_of
from client.manifest import Labelled, label_units, read_manifest
from client.pacs import is_dicomweb, sync
from client.preprocessing import Preprocessing
from common.errors import DataError


@dataclass
class SiteCheck:
    """Everything the pre-flight found."""

    source: str
    ingested: Ingested
    labelled: Labelled | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Whether a node can train on this source."""
        return not self.errors

    def phi_findings(self) -> dict[str, Any]:
        """How many ingested files carry each identifying attribute (names of attributes, never values)."""
        counts: dict[str, int] = {}
        for f in self.ingested.files:
            for k in f.phi:
                counts[k] = counts.get(k, 0) + 1
        burned = sum(1 for f in self.ingested.files if f.burned_in_annotation)
        return {
            "attributes": dict(sorted(counts.items())),
            "burned_in_annotation": burned,
            "note": "identifying attributes are read on this node only; none of them leaves it",
        }

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (``ingested`` and ``rejected`` are lists of files)."""
        label_of: dict[str, str] = {}
        if self.labelled is not None:
            units = self.ingested.units
            for i, lab in zip(self.labelled.keep.tolist(), self.labelled.labels.tolist(), strict=True):
                text = str(lab)
                for path in units[i].files:
                    label_of[path] = text
        return {
            "source": self.source,
            "ready": self.ready,
            "errors": self.errors,
            "warnings": self.warnings,
            "summary": summary_of(self.ingested),
            "labels": self.labelled.per_class if self.labelled is not None else None,
            "phi_findings": self.phi_findings(),
            "ingested": [
                {"path": f.path, "modality": f.modality, "transfer_syntax": f.transfer_syntax,
                 "size": [f.rows, f.columns, f.frames], **({"label": label_of.get(f.path)} if self.labelled else {})}
                for f in self.ingested.files
            ],
            "rejected": [{"path": p, "reason": r} for p, r in self.ingested.rejected],
            "unlabelled": sorted(p for u in (self.labelled.unlabelled if self.labelled else []) for p in u.files),
        }

    def table(self) -> str:
        """A plain-text summary for the terminal."""
        s = summary_of(self.ingested)
        lines = [
            f"source            {self.source}",
            f"files found       {s['files']}",
            f"  ingested        {s['ingested_files']}  ({s['records']} training records)",
            f"  rejected        {s['rejected_files']}",
        ]
        for title, key in (("modalities", "modalities"), ("transfer syntaxes", "transfer_syntaxes"),
                           ("image sizes", "image_sizes")):
            lines.append(f"{title:<18}" + ", ".join(f"{k} {v}" for k, v in s[key].items()))
        if self.labelled is not None:
            lines.append("labels            " + ", ".join(f"{k} {v}" for k, v in self.labelled.per_class.items()))
            lines.append(f"  unlabelled      {len(self.labelled.unlabelled)} record(s)")
        phi = self.phi_findings()
        lines.append("PHI in headers    " + (", ".join(f"{k} {v}" for k, v in phi["attributes"].items()) or "none"))
        lines.append(f"burned-in text    {phi['burned_in_annotation']} file(s) flagged BurnedInAnnotation=YES")
        reasons: dict[str, int] = {}
        for _, r in self.ingested.rejected:
            reasons[r] = reasons.get(r, 0) + 1
        if reasons:
            lines.append("rejections:")
            lines.extend(f"  {n:>5} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        lines.extend(f"WARNING: {w}" for w in self.warnings)
        lines.extend(f"ERROR: {e}" for e in self.errors)
        lines.append("READY" if self.ready else "NOT READY: fix the errors above")
        return "\n".join(lines)


def check_source(
    source: str,
    settings: Preprocessing,
    *,
    state_dir: str | Path,
    labels: str | Path | None = None,
    classes: tuple[str, ...] = (),
    multilabel: bool = False,
    workers: int | None = None,
) -> SiteCheck:
    """Ingest ``source`` (folder or DICOMweb URL) with the node's cache and validate its labels.

    Raises
    ------
    DataError
        When the source or the labels file cannot be read at all.

    """
    errors: list[str] = []
    warnings: list[str] = []
    state = Path(state_dir)
    folder: str | Path = source
    if is_dicomweb(source):
        result = sync(source, state / "pacs-spool")
        folder = result.folder
        warnings.extend(result.failed)
    ingested = ingest(folder, settings, cache_dir=state / "dicom-cache", workers=workers,
                      exclude=[labels] if labels is not None else [])
    if ingested.files_in == 0:
        errors.append(f"no file found in {source}; point --data at the folder holding the DICOM files")
    elif not ingested.units:
        errors.append("no file could be ingested; see the rejection reasons")
    labelled = None
    if labels is not None:
        manifest = read_manifest(labels, classes, multilabel=multilabel)
        labelled = label_units(manifest, ingested.units, classes, multilabel=multilabel)
        errors.extend(labelled.errors)
        warnings.extend(labelled.warnings)
        if ingested.units and len(labelled.keep) == 0:
            errors.append("no ingested image has a label; check that the manifest's UIDs come from this archive")
        elif labelled.unlabelled:
            warnings.append(f"{len(labelled.unlabelled)} ingested record(s) have no label and are not used")
    return SiteCheck(source=source, ingested=ingested, labelled=labelled, errors=errors, warnings=warnings)


def _val_draw(patient_key: str) -> float:
    digest = hashlib.sha256(("medsilo-validation|" + patient_key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def training_records(check: SiteCheck, *, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled images, their labels and a validation mask that keeps each patient on one side.

    Raises
    ------
    DataError
        When the check found errors or no labelled record.

    """
    if check.labelled is None:
        raise DataError("a node trains only on labelled images; pass the site's labels.csv")
    if not check.ready:
        raise DataError("the DICOM source is not ready: " + "; ".join(check.errors)
                        + " (run `medsilo site check` for the full report)")
    keep = check.labelled.keep
    images = np.asarray(check.ingested.images[keep]) if len(keep) else np.zeros((0,), dtype=np.uint8)
    val = validation_mask(record_patient_keys(check), val_fraction=val_fraction)
    return images, check.labelled.labels, val


def record_patient_keys(check: SiteCheck) -> list[str]:
    """The patient key of every labelled record, in :func:`training_records`' order.

    The keys may be identifying (a PatientID): they stay on this node; group them with
    :func:`client.dp.patients.patient_groups` and report only counts.
    """
    if check.labelled is None:
        raise DataError("a node trains only on labelled images; pass the site's labels.csv")
    return [check.ingested.units[i].patient_key for i in check.labelled.keep.tolist()]


def validation_mask(patient_keys: Sequence[str], *, val_fraction: float = 0.1) -> np.ndarray:
    """Which records go to the node's validation split: a seeded draw per patient.

    A patient's records stay on one side; at least one record stays in training, and one goes to
    validation when there are several patients.
    """
    draws = np.asarray([_val_draw(key) for key in patient_keys])
    val = draws < val_fraction
    if val.all() or (not val.any() and len(set(patient_keys)) > 1):
        val = draws <= np.quantile(draws, val_fraction) if len(draws) else val
        if val.all():
            val[np.argmax(draws)] = False
    return val


def compute_summary(node_config: Mapping[str, Any]) -> str:
    """What the node will train on, for ``medsilo site check``: its workers, their devices, what this machine has.

    ``node_config`` holds the node's ``workers`` and ``devices`` (:func:`client.dp.distributed.site_compute`);
    raises :class:`~common.errors.ConfigError` for a setting this machine cannot honour.
    """
    import torch

    from client.dp.distributed import site_compute

    compute = site_compute(node_config)
    devices = compute.resolved()
    how = compute.backend() if compute.workers > 1 else "one process"
    lines = [
        f"compute: {compute.workers} DP-SGD worker process(es) on {', '.join(devices)} "
        f"({how}; devices setting: {','.join(compute.devices)})",
        f"  CUDA devices found: {torch.cuda.device_count()}"
        + "".join(f"\n    cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())),
        f"  CPU threads: {os.cpu_count()} (torch uses {torch.get_num_threads()} per process; each worker gets "
        f"{max(1, (os.cpu_count() or 1) // compute.workers)})",
    ]
    return "\n".join(lines)
