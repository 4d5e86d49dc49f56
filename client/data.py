"""A site's own training and validation records, as found on the node.

Simulation writes one ``site-NN.npz`` per hospital into ``site-data-dir``; a deployed node
names its file with the node config key ``data-path``. Either way the arrays stay on the node.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from client.pacs import is_dicomweb
from client.policy import state_dir
from common.config import RunConfig
from common.datasets import DatasetInfo, Split, Task, dataset_info
from common.errors import DataError

log = logging.getLogger("medsilo")

SITE_FILE_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
#: Optional site file key: one patient id (ints or strings) per training record; DP-SGD then protects patients.
PATIENTS_KEY = "train_patients"
#: Its validation counterpart: a patient's validation images then make one validation row (sensitivity 1).
VAL_PATIENTS_KEY = "val_patients"


@dataclass(frozen=True)
class SiteData:
    """One hospital's records for one task.

    ``train_patients`` is the patient index (``0 .. P-1``, :func:`client.dp.patients.patient_groups`) of every
    training record, where the node knows its patients; the patient keys themselves never leave the node.
    """

    name: str
    info: DatasetInfo
    train: Split
    val: Split
    train_patients: np.ndarray | None = None
    #: The patient index of every validation record (DICOM sites): a patient's images make one validation row.
    val_patients: np.ndarray | None = None

    @property
    def privacy_unit(self) -> Literal["patient", "record"]:
        """What DP-SGD samples, clips and counts: ``"patient"`` where records are grouped by patient, else ``"record"``.

        Segmentation records are patients' volumes; classification records are patients when
        ``train_patients`` is known (DICOM sites, site files with ``train_patients``).
        """
        if self.info.task is Task.SEGMENTATION or self.train_patients is not None:
            return "patient"
        return "record"

    @property
    def num_patients(self) -> int | None:
        """How many patients the training records come from (``None``: not known)."""
        return None if self.train_patients is None else int(self.train_patients.max(initial=-1)) + 1


def site_file(site_data_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation stores hospital ``partition_id``'s records."""
    return Path(site_data_dir) / f"site-{partition_id:02d}.npz"


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's display name: ``site-name`` from the node config, else ``site-<partition>``."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return "site"


def _patient_groups_of(path: str, keys: np.ndarray, num_records: int, *, key: str = PATIENTS_KEY) -> np.ndarray:
    """The patient index of every record from a site file's ``train_patients`` or ``val_patients`` (validated)."""
    from client.dp.patients import patient_groups

    labels = "train_labels" if key == PATIENTS_KEY else "val_labels"
    if keys.ndim != 1 or len(keys) != num_records:
        raise DataError(
            f"site data file {path}: {key} has shape {keys.shape} but {labels} has {num_records} "
            f"record(s); store one patient id per record (a 1-D array of length {num_records}), "
            f"or leave {key} out to train with the record as the privacy unit"
        )
    if keys.dtype.kind not in "iuUS":
        raise DataError(f"site data file {path}: {key} has dtype {keys.dtype}; store patient ids as integers or "
                        "strings")
    return patient_groups(keys)


@functools.lru_cache(maxsize=4)
def _read_site_file(path: str, mtime_ns: int, size: int) -> tuple[Split, Split, np.ndarray | None,
                                                                 np.ndarray | None]:
    """Decode a site file once per process (every Flower message builds a new client object).

    Keyed by modification time and size, so a changed file is read again; arrays are read-only.
    Returns the training and validation splits and the training and validation records' patient indices
    (``None`` when the file has no ``train_patients`` / ``val_patients``).
    """
    del mtime_ns, size  # cache key only
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in SITE_FILE_KEYS if k not in npz.files]
        if missing:
            raise DataError(f"site data file {path} lacks {', '.join(missing)}; expected keys {SITE_FILE_KEYS}")
        arrays = {k: npz[k] for k in SITE_FILE_KEYS}
        patient_keys = npz[PATIENTS_KEY] if PATIENTS_KEY in npz.files else None
        val_keys = npz[VAL_PATIENTS_KEY] if VAL_PATIENTS_KEY in npz.files else None
    groups = val_groups = None
    if patient_keys is not None:
        groups = _patient_groups_of(path, patient_keys, len(arrays["train_labels"]))
        arrays[PATIENTS_KEY] = groups
    if val_keys is not None:
        val_groups = _patient_groups_of(path, val_keys, len(arrays["val_labels"]), key=VAL_PATIENTS_KEY)
        arrays[VAL_PATIENTS_KEY] = val_groups
    for a in arrays.values():
        a.setflags(write=False)
    return (
        Split(arrays["train_images"], arrays["train_labels"].astype(np.int64)),
        Split(arrays["val_images"], arrays["val_labels"].astype(np.int64)),
        groups,
        val_groups,
    )


