"""A hospital's DICOM archive -> preprocessed training tensors, decoded once and cached.

Every file found ends either ingested or rejected with a reason (count in = ingested + rejected).
Files are decoded in worker processes with a time limit, so a decoder that hangs or crashes on
one file costs that file, never the node. Results are cached per site in ``cache_dir`` (a
memory-mapped array plus an index), keyed by each file's SHA-256 and the preprocessing settings:
later epochs, rounds and runs read the cache; a changed file or changed settings decode again.

The cache index holds UIDs and paths: it lives in the node's state folder and never leaves it. The cache
folders are ``0700`` and its files ``0600``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.dicom import Image, Rejected, read_image
from client.preprocessing import Preprocessing, assemble_volume, to_model_input
from common.errors import DataError
from common.io import atomic_write_bytes, atomic_write_json, private_dir

CACHE_VERSION = 1
_TIMEOUT = "decoding did not finish within"
_OOM = "decoding ran out of memory"
TRANSIENT = (_TIMEOUT, _OOM)
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FileFacts:
    """Header facts of one decodable file (kept on the node)."""

    path: str
    sha256: str
    modality: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_key: str
    positions: tuple[float, ...]
    instance_number: int
    phi: tuple[str, ...]
    burned_in_annotation: bool


@dataclass(frozen=True)
class Unit:
    """One training record: an image (2D tasks) or an assembled series (3D tasks)."""

    key: str
    row: int
    files: tuple[str, ...]
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_key: str
    modality: str


@dataclass
class Ingested:
    """What the archive yielded: ``images[i]`` is the record described by ``units[i]``."""

    images: np.ndarray
    units: list[Unit]
    files: list[FileFacts]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0  # files decoded in this call (0 when everything came from the cache)

    @property
    def files_in(self) -> int:
        """Files found."""
        return len(self.files) + len(self.rejected)


def find_files(root: str | Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), in a stable order.

    Raises
    ------
    DataError
        When ``root`` does not exist.

    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"DICOM source {root} is neither a file nor a folder; check --data")
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


def file_sha256(path: Path) -> str:
    """Content hash of one file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK * 16):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ workers
def _decode(path: str, settings: Preprocessing) -> tuple[str, Any]:
    """Worker: one file -> ("ok", (facts-dict, pixels)) or ("rejected", reason). Never raises."""
    try:
        if not os.path.isfile(path):
            return "rejected", "not a regular file; remove it from the DICOM folder"
        image: Image = read_image(path, limits=settings.limits, window=settings.window)
        h = image.header
        if settings.modalities and h.modality not in settings.modalities:
            return "rejected", (
                f"modality {h.modality} is not one this task uses ({', '.join(settings.modalities)}); "
                "move the file out of the training folder or pass --modality"
            )
        pixels = to_model_input(image.pixels, settings)
        facts = {
            "modality": h.modality, "transfer_syntax": h.transfer_syntax, "rows": h.rows, "columns": h.columns,
            "frames": h.frames, "study_uid": h.study_uid, "series_uid": h.series_uid, "sop_uid": h.sop_uid,
            "patient_key": h.patient_key, "positions": list(h.positions), "instance_number": h.instance_number,
            "phi": list(h.phi), "burned_in_annotation": h.burned_in_annotation,
        }
        return "ok", (facts, pixels)
    except Rejected as exc:
        return "rejected", exc.reason
    except MemoryError:
        return "rejected", f"{_OOM}; the image is too large for this node"
    except Exception as exc:
        return "rejected", f"preprocessing failed ({type(exc).__name__}); report this file to medsilo's maintainers"


