"""A PACS as a data source: DICOMweb search (QIDO-RS) and retrieve (WADO-RS) into a local spool.

The node mirrors the instances it may use into a spool folder inside its state folder (one file
per instance, written atomically and owner-only, fetched once), then ingests that folder like any DICOM folder,
so the content-hash cache, the per-file report and the robustness rules are the same for both
sources. Credentials come from the environment (``MEDSILO_PACS_USER`` / ``MEDSILO_PACS_PASSWORD``,
or ``MEDSILO_PACS_TOKEN`` for a bearer token), never from a URL that could end up in a log.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.errors import DataError
from common.io import atomic_write_bytes, make_owner_only, private_dir

_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
PAGE = 500


def is_dicomweb(source: str) -> bool:
    """Whether a ``--data`` value names a DICOMweb service rather than a folder."""
    return source.lower().startswith(("http://", "https://"))


def _session() -> Any:
    import requests

    s = requests.Session()
    user, password = os.environ.get("MEDSILO_PACS_USER"), os.environ.get("MEDSILO_PACS_PASSWORD")
    token = os.environ.get("MEDSILO_PACS_TOKEN")
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    elif user and password:
        s.auth = (user, password)
    ca = os.environ.get("MEDSILO_PACS_CA")
    if ca:
        s.verify = ca
    return s


def _value(item: Mapping[str, Any], tag: str) -> str:
    entry = item.get(tag)
    values = entry.get("Value") if isinstance(entry, dict) else None
    return str(values[0]) if isinstance(values, list) and values else ""


@dataclass(frozen=True)
class SpoolResult:
    """What a sync did."""

    folder: Path
    listed: int
    fetched: int
    failed: list[str]  # reasons, one per instance that could not be retrieved (no UID)


def sync(url: str, spool: str | Path, *, study_uids: list[str] | None = None) -> SpoolResult:
    """Mirror the service's instances (or those of ``study_uids``) into ``spool``.

    Raises
    ------
    DataError
        When the service cannot be searched (unreachable, refused, not DICOMweb).

    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    from client.dicom import dataset_bytes

    parts = urlsplit(url)
    if parts.username or parts.password:
        raise DataError("DICOMweb URL carries credentials; remove them and set MEDSILO_PACS_USER/_PASSWORD")
    spool = private_dir(spool)  # raw DICOM of patients: owner-only, as is every instance in it
    client = DICOMwebClient(url=url, session=_session())
    found: list[tuple[str, str, str]] = []
    try:
        studies: list[str | None] = list(study_uids) if study_uids else [None]
        for study in studies:
            offset = 0
            while True:
                page = client.search_for_instances(study_instance_uid=study, offset=offset, limit=PAGE,
                                                   get_remaining=False)
                found.extend((_value(i, _STUDY), _value(i, _SERIES), _value(i, _SOP)) for i in page)
                if len(page) < PAGE:
                    break
                offset += len(page)
    except (requests.RequestException, OSError, ValueError) as exc:
        raise DataError(
            f"DICOMweb service at {parts.scheme}://{parts.netloc}{parts.path} could not be searched "
            f"({type(exc).__name__}); check the URL (it should end at the DICOMweb root, e.g. /dicom-web), "
            "the network and the credentials"
        ) from None
    wanted: dict[str, tuple[str, str, str]] = {}
    for study, series, sop in found:
        if study and series and sop:
            wanted[hashlib.sha256(sop.encode()).hexdigest()[:32] + ".dcm"] = (study, series, sop)
    for stale in spool.glob("*.dcm"):
        if stale.name not in wanted:
            stale.unlink()
    fetched, failed = 0, []
    for name, (study, series, sop) in sorted(wanted.items()):
        target = spool / name
        if target.is_file():
            make_owner_only(target)  # fetched by an earlier version, which left instances readable by all
            continue
        try:
            ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
            atomic_write_bytes(target, dataset_bytes(ds))
            fetched += 1
        except Exception as exc:
            failed.append(f"retrieve failed ({type(exc).__name__}); the instance is skipped this time")
    return SpoolResult(folder=spool, listed=len(found), fetched=fetched, failed=failed)
