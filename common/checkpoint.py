"""Pickle-free model checkpoints (safetensors) with atomic writes and safe loading.

Checkpoints cross trust boundaries (a coordinator's model reaches hospitals, a hospital loads
a transfer-learning start point), so nothing here unpickles: safetensors files, or
``torch.load(..., weights_only=True)`` for ``.pt`` files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from common.config import FINE_TUNE, RunConfig
from common.datasets import DatasetInfo
from common.errors import DataError
from common.io import atomic_write_bytes
from common.models import build_model, resolve_model_name

log = logging.getLogger(__name__)


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write ``state_dict`` as safetensors with JSON-able ``metadata``, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"medsilo": json.dumps(dict(metadata), sort_keys=True)}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.safetensors`` (with medsilo metadata) or ``.pt``/``.pth`` state dict safely."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found; pass the path of a .safetensors or .pt file")
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError and others
            raise DataError(
                f"checkpoint {path} is not a plain state dict loadable with weights_only=True "
                f"({type(exc).__name__}); re-save it with torch.save(model.state_dict(), ...)"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise DataError(f"checkpoint {path} is not a valid safetensors file ({exc})") from None
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta_raw = header.get("__metadata__", {}).get("medsilo", "{}")
    return tensors, json.loads(meta_raw)


#: Normalisation layers whose affine parameters ``fine-tune=norm+head`` trains.
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def _head(model: nn.Module) -> str:
    """The output layer: the last module (in registration order) that holds parameters of its own."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise DataError(f"{type(model).__name__} has no parameters to fine-tune")
    return owners[-1]


def trained_parameters(model: nn.Module, fine_tune: str) -> list[str]:
    """Names of the parameters a site trains under ``fine_tune`` (:data:`common.config.FINE_TUNE`).

    Raises
    ------
    DataError
        When the setting names no parameter of this model (``decoder`` of a model without one).

    """
    names = [name for name, _ in model.named_parameters()]
    if fine_tune == "all":
        return names
    if fine_tune not in FINE_TUNE:
        raise DataError(f"fine-tune={fine_tune!r} is unknown; use one of: {', '.join(FINE_TUNE)}")
    prefixes = [_head(model) + "."]
    if fine_tune == "decoder":
        if not isinstance(getattr(model, "up", None), nn.ModuleList):
            raise DataError(f"fine-tune=decoder: {type(model).__name__} has no decoder (a U-Net's `up` blocks); "
                            "use head, norm+head or all")
        prefixes.append("up.")
    if fine_tune == "norm+head":
        prefixes += [f"{name}." for name, m in model.named_modules() if isinstance(m, _NORMS)]
    return [name for name in names if any(name.startswith(p) for p in prefixes)]


def freeze_for_fine_tuning(model: nn.Module, fine_tune: str) -> list[str]:
    """Freeze every parameter ``fine_tune`` does not train (``requires_grad=False``); return the trained names.

    ``all`` changes nothing. Frozen parameters get no gradient, so no optimizer moves them and DP-SGD clips and
    noises only the trained ones (:mod:`client.dp.clipping` and Opacus skip parameters without ``requires_grad``).
    """
    trained = set(trained_parameters(model, fine_tune))
    for name, param in model.named_parameters():
        if name not in trained:
            param.requires_grad_(False)  # never the reverse: what a model keeps fixed by design stays fixed
    return [name for name, p in model.named_parameters() if name in trained and p.requires_grad]


def fit_problems(model: nn.Module, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], path: str | Path,
                 *, fine_tune: str = "all", model_name: str = "") -> list[str]:
    """Why the checkpoint ``tensors`` cannot start ``model`` (empty when it can), each with the fix.

    A checkpoint fits when at least half of the model's weights match it by name and shape (a classification
    head of another size may stay fresh: transfer to a new task), and, when ``fine_tune`` freezes anything, every
    frozen parameter comes from it: a frozen parameter left at its random initialisation would never learn.
    """
    own = model.state_dict()
    problems = []
    pretrained_for = str(metadata.get("model", ""))
    if model_name and pretrained_for and pretrained_for != model_name:
        problems.append(f"checkpoint {path} was pretrained for model {pretrained_for}; this run's model is "
                        f"{model_name}: pass --model {pretrained_for} or a checkpoint of {model_name}")
    matched = {k for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    share = sum(own[k].numel() for k in matched) / max(1, sum(v.numel() for v in own.values()))
    if share < 0.5:
        differ = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in tensors and k not in matched]
        missing = [k for k in own if k not in tensors]
        detail = "; ".join(filter(None, [
            f"shapes differ: {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}" if differ else "",
            f"missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else ""]))
        problems.append(f"checkpoint {path} matches only {share:.0%} of this model's weights by name and shape "
                        f"({detail}); use a checkpoint written for the same --model and dataset")
    elif fine_tune != "all":
        trained = set(trained_parameters(model, fine_tune))
        params = {name for name, _ in model.named_parameters()}
        fresh = sorted(k for k in params - trained if k not in matched)
        if fresh:
            problems.append(f"fine-tune={fine_tune} freezes {', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''}"
                            f", which checkpoint {path} does not hold (name and shape): they would stay random; "
                            "use fine-tune=all or a checkpoint of the whole model")
    return problems


def initialize_from_checkpoint(model: nn.Module, path: str | Path, *, fine_tune: str = "all",
                               model_name: str = "") -> list[str]:
    """Transfer learning: copy every tensor whose name and shape match; return the skipped names.

    A classification head of another size (a new task) is left at its fresh initialisation.

    Raises
    ------
    DataError
        When the checkpoint does not fit the model (:func:`fit_problems`), every reason at once.

    """
    tensors, metadata = load_checkpoint(path)
    problems = fit_problems(model, tensors, metadata, path, fine_tune=fine_tune, model_name=model_name)
    if problems:
        raise DataError("; ".join(problems))
    own = model.state_dict()
    matched = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(matched))
    own.update(matched)
    model.load_state_dict(own)
    if skipped:
        log.info("initialised from %s; kept fresh: %s", path, ", ".join(skipped))
    return skipped


def checkpoint_problems(config: RunConfig, info: DatasetInfo) -> list[str]:
    """Why ``config.init_checkpoint`` cannot start this run's model (empty when it can, or none is set).

    For a run's up-front validation: a checkpoint that does not fit is reported before anything trains.
    """
    if not config.init_checkpoint:
        return []
    try:
        tensors, metadata = load_checkpoint(config.init_checkpoint)
        model = build_model(config.model, info, seed=config.seed)
        return fit_problems(model, tensors, metadata, config.init_checkpoint, fine_tune=config.fine_tune,
                            model_name=resolve_model_name(config.model, info))
    except DataError as exc:
        return [str(exc)]


def initial_model(config: RunConfig, info: DatasetInfo) -> nn.Module:
    """The model every arm of a run starts from: seeded, then ``config.init_checkpoint`` if one is set.

    The federation's initial global model and the pooled and local-only references all come from here,
    so a transfer-learning run compares like with like (a reference trained from scratch against a
    federation started from a checkpoint would charge the checkpoint's benefit to federation).
    """
    model = build_model(config.model, info, seed=config.seed)
    if config.init_checkpoint:
        initialize_from_checkpoint(model, config.init_checkpoint, fine_tune=config.fine_tune,
                                   model_name=resolve_model_name(config.model, info))
    return model
