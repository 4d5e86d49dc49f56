"""PRIVACY-CRITICAL: where the randomness of a site's DP mechanisms comes from.

DP-SGD's guarantee assumes the coordinator can neither know nor choose the noise and the Poisson sample. A
generator seeded from the run config (seed, round, partition: all the coordinator's) lets a coordinator replay a
round on D and on D ∪ {x} and compare with the reply, which tells membership with certainty whatever ε says.

- :func:`os_entropy`, the default everywhere and the only mode a deployed node has: every generator is seeded
  afresh from the operating system's entropy (``os.urandom``, 128 bits per generator), per round and purpose.
- :func:`reproducible`, for research only: generators derived from a seed, so a simulation can be rerun bit for
  bit. Only :mod:`simulations` builds a client with it (a ClientApp of its own, never the node's); the run's
  ``summary.json`` and report name the mode.

Noise drawn from these generators goes through Opacus's floating-point protection
(:func:`secure_gaussian`, Opacus's ``secure_mode`` noise: Holohan & Braghin 2021), see :mod:`client.dp.sgd` and
:mod:`client.dp.release`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

#: The two modes, as replies, ``summary.json`` and the report name them.
OS_ENTROPY = "os-entropy"
REPRODUCIBLE = "reproducible-research"

#: What a generator is for: each purpose of each round gets its own stream.
PURPOSES = ("sampling", "noise", "augment", "count", "validation", "patches")


@dataclass(frozen=True)
class Randomness:
    """A source of generators for one site's mechanisms.

    Attributes
    ----------
    mode
        :data:`OS_ENTROPY` or :data:`REPRODUCIBLE`.
    seed
        The research seed (``None`` in :data:`OS_ENTROPY` mode: nothing to know or choose).

    """

    mode: str
    seed: int | None = None

    def _entropy(self, purpose: str, server_round: int) -> int:
        if purpose not in PURPOSES:
            raise ValueError(f"randomness purpose {purpose!r} is unknown; expected one of {PURPOSES}")
        if self.seed is None:
            return int.from_bytes(os.urandom(16), "little")
        material = f"medsilo|{self.seed}|{server_round}|{purpose}".encode()
        return int.from_bytes(hashlib.sha256(material).digest()[:16], "little")

    def seed_int(self, purpose: str, *, server_round: int) -> int:
        """A 63-bit seed for code that takes an integer seed (segmentation patches, plain training's shuffles)."""
        return self._entropy(purpose, server_round) % 2**63

    def torch_generator(self, purpose: str, *, server_round: int,
                        device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh torch generator for ``purpose`` in ``server_round`` (on ``device``)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self._entropy(purpose, server_round) % 2**64)  # torch seeds take 64 bits
        return gen

    def numpy_generator(self, purpose: str, *, server_round: int) -> np.random.Generator:
        """A fresh numpy generator (PCG64, 128-bit seed) for ``purpose`` in ``server_round``."""
        return np.random.Generator(np.random.PCG64(self._entropy(purpose, server_round)))


def os_entropy() -> Randomness:
    """Generators seeded from ``os.urandom``: what every node uses (simulated or deployed) unless told otherwise."""
    return Randomness(OS_ENTROPY)


def reproducible(*, seed: int, site: int) -> Randomness:
    """Generators derived from ``seed`` and the simulated ``site``: bit-for-bit reruns, for research only."""
    return Randomness(REPRODUCIBLE, seed=int(seed) * 100_003 + int(site))


def secure_gaussian(shape: tuple[int, ...], *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """N(0, σ²) noise drawn as Opacus's ``secure_mode`` draws it: the sum of four draws of σ, halved.

    One draw's floating-point representation can leak the value it was added to (Mironov 2012; Jin et al.
    2022); a sum of several draws closes that channel (Holohan & Braghin 2021, section 5.1, n = 2).
    """
    if sigma < 0:
        raise ValueError(f"noise σ={sigma}: expected σ >= 0")
    if sigma == 0:
        return np.zeros(shape)
    return rng.normal(0.0, sigma, size=(4, *shape)).sum(axis=0) / 2
