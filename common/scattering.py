"""Fixed wavelet-scattering features for small images (Mallat 2012; Bruna & Mallat 2013).

A second-order scattering transform cascades fixed complex Morlet wavelet filters and a modulus,
then averages with a Gaussian low-pass and subsamples. None of it is learned, so it costs a site
no privacy budget and has no weights to send: a differentially private model built on it learns
only a small head on stable, translation-insensitive edge and texture features. This is the
"better features" recipe of Tramèr & Boneh (ICLR 2021), which beats end-to-end CNNs under DP-SGD
when data are scarce.

The filters are applied as ordinary spatial convolutions (reflect padding), so the module runs on
CPU and GPU alike, traces into ONNX and works with Grad-CAM.
"""

# No ``from __future__ import annotations`` here: TorchScript (``medsilo export``) reads the buffers'
# class-level annotations below and needs them as types, not strings.
import math

import torch
from torch import nn
from torch.nn import functional as F


def gabor_kernel(*, size: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """Complex Gabor filter ``(size, size)``: an oriented Gaussian envelope times a plane wave.

    Parameters
    ----------
    size
        Odd side length in pixels, centred on the origin.
    sigma
        Envelope width along the wave direction, in pixels.
    theta
        Orientation of the wave in radians.
    xi
        Spatial frequency in radians per pixel (0: a Gaussian).
    slant
        Envelope elongation across the wave (``< 1`` stretches it along the wave's crests).

    """
    half = size // 2
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    along = x * math.cos(theta) + y * math.sin(theta)
    across = -x * math.sin(theta) + y * math.cos(theta)
    envelope = torch.exp(-(along**2 + (slant * across) ** 2) / (2 * sigma**2))
    return envelope * torch.exp(1j * xi * along) * slant / (2 * math.pi * sigma**2)


def morlet_kernel(*, size: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """Complex Morlet filter: a Gabor filter minus the multiple of its envelope that makes its mean zero."""
    gabor = gabor_kernel(size=size, sigma=sigma, theta=theta, xi=xi, slant=slant)
    envelope = gabor_kernel(size=size, sigma=sigma, theta=theta, xi=0.0, slant=slant)
    return gabor - envelope * (gabor.sum() / envelope.sum())


def scattering_channels(*, J: int, L: int) -> int:
    """Output channels per input channel: 1 zeroth-order, ``J*L`` first-order, ``L²·J(J-1)/2`` second-order."""
    return 1 + J * L + L * L * J * (J - 1) // 2


class Scattering2D(nn.Module):
    """Second-order 2D scattering transform with ``J`` scales and ``L`` orientations.

    Input ``(N, C, H, W)``; output ``(N, C * scattering_channels(J, L), ceil(H / 2**J), ceil(W / 2**J))``.
    The filters are non-persistent buffers: they follow the module across devices but are not part of
    the ``state_dict``, so they are never sent, averaged or checkpointed.

    Parameters
    ----------
    J
        Number of dyadic scales; the output is averaged over ``2**J`` pixels and subsampled by it.
    L
        Number of orientations in ``[0, π)``.

    """

    psi: torch.Tensor
    phi: torch.Tensor

    def __init__(self, J: int = 2, L: int = 8) -> None:
        super().__init__()
        if J < 1 or L < 1:
            raise ValueError(f"received J={J}, L={L}; scattering needs J >= 1 scale and L >= 1 orientation")
        self.J, self.L = J, L
        self.stride: int = 2**J
        slant = 4.0 / L
        # Each scale's kernel covers 3 envelope widths across the wave; all are zero-padded to the largest,
        # so the bank is one (J, 2L, 1, S, S) buffer of (real, imaginary) pairs.
        sizes = [2 * math.ceil(3 * 0.8 * 2**j / min(slant, 1.0)) + 1 for j in range(J)]
        side = max(sizes)
        bank = torch.zeros(J, L, 2, side, side, dtype=torch.float64)
        for j, size in enumerate(sizes):
            start = (side - size) // 2
            for k in range(L):
                psi = morlet_kernel(size=size, sigma=0.8 * 2**j, theta=math.pi * k / L, xi=0.75 * math.pi / 2**j,
                                    slant=slant)
                bank[j, k, 0, start:start + size, start:start + size] = psi.real
                bank[j, k, 1, start:start + size, start:start + size] = psi.imag
        self.register_buffer("psi", bank.reshape(J, 2 * L, 1, side, side).float(), persistent=False)
        sigma_phi = 0.8 * 2 ** (J - 1)
        size_phi = 2 * math.ceil(3 * sigma_phi) + 1
        phi = gabor_kernel(size=size_phi, sigma=sigma_phi, theta=0.0, xi=0.0, slant=1.0).real
        self.register_buffer("phi", (phi / phi.sum()).reshape(1, 1, size_phi, size_phi).float(), persistent=False)

    def extra_repr(self) -> str:
        """``J`` and ``L``: with the image, they determine the output (the filters are derived from them)."""
        return f"J={self.J}, L={self.L}"

    @property
    def channels(self) -> int:
        """Output channels per input channel."""
        return scattering_channels(J=self.J, L=self.L)

    def _wavelet_modulus(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """``|x * ψ_{j,θ}|`` for every orientation θ: ``(M, 1, H, W)`` to ``(M, L, H, W)``."""
        psi = self.psi[j]
        pad = psi.shape[-1] // 2
        out = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), psi)  # (M, 2L, H, W): re, im pairs
        out = out.unflatten(1, (self.L, 2))
        return torch.sqrt(out.pow(2).sum(2) + 1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients, orders 0, 1 and 2 stacked along the channel axis per input channel."""
        n, c, h, w = x.shape
        reach = max(self.psi.shape[-1], self.phi.shape[-1]) // 2  # reflect padding needs more pixels than this
        if min(h, w) <= reach:
            raise ValueError(f"received {h}x{w} images; J={self.J} needs images larger than "
                             f"{reach} pixels per side; use a smaller J")
        flat = x.reshape(n * c, 1, h, w)
        orders = [flat]
        first = [self._wavelet_modulus(flat, j) for j in range(self.J)]
        orders += first
        for j1 in range(self.J):
            for j2 in range(j1 + 1, self.J):
                u1 = first[j1].reshape(n * c * self.L, 1, h, w)
                orders.append(self._wavelet_modulus(u1, j2).reshape(n * c, self.L * self.L, h, w))
        u = torch.cat(orders, dim=1)  # (N*C, K, H, W)
        k = u.shape[1]
        pad = self.phi.shape[-1] // 2
        low = F.conv2d(F.pad(u.reshape(n * c * k, 1, h, w), (pad, pad, pad, pad), mode="reflect"), self.phi,
                       stride=self.stride)
        return low.reshape(n, c * k, low.shape[-2], low.shape[-1])
