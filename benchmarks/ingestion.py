"""DICOM ingestion benchmarks: medsilo's first pass against a bare pydicom loop, and the cache.

- ingest_ratio: images/s through ``client.ingest.ingest`` (first pass: hash, decode, display pipeline,
  resize, cache write; default workers) / images/s of a bare ``dcmread`` + ``pixel_array`` loop on the
  same files. ``ingest_ratio_1worker`` is the same with a single decoder process.
- cache_speedup: epoch read time when decoding (medsilo's first pass) / epoch read time from the cache
  (second pass: stat, index, memory-mapped records read in full).

Run as its own process (``bench.py`` starts it): decoder workers are spawned processes, which re-import
the main module, and the product's main modules (``medsilo``, a SuperNode's ClientApp process) are light,
unlike ``bench.py`` with torch and Opacus loaded.

The archive is PneumoniaMNIST written by ``simulations.archive`` at a realistic matrix (448 x 448,
12/16-bit) over four sites, so four transfer syntaxes (explicit, JPEG 2000, RLE, JPEG-LS) are mixed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pydicom

from client.ingest import find_files, ingest
from client.preprocessing import Preprocessing
from common.datasets import load
from simulations.archive import write_archive


def _bare(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        _ = ds.pixel_array
    return time.perf_counter() - t


def _medsilo(files: list[Path], cache: Path, settings: Preprocessing, workers: int | None) -> tuple[float, int]:
    t = time.perf_counter()
    result = ingest(files, settings, cache_dir=cache, workers=workers)
    return time.perf_counter() - t, result.decoded


def _cached(files: list[Path], cache: Path, settings: Preprocessing) -> tuple[float, int]:
    t = time.perf_counter()
    result = ingest(files, settings, cache_dir=cache)
    checksum = int(np.asarray(result.images, dtype=np.uint64).sum())  # read every record
    return time.perf_counter() - t, checksum + result.decoded * 0


def ingest_ratio(per_site: int = 250, sites: int = 4, upsample: int = 16, repeats: int = 2) -> dict:
    """Both loops on the same archive, alternated ``repeats`` times; medians."""
    data = load("pneumoniamnist")
    info = data.info
    settings = Preprocessing.for_dataset(info.name, size=info.size, channels=info.channels,
                                         spatial_dims=info.spatial_dims)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for s in range(sites):
            sl = slice(s * per_site, (s + 1) * per_site)
            write_archive(root / "archive" / f"site-{s}", data.train.images[sl], data.train.labels[sl], info,
                          site=s, seed=0, upsample=upsample, codecs=("explicit", "jpeg2000", "rle", "jpeg-ls"))
        folder = root / "archive"
        files = [f for f in find_files(folder) if f.suffix == ".dcm"]
        labels = [f for f in find_files(folder) if f.suffix != ".dcm"]
        _bare(files[:8])  # warm the page cache and the decoders
        bare, ours, ours1, cached = [], [], [], []
        for r in range(repeats):
            bare.append(_bare(files))
            t, decoded = _medsilo(files, root / f"cache-{r}", settings, None)
            assert decoded == len(files), "every file decoded on the first pass"
            ours.append(t)
            ours1.append(_medsilo(files, root / f"cache1-{r}", settings, 1)[0])
            cached.append(_cached(files, root / f"cache-{r}", settings)[0])
        b, m, m1, c = (statistics.median(v) for v in (bare, ours, ours1, cached))
    n = len(files)
    return {
        "ingest_ratio": (n / m) / (n / b), "ingest_ratio_1worker": (n / m1) / (n / b),
        "ingest_images_per_s": n / m, "bare_images_per_s": n / b, "ingest_files": n,
        "ingest_matrix": 28 * upsample, "ingest_label_files_skipped": len(labels),
        "cache_speedup": m / c, "cache_epoch_s": c, "decode_epoch_s": m,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True, help="write the results here")
    out = ingest_ratio()
    Path(parser.parse_args().json).write_text(json.dumps(out))
