"""Classification networks chosen by name, all with GroupNorm so Opacus can train them.

BatchNorm mixes records of a batch, which per-record DP-SGD cannot account for; GroupNorm
normalises each record on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.datasets import DatasetInfo


def _conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class CompactCNN(nn.Module):
    """Small three-convolution network (about 24k parameters in 2D).

    Few parameters keep DP-SGD's noise per parameter low and the per-record gradients cheap;
    pooling early keeps the per-sample gradient work at low resolution.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, dims: int = 2, width: int = 16, act: type[nn.Module] = nn.Tanh
    ) -> None:
        super().__init__()
        conv = _conv(dims)
        pool = nn.MaxPool3d(2) if dims == 3 else nn.MaxPool2d(2)
        w = width
        self.features = nn.Sequential(
            conv(in_channels, w, 3, padding=1), _norm(w), act(), pool,
            conv(w, 2 * w, 3, padding=1), _norm(2 * w), act(), pool,
            conv(2 * w, 4 * w, 3, padding=1), _norm(4 * w), act(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dims: int) -> None:
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 28-pixel inputs (3x3 stem, no max-pool), 2D or 3D, GroupNorm."""

    def __init__(self, in_channels: int, num_outputs: int, dims: int = 2, width: int = 64) -> None:
        super().__init__()
        conv = _conv(dims)
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1, bias=False), _norm(width), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            blocks += [_BasicBlock(cin, cout, stride, dims), _BasicBlock(cout, cout, 1, dims)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@dataclass(frozen=True)
class ModelSpec:
    """A model family by name: which input dimensionality it takes and how to build it."""

    dims: int
    build: Callable[[int, int], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(2, lambda c, k: CompactCNN(c, k, dims=2), "compact 2D CNN, ~24k parameters"),
    "cnn-3d": ModelSpec(3, lambda c, k: CompactCNN(c, k, dims=3), "compact 3D CNN"),
    "resnet18": ModelSpec(2, lambda c, k: ResNet18(c, k, dims=2), "ResNet-18, 2D, GroupNorm, 11M"),
    "resnet18-small": ModelSpec(2, lambda c, k: ResNet18(c, k, dims=2, width=16), "ResNet-18 width 16, 2D"),
    "resnet18-3d": ModelSpec(3, lambda c, k: ResNet18(c, k, dims=3, width=32), "ResNet-18, 3D, GroupNorm"),
}


def resolve_model_name(name: str, info: DatasetInfo) -> str:
    """``auto`` becomes the compact CNN of the dataset's dimensionality."""
    if name == "auto":
        return "cnn-3d" if info.spatial_dims == 3 else "cnn"
    return name


def model_problems(name: str, info: DatasetInfo) -> list[str]:
    """Reasons ``name`` cannot train on ``info`` (unknown, or 2D/3D mismatch)."""
    resolved = resolve_model_name(name, info)
    spec = MODELS.get(resolved)
    if spec is None:
        return [f"model={name!r} is unknown; use auto or one of: {', '.join(sorted(MODELS))}"]
    if spec.dims != info.spatial_dims:
        fitting = [n for n, s in MODELS.items() if s.dims == info.spatial_dims]
        return [
            f"model={name!r} is {spec.dims}D but {info.name} is {info.spatial_dims}D; "
            f"use auto or one of: {', '.join(fitting)}"
        ]
    return []


def build_model(name: str, info: DatasetInfo, *, seed: int | None = None) -> nn.Module:
    """Instantiate model ``name`` for dataset ``info`` (seeded for identical initial weights)."""
    problems = model_problems(name, info)
    if problems:
        raise ValueError(problems[0])
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[resolve_model_name(name, info)].build(info.channels, info.num_outputs)


def split_for_cam(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, head)`` with ``model(x) == head(body(x))``; ``body`` ends with the last convolution block.

    Grad-CAM weighs the body's output channels by the gradient of a class score.
    """
    if isinstance(model, CompactCNN):
        return model.features, nn.Sequential(model.pool, nn.Flatten(1), model.head)
    if isinstance(model, ResNet18):
        return nn.Sequential(model.stem, model.layers), nn.Sequential(model.pool, nn.Flatten(1), model.head)
    raise ValueError(f"{type(model).__name__} has no known last convolution block; use one of {', '.join(MODELS)}")


class ExplainableModel(nn.Module):
    """A model as exported: ``head(body(x))``, ``body`` ending with the last convolution block.

    Scriptable (TorchScript keeps both submodules), so an exported model can still be explained by Grad-CAM.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.body, self.head = split_for_cam(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        return self.head(self.body(x))
