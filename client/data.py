"""A site's own training and validation records, as found on the node.

Simulation writes one ``site-NN.npz`` per hospital into ``site-data-dir``; a deployed node
names its file with the node config key ``data-path``. Either way the arrays stay on the node.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.datasets import DatasetInfo, Split, dataset_info
from common.errors import DataError

SITE_FILE_KEYS = ("train_images", "train_labels", "val_images", "val_labels")


@dataclass(frozen=True)
class SiteData:
    """One hospital's records for one task."""

    name: str
    info: DatasetInfo
    train: Split
    val: Split


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


@functools.lru_cache(maxsize=4)
def _read_site_file(path: str, mtime_ns: int, size: int) -> tuple[Split, Split]:
    """Decode a site file once per process (every Flower message builds a new client object).

    Keyed by modification time and size, so a changed file is read again; arrays are read-only.
    """
    del mtime_ns, size  # cache key only
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in SITE_FILE_KEYS if k not in npz.files]
        if missing:
            raise DataError(f"site data file {path} lacks {', '.join(missing)}; expected keys {SITE_FILE_KEYS}")
        arrays = {k: npz[k] for k in SITE_FILE_KEYS}
    for a in arrays.values():
        a.setflags(write=False)
    return (
        Split(arrays["train_images"], arrays["train_labels"].astype(np.int64)),
        Split(arrays["val_images"], arrays["val_labels"].astype(np.int64)),
    )


def load_site_data(node_config: Mapping[str, Any], config: RunConfig) -> SiteData:
    """Read the site's records named by the node config (deployment) or partition (simulation)."""
    info = dataset_info(config.dataset)
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
    elif config.site_data_dir and "partition-id" in node_config:
        path = site_file(config.site_data_dir, int(node_config["partition-id"]))
    else:
        raise DataError(
            "this node has no data: start it with --node-config 'data-path=\"/path/site.npz\"' "
            "(or run it inside `medsilo simulate`)"
        )
    if not path.is_file():
        raise DataError(f"site data file {path} not found; check the node's data-path")
    stat = path.stat()
    train, val = _read_site_file(str(path), stat.st_mtime_ns, stat.st_size)
    if len(train) == 0:
        raise DataError(f"site data file {path} has no training records")
    return SiteData(name=site_name(node_config), info=info, train=train, val=val)
