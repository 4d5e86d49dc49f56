"""Fixed features of a site's records: computed once, then read from the site's own disk.

A model on fixed features (:func:`common.models.fixed_front`) trains and validates on what its
parameter-free front computes from each record. For the same records and the same front that is the
same every round, so a node keeps it in a :class:`FeatureCache` in its state folder: later rounds (Flower
builds a new ClientApp for every message, in a new process when deployed) and later runs with the same
front read the features instead of computing them again. Wavelet scattering costs about 4 ms per image
channel on one core, so a site of 1,000 images saves about 4 s of CPU per round.

The cache holds values derived from patient images: it lives in the node's state folder, beside the
DICOM cache and the privacy ledger, and nothing in it is ever sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.io import atomic_write_bytes, private_dir

log = logging.getLogger(__name__)

#: The feature cache's folder in a node's state folder.
CACHE_FOLDER = "feature-cache"

#: Default size limit of a node's feature cache; the least recently used files go first beyond it.
CACHE_BYTES = 2 * 1024**3


@torch.no_grad()
def precompute(front: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``front`` applied to every record of ``x`` (on ``device``, returned on the CPU), in batches."""
    front.eval()
    return torch.cat([front(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


def fingerprint(front: nn.Module, x: torch.Tensor) -> str:
    """Names the features of ``x`` by ``front``: SHA-256 of the front's description and response and the records.

    The description is the front's ``repr`` (its modules and their settings, e.g. the scattering's J and
    L); the response is its output for a fixed probe record, to float16 precision, so that a changed
    implementation behind the same settings (other filters after an upgrade, say) names other features
    instead of reusing stale ones. A changed record gives another name too.
    """
    digest = hashlib.sha256()
    digest.update(repr(front).encode())
    digest.update(_response(front, x))
    digest.update(f"{tuple(x.shape)} {x.dtype}".encode())
    digest.update(x.detach().cpu().contiguous().numpy().data)
    return digest.hexdigest()


@torch.no_grad()
def _response(front: nn.Module, x: torch.Tensor) -> bytes:
    """``front``'s output for a seeded random record shaped like those of ``x``, rounded to float16."""
    probe = torch.rand((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).to(x.dtype)
    where = next(iter(front.buffers()), probe).device
    front.eval()
    return bytes(front(probe.to(where)).cpu().to(torch.float16).numpy().data)


class FeatureCache:
    """A node's fixed features, one ``.npy`` file per record set and front, in ``folder``.

    Parameters
    ----------
    folder
        The cache folder, inside the node's state folder (created on first write).
    max_bytes
        Size limit: after each write the least recently read files are removed until the
        cache fits (the file just written always stays).

    Files are written atomically and read without pickle; a file that cannot be read, or whose
    shape does not match its records, is computed again and replaced.

    """

    def __init__(self, folder: str | Path, *, max_bytes: int = CACHE_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def features(self, front: nn.Module, x: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """``front``'s features of every record of ``x`` on the CPU, from the cache or computed and kept."""
        path = self.folder / f"{fingerprint(front, x)}.npy"
        cached = self._read(path, records=x.shape[0])
        if cached is not None:
            return cached
        out = precompute(front, x, device=device)
        buffer = io.BytesIO()
        np.save(buffer, out.numpy(), allow_pickle=False)
        try:
            private_dir(self.folder)  # derived from patient images: owner-only folder and files
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a full or read-only disk costs the next round the computation, nothing else
            log.warning("feature cache %s not written (%s); features will be computed again", self.folder,
                        exc.strerror or type(exc).__name__)
            return out
        self._prune(keep=path)
        return out

    def _read(self, path: Path, *, records: int) -> torch.Tensor | None:
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            log.warning("feature cache file %s is damaged; computing its features again", path.name)
            return None
        if array.dtype != np.float32 or array.ndim < 2 or array.shape[0] != records:
            log.warning("feature cache file %s does not match its records; computing its features again", path.name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        return torch.from_numpy(array)

    def _prune(self, *, keep: Path) -> None:
        files = []
        for path in self.folder.glob("*.npy"):
            try:
                stat = path.stat()
            except OSError:  # removed by another process meanwhile
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
