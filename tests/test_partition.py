from __future__ import annotations

import math
import os

import numpy as np
import pytest

from common.errors import DataError
from simulations.partition import (
    PartitionSpec,
    ScannerProfile,
    apply_scanner,
    label_counts,
    partition,
    scanner_profiles,
)
from simulations.runner import actor_layout, worker_pythonpath


def _labels(n: int = 2000, classes: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "quantity:1.0"])
def test_every_record_goes_to_exactly_one_site(spec: str) -> None:
    # Prepare
    train, val = _labels(), _labels(300, seed=1)
    parsed, problems = PartitionSpec.parse(spec)
    assert parsed is not None and not problems
    # Execute
    parts = partition(train, val, 5, parsed, seed=3)
    # Assert
    for keys, split in ((train, parts.train), (val, parts.val)):
        joined = np.concatenate(split)
        assert len(joined) == len(keys)
        assert len(np.unique(joined)) == len(keys)
    assert min(len(t) for t in parts.train) >= 10


def test_same_seed_same_split_and_other_seed_differs() -> None:
    train, val = _labels(), _labels(300, seed=1)
    spec = PartitionSpec("dirichlet", 0.5)
    a = partition(train, val, 4, spec, seed=7)
    b = partition(train, val, 4, spec, seed=7)
    c = partition(train, val, 4, spec, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))


def _mean_label_entropy(alpha: float) -> float:
    train, val = _labels(6000, classes=4), _labels(300, classes=4, seed=1)
    ents = []
    for seed in range(5):
        parts = partition(train, val, 5, PartitionSpec("dirichlet", alpha), seed=seed)
        counts = label_counts(train, parts.train, 4).astype(float)
        p = counts / counts.sum(axis=1, keepdims=True)
        ents.append(float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1))))
    return float(np.mean(ents))


def test_smaller_alpha_gives_more_label_skew() -> None:
    skewed, mild, near_iid = _mean_label_entropy(0.1), _mean_label_entropy(1.0), _mean_label_entropy(100.0)
    assert skewed < mild < near_iid
    assert near_iid > 0.95 * np.log(4)


def test_validation_split_follows_the_sites_label_mix() -> None:
    train, val = _labels(6000, classes=2), _labels(3000, classes=2, seed=1)
    parts = partition(train, val, 4, PartitionSpec("dirichlet", 0.3), seed=0)
    tr = label_counts(train, parts.train, 2)
    va = label_counts(val, parts.val, 2)
    share_tr = tr[:, 1] / tr.sum(axis=1)
    share_va = va[:, 1] / np.maximum(va.sum(axis=1), 1)
    assert np.allclose(share_tr, share_va, atol=0.08)


def test_quantity_skew_varies_sizes_but_not_label_mix() -> None:
    train, val = _labels(6000, classes=2), _labels(600, classes=2, seed=1)
    parts = partition(train, val, 5, PartitionSpec("quantity", 0.5), seed=2)
    sizes = np.array([len(t) for t in parts.train])
    assert sizes.max() > 2 * sizes.min()
    counts = label_counts(train, parts.train, 2)
    assert np.allclose(counts[:, 1] / counts.sum(axis=1), 0.5, atol=0.1)


def test_too_many_sites_is_refused_with_the_limit() -> None:
    train, val = _labels(100), _labels(20)
    with pytest.raises(DataError, match="use at most 10 sites"):
        partition(train, val, 11, PartitionSpec("iid"), seed=0)


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:-1", "dirichlet:x", "zipf:2", "iid:3"])
def test_bad_partition_specs_are_explained(text: str) -> None:
    spec, problems = PartitionSpec.parse(text)
    assert spec is None
    assert len(problems) == 1 and "--partition" in problems[0]


def test_scanner_profiles_are_seeded_and_change_images() -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    p1 = scanner_profiles(3, strength=1.0, seed=5)
    p2 = scanner_profiles(3, strength=1.0, seed=5)
    assert p1 == p2 and len(set(p1)) == 3
    shifted = apply_scanner(images, p1[0], channels_last=False, seed=0)
    assert shifted.dtype == np.uint8 and shifted.shape == images.shape
    assert not np.array_equal(shifted, images)
    assert np.array_equal(apply_scanner(images, p1[0], channels_last=False, seed=0), shifted)
    assert scanner_profiles(2, strength=0.0, seed=5) == [ScannerProfile(), ScannerProfile()]
    assert apply_scanner(images, ScannerProfile(), channels_last=False, seed=0) is images


@pytest.mark.parametrize(
    ("sites", "cpus", "actors", "length"),
    [
        (3, 2, 3, 1.5),  # one wave of three time-shared actors, not 2 + 1 with an idle core
        (5, 2, 5, 2.5),  # the demo: 5 sites on 2 cores
        (4, 2, 2, 2.0),  # divides evenly: one actor per core, as before
        (1, 2, 1, 1.0),
        (3, 16, 3, 1.0),
    ],
)
def test_simulated_sites_keep_every_core_busy(sites: int, cpus: int, actors: int, length: float) -> None:
    # Execute
    count, share = actor_layout(sites=sites, cpus=cpus)

    # Assert: Flower starts int(cpus / share) actors; a round lasts ceil(sites / A) waves of max(A, cpus) / cpus
    assert count == actors
    assert min(int(cpus / share), sites) == actors
    assert math.ceil(sites / count) * max(count, cpus) / cpus == length
    with pytest.raises(ValueError, match="sites=0"):
        actor_layout(sites=0, cpus=2)


def test_worker_path_is_absolute_deduplicated_and_keeps_the_inherited_one(tmp_path, monkeypatch) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    # Execute
    path = worker_pythonpath(["", "lib", str(tmp_path), "/opt/x"], "/inherited")
    # Assert: "" is the working folder, relative entries are resolved against it, each entry once, inherited last
    assert path.split(os.pathsep) == [str(tmp_path), str(tmp_path / "lib"), "/opt/x", "/inherited"]
    assert worker_pythonpath(["/a"], None) == "/a"