class _Decoder:
    """A pool of worker processes with a time limit per file; a hung or crashed worker costs one file."""

    def __init__(self, settings: Preprocessing, workers: int, timeout_s: float) -> None:
        self.settings = settings
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")  # no fork of a process that may hold torch/Ray threads
        self._pool: Any = None

    def start(self) -> None:
        """Start the workers now, once (they import their modules while the caller does other work)."""
        if self._pool is None:
            self._start(self.workers)

    def _start(self, n: int) -> Any:
        if self._pool is None:
            self._pool = self._ctx.Pool(n)
        return self._pool

    def _kill(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def run(self, paths: Sequence[str]) -> dict[str, tuple[str, Any]]:
        """Decode ``paths``; a file that exceeds the time limit (hang, crash) is rejected alone."""
        results: dict[str, tuple[str, Any]] = {}
        batch = self.workers * 16
        for start in range(0, len(paths), batch):
            chunk = list(paths[start : start + batch])
            pool = self._start(self.workers)
            pending = [(p, pool.apply_async(_decode, (p, self.settings))) for p in chunk]
            deadline = time.monotonic() + self.timeout_s * math.ceil(len(chunk) / self.workers)
            stuck = []
            for p, res in pending:
                try:
                    results[p] = res.get(timeout=max(0.0, deadline - time.monotonic()))
                except mp.TimeoutError:
                    stuck.append(p)
            if stuck:
                self._kill()
                for p in stuck:  # one at a time, so the culprit is known
                    single = self._start(1)
                    try:
                        results[p] = single.apply_async(_decode, (p, self.settings)).get(timeout=self.timeout_s)
                    except mp.TimeoutError:
                        self._kill()
                        results[p] = (
                            "rejected",
                            f"{_TIMEOUT} {self.timeout_s:g} s (a hung or crashed decoder); "
                            "transcode the file or raise the time limit",
                        )
                self._kill()
        return results


# ------------------------------------------------------------------------------------------ cache
class Cache:
    """Preprocessed records of one site for one preprocessing setting (``cache_dir/<settings key>/``)."""

    def __init__(self, cache_dir: str | Path, settings: Preprocessing) -> None:
        self.dir = Path(cache_dir) / settings.key()
        self.settings = settings
        self.index: dict[str, Any] = {"version": CACHE_VERSION, "settings": settings.describe(),
                                      "stat": {}, "files": {}, "units": {}}
        self.images: np.ndarray | None = None
        path = self.dir / "index.json"
        if path.is_file():
            try:
                index = json.loads(path.read_text())
                images = np.load(self.dir / "images.npy", mmap_mode="r") \
                    if (self.dir / "images.npy").is_file() else None
                rows = images.shape[0] if images is not None else 0
                if index.get("version") == CACHE_VERSION and index.get("rows", -1) == rows:
                    self.index, self.images = index, images
            except (OSError, ValueError):
                pass  # a damaged cache is rebuilt, never trusted

    def _private(self) -> None:
        """The cache folder and its settings folder, owner-only (created or tightened): they hold patient data."""
        private_dir(self.dir.parent)
        private_dir(self.dir)

    def memo_sha(self, path: Path, st: os.stat_result) -> str | None:
        """The file's hash from the stat memo when size, mtime and inode are unchanged, else ``None``."""
        memo = self.index["stat"].get(str(path))
        if memo and memo[0] == st.st_size and memo[1] == st.st_mtime_ns and memo[2] == st.st_ino:
            return str(memo[3])
        return None

    def hash(self, path: Path, st: os.stat_result) -> str:
        """Hash the file and remember it under its stat."""
        sha = file_sha256(path)
        self.index["stat"][str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino, sha]
        return sha

    def save(
        self, images: np.ndarray, units: dict[str, Any], files: dict[str, Any], stat: dict[str, Any]
    ) -> np.ndarray:
        """Write the array, then the index that points into it; return the array memory-mapped.

        A crash between the two writes leaves an index whose rows no longer match: the row count is
        checked on load and such a cache is rebuilt.
        """
        self._private()
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        atomic_write_bytes(self.dir / "images.npy", buf.getvalue())
        self.images = np.load(self.dir / "images.npy", mmap_mode="r")
        self.save_index(units, files, stat)
        return self.images

    def save_index(self, units: dict[str, Any], files: dict[str, Any], stat: dict[str, Any]) -> None:
        """Write the index atomically."""
        self._private()
        rows = self.images.shape[0] if self.images is not None else 0
        self.index = {"version": CACHE_VERSION, "settings": self.settings.describe(), "rows": rows,
                      "stat": stat, "files": files, "units": units}
        atomic_write_json(self.dir / "index.json", self.index)


# ------------------------------------------------------------------------------------------ ingest
def _unit_key(shas: Iterable[str]) -> str:
    return hashlib.sha256("|".join(sorted(shas)).encode()).hexdigest()


def ingest(
    source: str | Path | Sequence[Path],
    settings: Preprocessing,
    *,
    cache_dir: str | Path,
    workers: int | None = None,
    timeout_s: float = 60.0,
    exclude: Iterable[str | Path] = (),
) -> Ingested:
    """Decode and preprocess every file of ``source`` once; later calls read the cache.

    Parameters
    ----------
    source
        A folder (walked recursively), one file, or a list of files.
    settings
        Model input and display settings; part of the cache key.
    cache_dir
        The node's cache folder (inside its state folder).
    workers
        Decoder processes (default: CPUs, at most 8).
    timeout_s
        Time limit for one file.
    exclude
        Files that are not part of the archive (e.g. its ``labels.csv``).

    """
    paths = find_files(source) if isinstance(source, (str, Path)) else [Path(p) for p in source]
    skip = {Path(p).resolve() for p in exclude}
    paths = [p for p in paths if p.resolve() not in skip] if skip else paths
    cache = Cache(cache_dir, settings)
    old_files: dict[str, Any] = cache.index["files"]
    old_units: dict[str, Any] = cache.index["units"]
    n_workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    decoder = _Decoder(settings, min(n_workers, max(1, len(paths))), timeout_s)
    try:
        rejected: list[tuple[str, str]] = []
        shas: dict[str, str] = {}
        for path in paths:
            try:
                if path.is_file():
                    st = path.stat()
                    sha = cache.memo_sha(path, st)
                    if sha is None:
                        decoder.start()  # workers start up while the remaining files are hashed
                        sha = cache.hash(path, st)
                    shas[str(path)] = sha
                else:
                    rejected.append((str(path), "not a regular file; remove it from the DICOM folder"))
            except OSError as exc:
                rejected.append((str(path), f"unreadable ({type(exc).__name__}); check the file's permissions"))
        todo = sorted(p for p, sha in shas.items() if sha not in old_files)
        decoded = decoder.run(todo)
        if settings.spatial_dims == 3:
            # a series is assembled from all its slices: when its membership changed (its unit key is not
            # cached), the unchanged slices are decoded again too
            facts = {p: (decoded[p][1][0] if p in decoded and decoded[p][0] == "ok" else old_files.get(sha, {}))
                     for p, sha in shas.items()}
            series: dict[str, list[str]] = {}
            for p, f in facts.items():
                if f and "reason" not in f:
                    series.setdefault(f["series_uid"] or shas[p], []).append(p)
            again = [p for members in series.values() if _unit_key(shas[m] for m in members) not in old_units
                     for p in members if p not in decoded]
            decoded.update(decoder.run(sorted(again)))
    finally:
        decoder.close()
    return _assemble(cache, shas, decoded, rejected, settings)


def _assemble(
    cache: Cache,
    shas: dict[str, str],
    decoded: dict[str, tuple[str, Any]],
    rejected: list[tuple[str, str]],
    settings: Preprocessing,
) -> Ingested:
    old_files: dict[str, Any] = cache.index["files"]
    old_units: dict[str, Any] = cache.index["units"]
    files: dict[str, Any] = {}
    pixels_by_path: dict[str, np.ndarray] = {}
    for p, sha in shas.items():
        if p in decoded:
            status, payload = decoded[p]
            if status == "ok":
                facts, pix = payload
                files[sha] = facts
                pixels_by_path[p] = pix
            else:
                files[sha] = {"reason": payload}
        else:
            files[sha] = dict(old_files[sha])
    # group into units
    groups: dict[str, list[str]] = {}
    for p, sha in shas.items():
        f = files[sha]
        if "reason" in f:
            continue
        key = sha if settings.spatial_dims == 2 else f"series:{f['series_uid'] or sha}"
        groups.setdefault(key, []).append(p)
    units_out: dict[str, Any] = {}
    new_rows: list[np.ndarray] = []
    row_source: list[tuple[str, int]] = []  # ("old", row) or ("new", index)
    unit_list: list[Unit] = []
    for members in groups.values():
        member_shas = [shas[p] for p in members]
        ukey = _unit_key(member_shas)
        first = files[member_shas[0]]
        if ukey in old_units:
            entry = dict(old_units[ukey])
        else:
            try:
                if settings.spatial_dims == 2:
                    arr = pixels_by_path[members[0]]
                else:
                    arr = assemble_volume(
                        [(files[shas[p]]["positions"], files[shas[p]]["instance_number"], pixels_by_path[p])
                         for p in members],
                        settings,
                    )
                entry = {"new": len(new_rows)}
                new_rows.append(arr)
            except Rejected as exc:
                entry = {"reason": exc.reason}
            except KeyError:
                entry = {"reason": "series members changed while reading; run the check again"}
        entry["files"] = sorted(members)
        units_out[ukey] = entry
        for sha in member_shas:
            files[sha]["unit"] = ukey
        if "reason" in entry:
            rejected.extend((p, entry["reason"]) for p in members)
            continue
        if "new" in entry:
            row_source.append(("new", entry.pop("new")))
        else:
            row_source.append(("old", int(entry["row"])))
        entry["row"] = len(row_source) - 1
        unit_list.append(
            Unit(key=ukey, row=entry["row"], files=tuple(sorted(members)), study_uid=first["study_uid"],
                 series_uid=first["series_uid"], sop_uid=first["sop_uid"] if settings.spatial_dims == 2 else "",
                 patient_key=first["patient_key"], modality=first["modality"])
        )
    for p, sha in shas.items():
        if "reason" in files[sha]:
            rejected.append((p, files[sha]["reason"]))
    # A time-out or an out-of-memory may not happen next time: such files are not remembered as rejected.
    kept = {sha: f for sha, f in files.items() if not str(f.get("reason", "")).startswith(TRANSIENT)}
    stat = {p: v for p, v in cache.index["stat"].items() if p in shas and shas[p] in kept}
    if not new_rows and cache.images is not None and \
            [r for _, r in row_source] == list(range(cache.images.shape[0])):
        images = cache.images
        if kept != cache.index["files"] or units_out != cache.index["units"] or stat != cache.index["stat"]:
            cache.save_index(units_out, kept, stat)
    else:
        images = np.empty((len(row_source), *settings.record_shape()), dtype=np.uint8)
        for i, (kind, r) in enumerate(row_source):
            images[i] = cache.images[r] if kind == "old" and cache.images is not None else new_rows[r]
        images = cache.save(images, units_out, kept, stat)
    facts = [
        _facts(p, sha, files[sha])
        for p, sha in shas.items() if "reason" not in files[sha] and "reason" not in units_out.get(
            files[sha].get("unit", ""), {})
    ]
    rejected.sort()
    return Ingested(images=images, units=unit_list, files=facts, rejected=rejected,
                    decoded=sum(1 for p in decoded if p in shas))


def _facts(path: str, sha: str, f: dict[str, Any]) -> FileFacts:
    return FileFacts(
        path=path, sha256=sha, modality=str(f["modality"]), transfer_syntax=str(f["transfer_syntax"]),
        rows=int(f["rows"]), columns=int(f["columns"]), frames=int(f["frames"]), study_uid=str(f["study_uid"]),
        series_uid=str(f["series_uid"]), sop_uid=str(f["sop_uid"]), patient_key=str(f["patient_key"]),
        positions=tuple(float(v) for v in f["positions"]), instance_number=int(f["instance_number"]),
        phi=tuple(str(v) for v in f["phi"]), burned_in_annotation=bool(f["burned_in_annotation"]),
    )


def summary_of(ingested: Ingested) -> dict[str, Any]:
    """Counts for a site report (no UID, path or per-image value)."""
    def count(values: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))

    return {
        "files": ingested.files_in,
        "ingested_files": len(ingested.files),
        "rejected_files": len(ingested.rejected),
        "records": len(ingested.units),
        "modalities": count(f.modality for f in ingested.files),
        "transfer_syntaxes": count(f.transfer_syntax for f in ingested.files),
        "image_sizes": count(
            f"{f.rows}x{f.columns}" + (f"x{f.frames}" if f.frames > 1 else "") for f in ingested.files
        ),
    }