def _dicom_site(source: str, node_config: Mapping[str, Any], config: RunConfig, info: DatasetInfo) -> SiteData:
    """Ingest a DICOM folder or DICOMweb service with the node's cache and split it by patient."""
    if info.task is Task.SEGMENTATION:
        return _segmentation_site(source, node_config, config, info)
    from client.dp.patients import patient_groups
    from client.preprocessing import Preprocessing
    from client.site_check import check_source, record_patient_keys, training_records

    state = state_dir(node_config, config.to_flower())
    if state is None:
        raise DataError("a DICOM site needs a state folder for its cache; start the node with a state-dir")
    labels = node_config.get("labels-path")
    if labels is None and not is_dicomweb(source):
        labels = Path(source) / "labels.csv"
    if labels is None:
        raise DataError("a DICOMweb site needs its labels manifest: set the node config labels-path")
    settings = Preprocessing.for_dataset(
        info.name, size=info.size, channels=info.channels, spatial_dims=info.spatial_dims
    )
    check = check_source(source, settings, state_dir=state, labels=str(labels), classes=info.labels,
                         multilabel=info.task is Task.MULTILABEL)
    images, labels_arr, val = training_records(check)
    keys = record_patient_keys(check)  # may be identifying: only their grouping and counts go further
    patients = patient_groups([k for k, v in zip(keys, val.tolist(), strict=True) if not v])
    val_patients = patient_groups([k for k, v in zip(keys, val.tolist(), strict=True) if v])
    log.info(
        "%s: %d DICOM file(s) ingested, %d rejected, %d labelled record(s), %d training patient(s) "
        "(`medsilo site check` has the details)",
        site_name(node_config), len(check.ingested.files), len(check.ingested.rejected), len(labels_arr),
        int(patients.max(initial=-1)) + 1,
    )
    for a in (images, labels_arr, patients, val_patients):
        a.setflags(write=False)
    return SiteData(
        name=site_name(node_config), info=info,
        train=Split(images[~val], labels_arr[~val]), val=Split(images[val], labels_arr[val]),
        train_patients=patients, val_patients=val_patients,
    )


def _segmentation_site(
    source: str, node_config: Mapping[str, Any], config: RunConfig, info: DatasetInfo
) -> SiteData:
    """A DICOM folder or DICOMweb service of image series with their DICOM-SEG or RT-STRUCT masks, by patient."""
    from client.series import local_folder, segmentation_site

    state = state_dir(node_config, config.to_flower())
    folder, _ = local_folder(source, state)  # retrieval failures are logged there
    train, val = segmentation_site(folder, info, cache_dir=None if state is None else state / "segmentation-cache")
    log.info("%s: %d training and %d validation volume(s) from DICOM series with masks",
             site_name(node_config), len(train), len(val))
    return SiteData(name=site_name(node_config), info=info, train=train, val=val)


def load_site_data(node_config: Mapping[str, Any], config: RunConfig) -> SiteData:
    """Read the site's records named by the node config (deployment) or partition (simulation).

    ``data-path`` names a site file (``.npz``), a DICOM folder (with its ``labels.csv``; for segmentation,
    image series with their DICOM-SEG or RT-STRUCT masks) or a DICOMweb URL (with the node config
    ``labels-path``); a simulated site is ``site-NN.npz`` or a ``site-NN/`` DICOM archive in ``site-data-dir``.
    """
    info = dataset_info(config.dataset, resolution=config.resolution)
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
        if is_dicomweb(str(node_config["data-path"])) or path.is_dir():
            return _dicom_site(str(node_config["data-path"]), node_config, config, info)
    elif config.site_data_dir and "partition-id" in node_config:
        path = site_file(config.site_data_dir, int(node_config["partition-id"]))
        if path.with_suffix("").is_dir():
            return _dicom_site(str(path.with_suffix("")), node_config, config, info)
    else:
        raise DataError(
            "this node has no data: start it with --node-config 'data-path=\"/path/site.npz\"' "
            "(a DICOM folder works too), or run it inside `medsilo simulate`"
        )
    if not path.is_file():
        raise DataError(f"site data file {path} not found; check the node's data-path")
    stat = path.stat()
    train, val, patients, val_patients = _read_site_file(str(path), stat.st_mtime_ns, stat.st_size)
    if len(train) == 0:
        raise DataError(f"site data file {path} has no training records")
    return SiteData(name=site_name(node_config), info=info, train=train, val=val, train_patients=patients,
                    val_patients=val_patients)
