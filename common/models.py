"""Classification and segmentation networks chosen by name, all with GroupNorm so Opacus can train them.

BatchNorm mixes records of a batch, which per-record DP-SGD cannot account for; GroupNorm
normalises each record on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.datasets import DatasetInfo, Task
from common.recipes import auto_model
from common.scattering import Scattering2D
from common.unet import UNet


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


class MirrorInvariant(nn.Module):
    """``(f(x) + f(mirror(x))) / 2`` for a parameter-free ``f``: features that a left-right mirror leaves unchanged.

    A linear model on them gives an image and its mirror image the same score. Half of the linear
    model's weight space then no longer changes any output, and under DP-SGD the noise in that half
    is harmless (see :class:`ScatNet`).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def extra_repr(self) -> str:
        return "mean over the image and its left-right mirror"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``f`` of ``x`` and of ``x`` mirrored along its last (width) axis, averaged."""
        return 0.5 * (self.inner(x) + self.inner(torch.flip(x, dims=[-1])))


class _MirrorHead(nn.Module):
    """Grad-CAM head of a mirror-invariant :class:`ScatNet` (see :func:`split_for_cam`)."""

    def __init__(self, head: nn.Module, channels: int) -> None:
        super().__init__()
        self.head = head
        self.channels = channels

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits from ``[f(x), mirror(f(mirror(x)))]``: the second half is mirrored back before averaging."""
        own, mirrored = maps[:, : self.channels], torch.flip(maps[:, self.channels :], dims=[-1])
        return self.head(torch.flatten(0.5 * (own + mirrored), 1))


class _MirrorBody(nn.Module):
    """Grad-CAM body of a mirror-invariant :class:`ScatNet`: both views' maps, in the image's own coordinates."""

    def __init__(self, front: nn.Module) -> None:
        super().__init__()
        self.front = front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[f(x), mirror(f(mirror(x)))]`` along the channels, every map aligned with ``x``."""
        return torch.cat([self.front(x), torch.flip(self.front(torch.flip(x, dims=[-1])), dims=[-1])], dim=1)


class ScatNet(nn.Module):
    """Linear classifier on fixed wavelet-scattering features (Tramèr & Boneh, ICLR 2021).

    :class:`common.scattering.Scattering2D` (``J=2``, 8 orientations: 81 channels per image channel at
    a quarter of the resolution) is not trained, then a parameter-free GroupNorm and one linear layer.
    With a few hundred records per site, learning the features end to end under DP-SGD drowns them in
    noise; here a site's privacy budget is spent on about 4,000 weights of a convex model instead.

    ``mirror=True`` (model ``scatnet-mirror``) averages the features of the image and of its left-right
    mirror (:class:`MirrorInvariant`), for tasks whose label does not depend on left and right (a breast
    lesion in ultrasound, a fundus photograph). The model then has about half as many effective
    weights: under DP-SGD the same noise lands on the other half, where it changes no output.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, *, J: int = 2, L: int = 8, side: int = 7, mirror: bool = False
    ) -> None:
        super().__init__()
        self.scattering = Scattering2D(J=J, L=L)
        channels = in_channels * self.scattering.channels
        groups = channels // 3 if channels % 3 == 0 else channels
        self.norm = nn.GroupNorm(groups, channels, affine=False)  # 3 scattering channels per group
        self.pool = nn.AdaptiveAvgPool2d(side)  # the head's size does not depend on the image size
        self.head = nn.Linear(channels * side * side, num_outputs)
        self.channels = channels
        self.mirror = mirror

    def maps(self) -> nn.Sequential:
        """Normalised scattering maps of one view ``(N, C * scattering channels, side, side)`` (81 per channel)."""
        return nn.Sequential(self.scattering, self.norm, self.pool)

    def front(self) -> nn.Module:
        """The fixed, parameter-free part: :meth:`maps`, mirror-averaged when ``mirror``."""
        return MirrorInvariant(self.maps()) if self.mirror else self.maps()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the linear layer sees: :meth:`front` of ``x``."""
        return self.front()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        return self.head(torch.flatten(self.features(x), 1))


class ScatCNN(nn.Module):
    """Small CNN on fixed wavelet-scattering maps (Tramèr & Boneh's ScatterNet + CNN, ICLR 2021).

    The scattering maps of :class:`ScatNet` (81 per image channel at a quarter of the resolution,
    normalised without parameters), then two 3x3 convolutions of ``width`` channels with GroupNorm
    and tanh, global average pooling and a linear layer: about 33k weights for one image channel.
    With a few thousand records, the convolutions combine the fixed edge and texture features into
    shapes, and DP-SGD trains only them; on PneumoniaMNIST it beats the compact CNN under DP.
    """

    def __init__(self, in_channels: int, num_outputs: int, *, J: int = 2, L: int = 8, width: int = 32,
                 mirror: bool = False) -> None:
        super().__init__()
        self.mirror = mirror
        self.scattering = Scattering2D(J=J, L=L)
        channels = in_channels * self.scattering.channels
        groups = channels // 3 if channels % 3 == 0 else channels
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), _norm(width), nn.Tanh(),
            nn.Conv2d(width, width, 3, padding=1), _norm(width), nn.Tanh(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        maps = self.norm(self.scattering(x))
        if self.mirror:  # as front(): the maps averaged with the mirror image's
            maps = 0.5 * (maps + self.norm(self.scattering(torch.flip(x, dims=[-1]))))
        return self.head(torch.flatten(self.pool(self.features(maps)), 1))

    def front(self) -> nn.Module:
        """The fixed, parameter-free part: scattering and normalisation, mirror-averaged when ``mirror``."""
        maps = nn.Sequential(self.scattering, self.norm)
        return MirrorInvariant(maps) if self.mirror else maps


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
    """ResNet-18 with a 3x3 stem and no max-pool (made for 28-pixel inputs), 2D or 3D, GroupNorm.

    Any input side trains (adaptive average pooling before the head): 64, 128 or 224 pixels keep the same
    weights and cost about ``(side / 28) ** 2`` times as much per image.
    """

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


class CoarseLinear3D(nn.Module):
    """Linear classifier on a volume averaged over a coarse ``grid`` x ``grid`` x ``grid`` lattice (3D, fixed features).

    The 3D counterpart of :class:`ScatNet`: a fixed, parameter-free front (:class:`CoarseCells`: each cell's
    mean intensity, 0 where a cell is all background, times ``gain``) and one linear layer, ``grid ** 3 + 1``
    weights per output for one channel. A few hundred volumes per site cannot train a 3D CNN's tens of
    thousands of weights under DP-SGD; here the budget is spent on a convex model of how much of each region
    the organ fills. The compact 3D CNN normalises every map per record, so that cue reaches its head only
    weakly, with a sign its initialisation sets.

    The intercept is the weight of a constant input ``bias_gain`` (:class:`_Intercept`) rather than a plain
    bias. On an imbalanced task the first steps pull every logit down towards the majority class; with a
    plain bias most of that pull runs through the ``grid ** 3`` cell weights (Adam moves each weight by about
    the learning rate per step), so it lowers most the logits of the volumes with the most foreground, which
    inverts the ranking where the minority class is the larger organ (AdrenalMNIST3D's hyperplasia), and
    DP-SGD's few noised steps per round do not get past it. With the intercept ``bias_gain`` times as fast,
    it takes up that shift and the cell weights learn the contrast. ``gain`` scales the features so that a
    step of the cell weights moves the logits about as much as one of the intercept.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, *, grid: int = 4, gain: float = 16.0, bias_gain: float = 16.0
    ) -> None:
        super().__init__()
        self.front = CoarseCells(grid, gain)
        self.head = nn.Sequential(nn.Flatten(1), _Intercept(bias_gain),
                                  nn.Linear(in_channels * grid**3 + 1, num_outputs, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_outputs)``."""
        return self.head(self.front(x))


class CoarseCells(nn.Module):
    """Each cell's mean of a ``grid``-cubed lattice, plus 1 (0 where a cell is all -1, the darkest intensity).

    Parameter-free and per record: ``(N, C, D, H, W)`` to ``(N, C, grid, grid, grid)``.
    """

    def __init__(self, grid: int, gain: float = 1.0) -> None:
        super().__init__()
        self.grid = grid
        self.gain = gain

    def extra_repr(self) -> str:
        return f"grid={self.grid}, gain={self.gain}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, grid, grid, grid)``."""
        d, h, w = x.shape[2], x.shape[3], x.shape[4]
        if d % self.grid == 0 and h % self.grid == 0 and w % self.grid == 0:  # a plain average pool (ONNX has it)
            kernel = [d // self.grid, h // self.grid, w // self.grid]
            pooled = nn.functional.avg_pool3d(x, kernel, kernel)
        else:
            pooled = nn.functional.adaptive_avg_pool3d(x, self.grid)
        return self.gain * (pooled + 1.0)


class _Intercept(nn.Module):
    """Appends a constant feature ``value`` to ``(N, F)``: the next linear layer's intercept, ``value`` x as fast."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def extra_repr(self) -> str:
        return f"value={self.value}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F + 1)``."""
        return torch.cat([x, x.new_full((x.shape[0], 1), self.value)], dim=1)


@dataclass(frozen=True)
class ModelSpec:
    """A model family by name: which input dimensionality it takes and how to build it.

    ``sizes`` are the input sides it trains at (empty: any, through adaptive pooling); the scattering models'
    fixed wavelets (``J=2``) and 7x7 head were chosen for 28-pixel images.
    """

    dims: int
    build: Callable[[int, int], nn.Module]
    description: str
    segmentation: bool = False
    sizes: tuple[int, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(2, lambda c, k: CompactCNN(c, k, dims=2), "compact 2D CNN, ~24k parameters"),
    "cnn-3d": ModelSpec(3, lambda c, k: CompactCNN(c, k, dims=3), "compact 3D CNN"),
    "coarse-3d": ModelSpec(3, lambda c, k: CoarseLinear3D(c, k), "linear model on the volume averaged over a "
                           "4x4x4 grid, 65 parameters per output (default for 3D classification under DP-SGD)"),
    "scatnet": ModelSpec(2, lambda c, k: ScatNet(c, k), "linear model on fixed 2D wavelet-scattering features, "
                         "~4k parameters per output (default for small 2D datasets without DP)", sizes=(28,)),
    "scatnet-mirror": ModelSpec(2, lambda c, k: ScatNet(c, k, mirror=True), "scatnet on features averaged with "
                                "the left-right mirror image's (default for small 2D datasets under DP-SGD)",
                                sizes=(28,)),
    "scatcnn": ModelSpec(2, lambda c, k: ScatCNN(c, k), "small CNN on fixed 2D wavelet-scattering maps, ~33k",
                         sizes=(28,)),
    "scatcnn-mirror": ModelSpec(2, lambda c, k: ScatCNN(c, k, mirror=True), "scatcnn on maps averaged with the "
                                "left-right mirror image's", sizes=(28,)),
    "resnet18": ModelSpec(2, lambda c, k: ResNet18(c, k, dims=2), "ResNet-18, 2D, GroupNorm, 11M"),
    "resnet18-small": ModelSpec(2, lambda c, k: ResNet18(c, k, dims=2, width=16), "ResNet-18 width 16, 2D"),
    "resnet18-3d": ModelSpec(3, lambda c, k: ResNet18(c, k, dims=3, width=32), "ResNet-18, 3D, GroupNorm"),
    "unet2d": ModelSpec(3, lambda c, k: UNet(c, k, slice_wise=True, width=8), "2D U-Net applied slice-wise, ~30k",
                        segmentation=True),
    "unet3d": ModelSpec(3, lambda c, k: UNet(c, k, slice_wise=False, width=8), "3D U-Net, ~89k",
                        segmentation=True),
}


def resolve_model_name(name: str, info: DatasetInfo) -> str:
    """``auto`` becomes the model the dataset's recipe trains (:func:`common.recipes.auto_model`)."""
    return auto_model(info) if name == "auto" else name


def model_problems(name: str, info: DatasetInfo) -> list[str]:
    """Reasons ``name`` cannot train on ``info`` (unknown, 2D/3D mismatch, or not at ``info.size`` pixels)."""
    resolved = resolve_model_name(name, info)
    spec = MODELS.get(resolved)
    if spec is None:
        return [f"model={name!r} is unknown; use auto or one of: {', '.join(sorted(MODELS))}"]
    segmentation = info.task is Task.SEGMENTATION
    if spec.segmentation != segmentation:
        fitting = [n for n, s in MODELS.items() if s.segmentation == segmentation and s.dims == info.spatial_dims]
        kind = "segmentation" if spec.segmentation else "classification"
        return [
            f"model={name!r} is a {kind} model but {info.name} is a {info.task.value} dataset; "
            f"use auto or one of: {', '.join(fitting)}"
        ]
    if spec.dims != info.spatial_dims:
        fitting = [n for n, s in MODELS.items() if s.dims == info.spatial_dims and not s.segmentation]
        return [
            f"model={name!r} is {spec.dims}D but {info.name} is {info.spatial_dims}D; "
            f"use auto or one of: {', '.join(fitting)}"
        ]
    if spec.sizes and info.size not in spec.sizes:
        fitting = [n for n, s in MODELS.items()
                   if s.dims == info.spatial_dims and not s.segmentation and (not s.sizes or info.size in s.sizes)]
        chosen = f"model={name!r}" if name == resolved else f"model={name!r} ({resolved} for {info.name})"
        return [
            f"{chosen} trains at {', '.join(str(z) for z in spec.sizes)} pixels only, not at resolution={info.size}; "
            f"use one of: {', '.join(fitting)} (the ResNet-18 models are made for larger images), or resolution=0"
        ]
    return []


def build_model(name: str, info: DatasetInfo, *, seed: int | None = None) -> nn.Module:
    """Instantiate model ``name`` for dataset ``info``; ``seed`` gives identical initial weights.

    The seed drives only the weights' initialisation, in a forked generator: torch's global generator is left as
    it was, so a run config's ``seed`` can never reach any other randomness of the process that builds the model.
    """
    problems = model_problems(name, info)
    if problems:
        raise ValueError(problems[0])
    spec = MODELS[resolve_model_name(name, info)]
    if seed is None:
        return spec.build(info.channels, info.num_outputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(info.channels, info.num_outputs)


def split_for_cam(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, head)`` with ``model(x) == head(body(x))``; ``body`` ends with the last convolution block.

    Grad-CAM weighs the body's output channels by the gradient of a class score.
    """
    if isinstance(model, CompactCNN):
        return model.features, nn.Sequential(model.pool, nn.Flatten(1), model.head)
    if isinstance(model, ScatNet) and model.mirror:
        # Both views' maps in the image's coordinates, so the heatmap shows where in *this* image the evidence is.
        return _MirrorBody(model.maps()), _MirrorHead(model.head, model.channels)
    if isinstance(model, ScatNet):
        return model.maps(), nn.Sequential(nn.Flatten(1), model.head)
    if isinstance(model, ScatCNN):
        # mirror: the maps averaged with the mirror image's, so the heatmap is symmetric (evidence on either side)
        return nn.Sequential(model.front(), model.features), nn.Sequential(model.pool, nn.Flatten(1), model.head)
    if isinstance(model, ResNet18):
        return nn.Sequential(model.stem, model.layers), nn.Sequential(model.pool, nn.Flatten(1), model.head)
    if isinstance(model, CoarseLinear3D):  # the grid of cells is the "last block": a coarse heatmap
        return model.front, model.head
    raise ValueError(f"{type(model).__name__} has no known last convolution block; use one of {', '.join(MODELS)}")


def fixed_front(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(front, trainable)`` with ``model(x) == trainable(front(x))`` when ``model`` starts with fixed features.

    ``front`` has no parameters and treats each record on its own (scattering, then a GroupNorm without
    affine weights), so its output can be computed once per record and training can run on it: the
    trainable part sees the same inputs, gradients and per-record clipping as it would inside the whole
    model. ``None`` for models that learn from the first layer. The modules share the model's
    parameters: training ``trainable`` trains ``model``.
    """
    if isinstance(model, ScatNet):
        return model.front(), nn.Sequential(nn.Flatten(1), model.head)
    if isinstance(model, ScatCNN):
        return model.front(), nn.Sequential(model.features, model.pool, nn.Flatten(1), model.head)
    if isinstance(model, CoarseLinear3D):
        return model.front, model.head
    return None


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
