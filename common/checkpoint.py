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

from common.config import RunConfig
from common.datasets import DatasetInfo
from common.errors import DataError
from common.io import atomic_write_bytes
from common.models import build_model

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


def initialize_from_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Transfer learning: copy every tensor whose name and shape match; return the skipped names.

    A classification head of another size (a new task) is left at its fresh initialisation.
    """
    tensors, _ = load_checkpoint(path)
    own = model.state_dict()
    matched = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    share = sum(v.numel() for v in matched.values()) / max(1, sum(v.numel() for v in own.values()))
    if share < 0.5:
        raise DataError(
            f"checkpoint {path} matches only {share:.0%} of this model's weights (name and shape); "
            "check that it was trained with the same --model"
        )
    skipped = sorted(set(own) - set(matched))
    own.update(matched)
    model.load_state_dict(own)
    if skipped:
        log.info("initialised from %s; kept fresh: %s", path, ", ".join(skipped))
    return skipped


def initial_model(config: RunConfig, info: DatasetInfo) -> nn.Module:
    """The model every arm of a run starts from: seeded, then ``config.init_checkpoint`` if one is set.

    The federation's initial global model and the pooled and local-only references all come from here,
    so a transfer-learning run compares like with like (a reference trained from scratch against a
    federation started from a checkpoint would charge the checkpoint's benefit to federation).
    """
    model = build_model(config.model, info, seed=config.seed)
    if config.init_checkpoint:
        initialize_from_checkpoint(model, config.init_checkpoint)
    return model
