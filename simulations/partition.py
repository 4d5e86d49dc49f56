"""Seeded non-IID splits of a dataset into hospitals, and per-site scanner differences.

Partitions: ``iid``, ``dirichlet:ALPHA`` (label skew: each class's records spread over sites by
Dirichlet(ALPHA) proportions), ``quantity:ALPHA`` (site sizes by Dirichlet(ALPHA) shares,
labels IID). The validation split is divided with the same proportions, so each site validates
on data like its own. Scanner shift gives each site its own gamma, contrast, brightness,
blur and noise, mimicking different equipment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from common.errors import DataError

KINDS = ("iid", "dirichlet", "quantity")
MIN_TRAIN_PER_SITE = 10
MAX_DRAWS = 200


@dataclass(frozen=True)
class PartitionSpec:
    """How records are divided among sites."""

    kind: str
    alpha: float | None = None

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"

    @classmethod
    def parse(cls, text: str) -> tuple[PartitionSpec | None, list[str]]:
        """Parse ``iid``, ``dirichlet:A`` or ``quantity:A``; returns the spec or the problems."""
        kind, _, arg = text.strip().lower().partition(":")
        if kind not in KINDS:
            return None, [f"--partition {text!r}: unknown kind; use iid, dirichlet:ALPHA or quantity:ALPHA"]
        if kind == "iid":
            return (cls("iid"), []) if not arg else (None, [f"--partition {text!r}: iid takes no value"])
        try:
            alpha = float(arg)
        except ValueError:
            return None, [f"--partition {text!r}: {kind} needs a number, e.g. {kind}:0.5"]
        if not np.isfinite(alpha) or alpha <= 0:
            return None, [f"--partition {text!r}: alpha must be > 0 (smaller is more skewed), e.g. {kind}:0.5"]
        return cls(kind, alpha), []


@dataclass(frozen=True)
class Partition:
    """Record indices of every site for the train and validation splits."""

    train: list[np.ndarray]
    val: list[np.ndarray]


def _proportions(spec: PartitionSpec, num_classes: int, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """``(num_classes, num_sites)`` share of each class that goes to each site."""
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        return rng.dirichlet(np.full(num_sites, spec.alpha), size=num_classes)
    if spec.kind == "quantity":
        assert spec.alpha is not None
        shares = rng.dirichlet(np.full(num_sites, spec.alpha))
        return np.tile(shares, (num_classes, 1))
    return np.full((num_classes, num_sites), 1.0 / num_sites)


def _split(labels: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    num_sites = props.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(props.shape[0]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = (np.cumsum(props[c]) * len(idx)).round().astype(int)[:-1]
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def partition(
    train_key: np.ndarray,
    val_key: np.ndarray,
    num_sites: int,
    spec: PartitionSpec,
    *,
    seed: int,
    min_train: int = MIN_TRAIN_PER_SITE,
) -> Partition:
    """Divide records among ``num_sites`` sites; every site gets at least ``min_train`` training records.

    ``train_key``/``val_key`` hold one class per record (see :func:`common.datasets.stratify_key`).

    Raises
    ------
    DataError
        No draw gives every site enough records (too many sites, or alpha too small).

    """
    if num_sites < 1:
        raise DataError(f"--sites {num_sites}: need at least 1 site")
    if num_sites * min_train > len(train_key):
        raise DataError(
            f"--sites {num_sites}: {len(train_key)} training records cannot give each site "
            f"{min_train}; use at most {len(train_key) // min_train} sites"
        )
    num_classes = int(max(train_key.max(), val_key.max() if len(val_key) else 0)) + 1
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        props = _proportions(spec, num_classes, num_sites, rng)
        train = _split(train_key, props, rng)
        if min(len(t) for t in train) >= min_train:
            return Partition(train=train, val=_split(val_key, props, rng))
    raise DataError(
        f"--partition {spec} with --sites {num_sites}: no draw in {MAX_DRAWS} gave every site "
        f"{min_train} training records; use fewer sites or a larger alpha"
    )


def label_counts(keys: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(num_sites, num_classes)`` record counts per site and class."""
    return np.stack([np.bincount(keys[p], minlength=num_classes) for p in parts])


# ---------------------------------------------------------------- scanner shift
@dataclass(frozen=True)
class ScannerProfile:
    """A site's imaging-equipment signature, applied to intensities in [0, 1]."""

    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def scanner_profiles(num_sites: int, *, strength: float, seed: int) -> list[ScannerProfile]:
    """One seeded profile per site; ``strength`` 0 gives identical scanners, 1 strong differences."""
    if strength <= 0:
        return [ScannerProfile() for _ in range(num_sites)]
    rng = np.random.default_rng(seed + 7919)
    out = []
    for _ in range(num_sites):
        out.append(
            ScannerProfile(
                gamma=float(np.exp(rng.uniform(-0.35, 0.35) * strength)),
                contrast=float(1 + rng.uniform(-0.25, 0.25) * strength),
                brightness=float(rng.uniform(-0.08, 0.08) * strength),
                blur_sigma=float(rng.uniform(0.0, 0.9) * strength),
                noise_sigma=float(rng.uniform(0.0, 0.04) * strength),
            )
        )
    return out


def apply_scanner(images: np.ndarray, profile: ScannerProfile, *, channels_last: bool, seed: int) -> np.ndarray:
    """uint8 images as acquired by ``profile``'s equipment (uint8 out)."""
    if profile == ScannerProfile():
        return images
    x = images.astype(np.float32) / 255.0
    if profile.blur_sigma > 0:
        sigma = [0.0] + [profile.blur_sigma] * (x.ndim - 1 - int(channels_last)) + [0.0] * int(channels_last)
        x = gaussian_filter(x, sigma=sigma)
    x = np.power(np.clip(x, 0, 1), profile.gamma)
    x = (x - 0.5) * profile.contrast + 0.5 + profile.brightness
    if profile.noise_sigma > 0:
        x = x + np.random.default_rng(seed).normal(0, profile.noise_sigma, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
