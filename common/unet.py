"""The segmentation networks: U-Net over patient volumes, 2D (slice-wise) and 3D, with GroupNorm.

Every trainable layer is a convolution or GroupNorm, so Opacus's per-sample gradients of a volume are a
patient's gradient. Built by name through :data:`common.models.MODELS`.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class SliceGroupNorm(nn.Module):
    """GroupNorm of every slice on its own (``(N, C, D, H, W)``, statistics over channels-group x H x W).

    Parameter-free: Opacus computes per-sample gradients only for trainable layers, and a per-slice
    affine would see slices, not patients, as samples. The following convolution learns the scale.
    """

    def __init__(self, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reductions on a view (no transposes), so gradients stay contiguous for Opacus's expanded weights.
        n, c, d, h, w = x.shape
        grouped = x.view(n, self.num_groups, c // self.num_groups, d, h, w)
        mean = grouped.mean(dim=(2, 4, 5), keepdim=True)
        var = grouped.var(dim=(2, 4, 5), keepdim=True, unbiased=False)
        return ((grouped - mean) / torch.sqrt(var + self.eps)).view(n, c, d, h, w)


class _UNetBlock(nn.Sequential):
    """Two convolutions, each followed by GroupNorm and ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int, int], padding: tuple[int, int, int], slice_wise: bool
    ) -> None:
        def norm() -> nn.Module:
            return SliceGroupNorm(min(8, cout)) if slice_wise else _norm(cout)

        super().__init__(
            nn.Conv3d(cin, cout, kernel, padding=padding), norm(), nn.ReLU(),
            nn.Conv3d(cout, cout, kernel, padding=padding), norm(), nn.ReLU(),
        )


class UNet(nn.Module):
    """U-Net over whole volumes ``(N, C, D, H, W)``, one record per patient volume.

    ``slice_wise=True`` is the 2D U-Net: every kernel, pooling and normalisation acts within a slice
    (1 x k x k kernels, :class:`SliceGroupNorm`), so each slice along D is segmented from its own pixels
    and any subset of a patient's slices can be trained on. Keeping the patient's slices together as
    one record (rather than reshaping slices into the batch) is what makes Opacus's per-sample
    gradient a per-patient gradient.
    ``slice_wise=False`` is the 3D U-Net (3 x 3 x 3 kernels, pooling in all three axes).
    Upsampling is parameter-free (nearest neighbour) so every trainable layer is a convolution or
    GroupNorm, both supported by Opacus's per-sample gradients. Spatial sizes must be divisible by
    ``2 ** (depth - 1)`` along the pooled axes (the dataset's padded shape guarantees it).

    The input carries each voxel's coordinates as extra channels (CoordConv): which part of an organ a
    voxel belongs to (the hippocampus's head or its body and tail) depends on where it is, which a
    translation-equivariant network otherwise has to infer from context alone; the volumes are centred, so
    position is informative. Only the slice-wise model gets them: it trains on whole slices, so in-plane
    coordinates mean the same in training and inference, whereas a 3D patch's coordinates would not.
    The coordinates also reach the 1x1 head directly, beside the decoder's features: the boundary between
    the anterior and posterior hippocampus is then a handful of head weights away rather than a function
    the whole network must learn. Under patient-level DP-SGD this is what lets the posterior class be
    learned at all (measured: 4 sites, ε=8, posterior Dice 0.0 without it, 0.57 with it).
    The head's logits are multiplied by a fixed ``logit_scale``: every feature map is normalised, so
    only the head's weights set how confident the voxel-wise softmax can be, and Adam moves each weight
    by about the learning rate per step; without the scale the model needed hundreds of steps before
    its probabilities sharpened, and under FedAvg a class could vanish from the arg-max (measured).
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, slice_wise: bool, width: int = 16, depth: int = 3,
        logit_scale: float = 4.0,
    ) -> None:
        super().__init__()
        kernel, padding = ((1, 3, 3), (0, 1, 1)) if slice_wise else ((3, 3, 3), (1, 1, 1))
        self.scale = (1, 2, 2) if slice_wise else (2, 2, 2)
        widths = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        self.coordinates = 2 if slice_wise else 0
        cin = in_channels + self.coordinates
        for w in widths:
            self.down.append(_UNetBlock(cin, w, kernel, padding, slice_wise))
            cin = w
        self.up = nn.ModuleList(
            _UNetBlock(widths[i + 1] + widths[i], widths[i], kernel, padding, slice_wise)
            for i in reversed(range(depth - 1))
        )
        self.pool = nn.MaxPool3d(self.scale)
        self.head = nn.Conv3d(widths[0] + self.coordinates, num_classes, 1)
        self.logit_scale = logit_scale

    def _with_coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Append in-plane voxel coordinates in [-1, 1] as channels (slice-wise model only)."""
        if not self.coordinates:
            return x
        axes = x.shape[2:][-self.coordinates :]
        grids = torch.meshgrid(*[torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in axes],
                               indexing="ij")
        coords = torch.stack(grids)  # (coordinates, *axes)
        coords = coords.view(1, self.coordinates, *([1] * (x.ndim - 2 - len(axes))), *axes)
        coords = coords.expand(x.shape[0], self.coordinates, *x.shape[2:])
        return torch.cat([x, coords], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel logits ``(N, num_classes, D, H, W)``."""
        x = self._with_coordinates(x)
        coordinates = x[:, x.shape[1] - self.coordinates :]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([nn.functional.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1))
        return self.head(torch.cat([x, coordinates], dim=1) if self.coordinates else x) * self.logit_scale
