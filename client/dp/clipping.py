"""Per-record clipped gradients for DP-SGD in one backward pass ("book-keeping").

DP-SGD needs, for every step, the sum over the batch of each record's gradient clipped to norm ``C``:
``sum_b c_b * grad(loss_b)`` with ``c_b = min(1, C / (||grad(loss_b)|| + 1e-6))``, exactly Opacus's
flat clipping. Opacus computes it by materialising every record's gradient of every layer (hooks or
expanded weights), or by its ghost clipping, which runs backward twice. :class:`PerRecordClipper` runs
backward once, to the layers' outputs only (no weight gradients), then per layer:

1. each record's squared gradient norm, from the layer's input ``a`` and output gradient ``g``
   (Bu et al., "Differentially private optimization on large model at small cost", ICML 2023):

   - linear layer on ``(N, d)``: ``||g_b||^2 * ||a_b||^2`` (plus ``||g_b||^2`` for the bias);
   - convolution: either the record's gradient itself (one grouped weight-gradient convolution with the
     batch folded into the groups; Opacus unfolds the input instead), or, when it is cheaper, without it:
     ``||G_b||^2 = <g_b^T g_b, U_b^T U_b>`` over output positions, where the Gram matrix of the unfolded
     input ``U_b^T U_b`` is a sum of shifted copies of the input's channel Gram matrix. On small maps with
     many channels (the CNN on 81 scattering maps at 7 x 7 that PneumoniaMNIST trains) that is several
     times fewer operations;
   - GroupNorm's affine weights: the per-record sums over positions, which are small;

2. the clipping factors ``c_b`` from the records' total norms;
3. each layer's clipped sum: the weight gradient of the output gradient scaled by ``c_b`` (one
   ordinary weight-gradient product, as a plain step computes), or ``sum_b c_b G_b`` where the
   record's gradient ``G_b`` was materialised anyway.

Noise, the Poisson sampling and the accountant stay Opacus's: :class:`NoisingOptimizer` is Opacus's
``DPOptimizerFastGradientClipping``, which noises the clipped sum this module leaves in ``p.grad``, and
it refuses a step whose gradient :meth:`PerRecordClipper.backward` did not produce (fail closed). The
result equals Opacus's clipped sum (checked against its hooks in the tests) for any loss that averages
over the batch, as Opacus assumes.

Supported trainable layers: :class:`torch.nn.Linear`, :class:`torch.nn.Conv2d` (zero padding, no groups)
and :class:`torch.nn.GroupNorm`, each called once per forward. :func:`unsupported_layers` says which
layers of a model rule it out; medsilo then keeps Opacus's expanded weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.nn.grad import conv2d_weight
from torch.utils.data import Dataset
from torch.utils.hooks import RemovableHandle

#: A layer's clipped sums as a function of the clipping factors: ``(parameter, sum_b c_b G_b)`` pairs.
_ClippedSum = Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]

#: Opacus's flat clipping: ``C / (norm + 1e-6)``, at most 1.
_NORM_EPS = 1e-6


def _own_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _conv_unsupported(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


def unsupported_layers(module: nn.Module) -> list[str]:
    """Names of the layers with trainable weights that :class:`PerRecordClipper` cannot clip (empty: all can).

    Parameters
    ----------
    module
        The model to train.

    Returns
    -------
    list of str
        ``"name (Type[, reason])"`` for every such layer.

    """
    found = []
    for name, layer in module.named_modules():
        if not _own_trainable(layer):
            continue
        label = name or type(layer).__name__
        if type(layer) is nn.Conv2d:
            reason = _conv_unsupported(layer)
            if reason is not None:
                found.append(f"{label} (Conv2d, {reason})")
        elif type(layer) not in (nn.Linear, nn.GroupNorm):  # exact types: a subclass may compute otherwise
            found.append(f"{label} ({type(layer).__name__})")
    return found


@dataclass
class _Call:
    """What one forward call of a layer left for the backward pass."""

    inputs: torch.Tensor
    output: torch.Tensor


def _trained(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The layer's ``weight`` and ``bias``, each ``None`` when it is absent or frozen."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    return (weight if isinstance(weight, nn.Parameter) and weight.requires_grad else None,
            bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None)


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The padding of a supported convolution (never a string there: see :func:`_conv_unsupported`)."""
    ph, pw = cast(tuple[int, int], conv.padding)
    return int(ph), int(pw)


def _gram_cheaper(conv: nn.Conv2d, inputs: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the Gram route costs fewer multiply-adds per record than materialising the gradient."""
    channels, height, width = inputs.shape[1:]
    ph, pw = _padding(conv)
    padded = (height + 2 * ph) * (width + 2 * pw)
    outputs, positions = grad.shape[1], grad.shape[2] * grad.shape[3]
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    gram = (height * width) ** 2 * channels + padded**2 + positions**2 * (outputs + kernel)
    return gram < positions * channels * kernel * outputs


def _per_record_conv_weight(conv: nn.Conv2d, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Every record's weight gradient of ``conv``, ``(N, out_channels, in_channels * kh * kw)``.

    One grouped weight-gradient convolution with the batch folded into the channels (record ``b`` is group
    ``b``), as in Rochette et al., "Efficient per-example gradient computations in convolutional neural
    networks" (2019): the same multiply-adds as ``unfold`` and a batched product, without materialising the
    unfolded input (``N x in_channels * kh * kw x positions``), which dominated the step at 64 pixels.
    """
    n, channels, height, width = inputs.shape
    outputs = grad.shape[1]
    per_record = conv2d_weight(
        inputs.reshape(1, n * channels, height, width), (n * outputs, channels, *conv.kernel_size),
        grad.reshape(1, n * outputs, grad.shape[2], grad.shape[3]), conv.stride, _padding(conv), conv.dilation, n,
    )
    return per_record.reshape(n, outputs, -1)


def _unfolded_gram(conv: nn.Conv2d, inputs: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Each record's Gram matrix of its unfolded input, ``U_b^T U_b`` over output positions: ``(N, T * T)``.

    ``K_b[t,u] = sum_k P_b[t*s + k*d, u*s + k*d]`` (kernel offsets ``k``, stride ``s``, dilation ``d``), with
    ``P_b`` the Gram matrix of the zero-padded input over its channels. Summed batch-last, so that the
    shifted copies are read in contiguous runs (measured faster than batch-first, and than summing
    unpadded blocks).
    """
    n, channels, height, width = inputs.shape
    ph, pw = _padding(conv)
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    oh, ow = out_hw
    flat = inputs.reshape(n, channels, height * width)
    gram = inputs.new_zeros(height + 2 * ph, width + 2 * pw, height + 2 * ph, width + 2 * pw, n)
    gram[ph : ph + height, pw : pw + width, ph : ph + height, pw : pw + width] = (
        torch.bmm(flat.transpose(1, 2), flat).permute(1, 2, 0).reshape(height, width, height, width, n)
    )
    unfolded_gram = inputs.new_zeros(oh, ow, oh, ow, n)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            unfolded_gram += gram[rows, cols, rows, cols]
    return unfolded_gram.reshape(-1, n).T


def _conv_sq_norms_gram(grad: torch.Tensor, unfolded_gram: torch.Tensor) -> torch.Tensor:
    """Per-record squared norms of a convolution's weight gradient without forming it.

    ``||G_b||^2 = sum_{t,u} (g_b^T g_b)[t,u] * K_b[t,u]`` over output positions ``t, u``, with ``K_b`` the
    record's :func:`_unfolded_gram` (rows of ``unfolded_gram``).
    """
    n, outputs = grad.shape[:2]
    g = grad.reshape(n, outputs, -1)
    grad_gram = torch.bmm(g.transpose(1, 2), g).reshape(n, -1)
    return (grad_gram * unfolded_gram).sum(1).clamp(min=0)


class IndexedRecords(Dataset):
    """Records held as tensors, served a batch at a time, remembering which records the last batch held.

    Give the loader :meth:`collate`: a batch is fetched with one indexing of each tensor
    (``__getitems__``), and the model receives exactly the tensor noted in :attr:`last_batch`. For records
    that do not change between steps (a fixed-feature model's features, :func:`common.training.
    on_fixed_features`), :class:`PerRecordClipper` computes each record's Gram matrices once and looks
    them up by :attr:`last_indices` whenever a layer's input *is* :attr:`last_batch` (the same tensor).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"received {len(inputs)} inputs and {len(targets)} targets; expected as many of each")
        self.inputs, self.targets = inputs, targets
        self.last_indices: torch.Tensor | None = None
        self.last_batch: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch as one ``(inputs, targets)`` pair (empty list for an empty batch); see :meth:`collate`."""
        if not indices:
            return []
        self.last_indices = torch.as_tensor(indices, dtype=torch.long)
        self.last_batch = self.inputs[self.last_indices]
        return [(self.last_batch, self.targets[self.last_indices])]

    @staticmethod
    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's ``collate_fn``: the pair :meth:`__getitems__` made, as it is."""
        if len(batch) != 1:
            raise ValueError(f"received {len(batch)} items to collate; expected the one batch IndexedRecords made")
        return batch[0]


class PerRecordClipper:
    """Computes DP-SGD's clipped gradient sum of ``module`` in one backward pass.

    Parameters
    ----------
    module
        The model; every layer with trainable weights must be supported (:func:`unsupported_layers`).
    max_grad_norm
        The clipping norm ``C``.
    records
        The records the loader draws from, if they do not change during the clipper's life (fixed
        features): a convolution whose input is the batch itself then looks each record's Gram matrix up
        instead of computing it at every step (:class:`IndexedRecords`).

    Examples
    --------
    >>> clipper = PerRecordClipper(model, max_grad_norm=1.0)      # doctest: +SKIP
    >>> clipper.backward(loss_fn(model(x), y))  # p.grad = sum_b c_b grad(loss_b)  # doctest: +SKIP
    >>> dp_optimizer.step()                     # Opacus adds the noise   # doctest: +SKIP
    >>> clipper.close()                                            # doctest: +SKIP

    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, records: IndexedRecords | None = None) -> None:
        unsupported = unsupported_layers(module)
        if unsupported:
            raise ValueError(
                f"per-record clipping in one pass got layers it cannot clip: {', '.join(unsupported)}; expected "
                "only Linear, Conv2d (zero padding, groups=1) and GroupNorm; train this model with Opacus's "
                "grad samplers instead"
            )
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0")
        self.max_grad_norm = float(max_grad_norm)
        self.records = records
        self._record_grams: dict[nn.Module, tuple[torch.Tensor, int]] = {}
        self.layers = [(name, m) for name, m in module.named_modules() if _own_trainable(m)]
        self._params = [p for _, m in self.layers for p in _own_trainable(m)]
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._record) for _, m in self.layers]
        self._handles.append(module.register_forward_pre_hook(self._start))
        #: True from a :meth:`backward` until the optimizer takes its gradient (:class:`NoisingOptimizer`).
        self.clipped = False

    def _start(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """A new training forward pass of the model: what an earlier one left (never backpropagated) is dropped."""
        if torch.is_grad_enabled() and module.training:
            self._calls.clear()

    def _record(self, layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and layer.training:
            self._calls.setdefault(layer, []).append(_Call(args[0].detach(), output))

    def close(self) -> None:
        """Remove the hooks: the model is a plain module again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()

    def _recorded(self) -> Iterator[tuple[nn.Module, _Call]]:
        for name, layer in self.layers:
            calls = self._calls.get(layer, [])
            if len(calls) > 1:
                raise RuntimeError(
                    f"layer {name or type(layer).__name__} ran {len(calls)} times in one forward pass; per-record "
                    "clipping in one pass needs each trainable layer once (weights shared between calls are not "
                    "supported): train this model with Opacus's grad samplers instead"
                )
            if calls:
                yield layer, calls[0]

    def backward(self, loss: torch.Tensor) -> None:
        """Set ``p.grad`` of every trainable parameter to ``sum_b c_b * grad(loss_b)``.

        Parameters
        ----------
        loss
            The batch's loss, a mean over its records (each record's loss is ``N * loss``'s share, as
            with Opacus's ``loss_reduction="mean"``), computed from the last forward pass.

        """
        self.clipped = False
        try:
            recorded = list(self._recorded())
            if not recorded:
                raise RuntimeError("backward() without a training forward pass of the model")
            n = recorded[0][1].inputs.shape[0]
            grads = torch.autograd.grad(loss * n, [call.output for _, call in recorded], allow_unused=True)
            sq_norms = torch.zeros(n, dtype=loss.dtype, device=loss.device)
            sums = []
            for (layer, call), grad in zip(recorded, grads, strict=True):
                if grad is None:  # ran, but the loss does not depend on its output: a zero gradient (below)
                    continue
                sq, clipped_sum = self._layer(layer, call.inputs, grad.detach())
                sq_norms += sq
                sums.append(clipped_sum)
            factors = (self.max_grad_norm / (sq_norms.sqrt() + _NORM_EPS)).clamp(max=1.0)
            for param in self._params:  # a layer the loss did not use: its gradient is zero
                param.grad = None
            for clipped_sum in sums:
                for tensor, grad in clipped_sum(factors):
                    tensor.grad = grad.to(tensor.dtype)
            for param in self._params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            self.clipped = True
        finally:
            self._calls.clear()

    # Each returns the per-record squared norms and a function of the clipping factors giving (param, clipped sum).
    def _layer(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _ClippedSum]:
        if isinstance(layer, nn.Linear):
            return self._linear(layer, a, g)
        if isinstance(layer, nn.Conv2d):
            return self._conv(layer, a, g)
        assert isinstance(layer, nn.GroupNorm)
        return self._group_norm(layer, a, g)

    @staticmethod
    def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _ClippedSum]:
        weight, bias = _trained(layer)
        if a.ndim == 2:
            g_sq = (g * g).sum(1)
            sq = g_sq * (a * a).sum(1) * (weight is not None) + g_sq * (bias is not None)
            per_record_weight = None
        else:  # a sequence per record: form each record's gradient
            per_record_weight = torch.einsum("n...p,n...d->npd", g, a)
            gb = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
            sq = ((per_record_weight * per_record_weight).sum((1, 2)) * (weight is not None)
                  + (gb * gb).sum(1) * (bias is not None))

        def clipped(c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            if weight is not None:
                if per_record_weight is None:
                    out.append((weight, (g * c[:, None]).T @ a))
                else:
                    out.append((weight, torch.einsum("n,npd->pd", c, per_record_weight)))
            if bias is not None:
                out.append((bias, torch.einsum("n,n...p->p", c, g)))
            return out

        return sq, clipped

    def _input_gram(self, layer: nn.Conv2d, a: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """:func:`_unfolded_gram` of the batch ``a``: looked up when ``a`` is the records' last batch, unchanged."""
        records = self.records
        batch = None if records is None else records.last_batch
        if (
            records is None or batch is None or records.last_indices is None
            or a.data_ptr() != batch.data_ptr() or a.shape != batch.shape or a.stride() != batch.stride()
            or a.dtype != batch.dtype or batch._version != 0  # written in place since it was served
        ):
            return _unfolded_gram(layer, a, out_hw)
        cached = self._record_grams.get(layer)
        if cached is None or cached[1] != records.inputs._version:  # once per round, or the records changed
            chunks = records.inputs.split(256)
            cached = torch.cat([_unfolded_gram(layer, chunk, out_hw) for chunk in chunks]), records.inputs._version
            self._record_grams[layer] = cached
        return cached[0][records.last_indices]

    def _conv(self, layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _ClippedSum]:
        n = a.shape[0]
        weight, bias = _trained(layer)
        sq = torch.zeros(n, dtype=a.dtype, device=a.device)
        per_record_weight = None
        if weight is not None:
            if _gram_cheaper(layer, a, g):
                sq = sq + _conv_sq_norms_gram(g, self._input_gram(layer, a, (g.shape[2], g.shape[3])))
            else:
                per_record_weight = _per_record_conv_weight(layer, a, g)
                sq = sq + (per_record_weight * per_record_weight).sum((1, 2))
        gb = g.sum((2, 3)) if bias is not None else None
        if gb is not None:
            sq = sq + (gb * gb).sum(1)

        def clipped(c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            if weight is not None:
                if per_record_weight is None:
                    out.append((weight, conv2d_weight(
                        a, weight.shape, g * c[:, None, None, None], layer.stride, layer.padding, layer.dilation,
                        layer.groups,
                    )))
                else:
                    out.append((weight, (c @ per_record_weight.reshape(c.shape[0], -1)).view_as(weight)))
            if bias is not None and gb is not None:
                out.append((bias, c @ gb))
            return out

        return sq, clipped

    @staticmethod
    def _group_norm(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _ClippedSum]:
        n, channels = a.shape[:2]
        weight, bias = _trained(layer)
        per_record: list[tuple[torch.Tensor, torch.Tensor]] = []
        if weight is not None:  # the layer's input normalised without its affine weights, as in its forward pass
            normalised = F.group_norm(a, layer.num_groups, eps=layer.eps)
            per_record.append((weight, (g * normalised).reshape(n, channels, -1).sum(2)))
        if bias is not None:
            per_record.append((bias, g.reshape(n, channels, -1).sum(2)))
        sq = sum(((v * v).sum(1) for _, v in per_record), torch.zeros(a.shape[0], dtype=a.dtype, device=a.device))

        def clipped(c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(p, c @ v) for p, v in per_record]

        return sq, clipped


class NoisingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for a clipped sum in ``p.grad`` (noise, scaling, accountant hook), fed by ``clipper``.

    A step whose gradient ``clipper`` did not produce since the last step (a plain ``loss.backward()``,
    say) is refused: noising an unclipped gradient would void the privacy guarantee without a sign.
    Opacus copies ``p.grad`` into ``p.summed_grad`` before it adds the noise, because its own second
    backward pass may reuse the tensor; :meth:`PerRecordClipper.backward` sets a new tensor at every
    step, so this takes it as it is (a third of the optimizer's time on PneumoniaMNIST's model).
    Everything else, noise included, is Opacus's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, clipper: PerRecordClipper, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, loss_reduction: str = "mean",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size,  # type: ignore[arg-type]  # a float divides too
                         loss_reduction=loss_reduction, generator=generator)
        self.clipper = clipper

    def accumulate(self) -> None:
        """``p.summed_grad`` is ``p.grad`` (added to it when steps accumulate), once per clipped backward."""
        if not self.clipper.clipped:
            raise RuntimeError(
                "DP-SGD step refused: the gradient was not clipped per record since the last step; expected "
                "PerRecordClipper.backward(loss) (PrivateTraining.backward) instead of loss.backward()"
            )
        self.clipper.clipped = False
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad
