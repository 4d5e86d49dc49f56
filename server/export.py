"""Export a trained federated model for use at the hospitals: TorchScript, ONNX and a model card.

``medsilo export --run RUN --out BUNDLE`` reads a run folder (``medsilo simulate`` output or a coordinator's
``out-dir``) and writes into ``BUNDLE``:

- ``model.pt``: TorchScript (no Python class needed to load it): ``forward`` gives logits, and its
  ``body`` / ``head`` submodules give Grad-CAM heatmaps (segmentation: traced at the task's volume shape,
  voxel logits ``(N, classes + 1, D, H, W)``);
- ``model.onnx``: the same network for ONNX Runtime and PACS-side inference engines (logits);
- ``model-card.json`` / ``model-card.md``: task, classes, input preprocessing, sites, rounds, ε/δ per site,
  metrics, dataset version, medsilo version, and the SHA-256 of each model file.

The ONNX file is checked against the TorchScript model on random inputs before the export is accepted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoint import load_checkpoint
from common.datasets import DatasetInfo, Task, dataset_info
from common.errors import ConfigError, DataError
from common.io import atomic_write_bytes
from common.model_card import ModelCard, Preprocessing
from common.models import ExplainableModel, build_model

TORCHSCRIPT = "model.pt"
ONNX = "model.onnx"
#: Largest accepted difference between ONNX Runtime's and torch's logits, relative to the largest logit (at least 1):
#: float32 sums in another order differ by rounding that grows with the logits' size, an export error does not.
ONNX_TOLERANCE = 1e-4


def medsilo_version() -> str:
    """The installed medsilo version (``unknown`` when run from a source tree that is not installed)."""
    try:
        return metadata.version("medsilo")
    except metadata.PackageNotFoundError:
        return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best") -> ModelCard:
    """Export the ``best`` or ``final`` model of ``run_dir`` into the bundle folder ``out``.

    Raises
    ------
    ConfigError
        Every problem with the arguments at once (no run folder, no checkpoint, non-empty output).

    """
    run, dest = Path(run_dir), Path(out)
    ckpt = run / f"model-{checkpoint}.safetensors"
    problems = []
    if checkpoint not in ("best", "final"):
        problems.append(f"--checkpoint {checkpoint!r}: use best or final")
    elif not ckpt.is_file():
        problems.append(f"--run {run}: {ckpt.name} not found; pass a finished run folder (medsilo simulate --out, or "
                        "the coordinator's out-dir)")
    if dest.exists() and any(dest.iterdir()):
        problems.append(f"--out {dest}: the folder exists and is not empty; choose a new one")
    if problems:
        raise ConfigError(problems)
    state, meta = load_checkpoint(ckpt)
    resolution = int(_read_json(run / "run_config.json").get("resolution", 0))
    info = dataset_info(str(meta.get("dataset", "")), resolution=resolution)
    model = build_model(str(meta["model"]), info)
    model.load_state_dict(state)
    model.eval()
    shape: tuple[int, ...]
    if info.task is Task.SEGMENTATION:  # voxel logits; every volume is padded / cropped to one shape, so trace
        assert info.volume_shape is not None
        wrapped: torch.nn.Module = model
        shape = (2, info.channels, *info.volume_shape)
        scripted = torch.jit.trace(model, torch.zeros(shape[1:])[None], check_trace=False)
    else:  # class logits, with body / head kept for Grad-CAM
        wrapped = ExplainableModel(model).eval()
        shape = (2, info.channels, *([info.size] * info.spatial_dims))
        scripted = torch.jit.script(wrapped)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    script_bytes = buffer.getvalue()
    onnx_bytes = _onnx_bytes(wrapped, shape)
    check_onnx(onnx_bytes, wrapped, shape)
    atomic_write_bytes(dest / TORCHSCRIPT, script_bytes)
    atomic_write_bytes(dest / ONNX, onnx_bytes)
    card = model_card(run, meta, info_name=info.name, checkpoint=checkpoint, resolution=resolution, files={
        TORCHSCRIPT: {"format": "TorchScript", "sha256": _sha256(script_bytes)},
        ONNX: {"format": "ONNX", "sha256": _sha256(onnx_bytes)},
    })
    card.write(dest)
    return card


def _onnx_bytes(model: torch.nn.Module, shape: tuple[int, ...]) -> bytes:
    """The model as ONNX (torch.export-based exporter), with a dynamic batch size."""
    example = torch.zeros(shape)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" for ops medsilo does not use
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model, (example,), input_names=["image"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            )
    finally:
        onnx_log.setLevel(level)
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ONNX
        program.save(str(path))
        return path.read_bytes()


def check_onnx(onnx_bytes: bytes, model: torch.nn.Module, shape: tuple[int, ...], *, seed: int = 0) -> float:
    """Largest |ONNX Runtime - torch| over random inputs; :class:`DataError` above :data:`ONNX_TOLERANCE` (relative)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    diff = float(np.max(np.abs(got - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if diff > ONNX_TOLERANCE * scale:
        raise DataError(f"ONNX export differs from torch by {diff:.2e} on logits up to {scale:.3g} "
                        f"(> {ONNX_TOLERANCE:g} of them); not written")
    return diff


def _preprocessing(info: DatasetInfo) -> Preprocessing:
    """How the model's input is made, as the sites trained it."""
    if info.task is not Task.SEGMENTATION:
        return Preprocessing(channels=info.channels, size=info.size, spatial_dims=info.spatial_dims,
                             layout="NCDHW" if info.spatial_dims == 3 else "NCHW")
    assert info.volume_shape is not None
    return Preprocessing(
        channels=info.channels, size=info.size, spatial_dims=3, layout="NCDHW",
        display="modality values (DICOM Modality LUT; NIfTI as stored), no display window",
        geometry="slices in position order; centre zero-padding or centre crop to volume_shape, no resampling",
        normalization="percentile (each volume's 0.5-99.5th percentile range to 8-bit)",
        volume_shape=list(info.volume_shape),
    )


def _dataset_version(info: DatasetInfo, release: str | None) -> str:
    """The data's name and release: ``release`` is ``summary.json``'s ``dataset_release``.

    A deployed run has no ``summary.json``: the sites read their own files and the coordinator does not learn which
    release they hold, so the card names no release there.
    """
    if info.task is Task.SEGMENTATION:
        return f"Medical Segmentation Decathlon {info.folder}, labeled volumes in medsilo's fixed seeded split"
    name = f"MedMNIST {release}" if release else "MedMNIST"
    if info.source_size:  # trained at another resolution: the files' images were resized to it
        return f"{name}, {info.source_resolution} px, resized to {info.size} px"
    return f"{name}, {info.size} px"


def model_card(run: Path, meta: dict[str, Any], *, info_name: str, checkpoint: str,
               files: dict[str, dict[str, str]], resolution: int = 0) -> ModelCard:
    """The card from a run folder's checkpoint metadata, ``federated.json`` and (simulations) ``summary.json``.

    ``resolution`` is the run's input side (0: the dataset's own); the card records it beside the files' own.
    """
    info = dataset_info(info_name, resolution=resolution)
    federated = _read_json(run / "federated.json")
    summary = _read_json(run / "summary.json")
    config = _read_json(run / "run_config.json")
    privacy = [
        {k: p[k] for k in ("site", "epsilon", "delta", "epsilon_lifetime", "accountant", "sampling",
                           "noise_multiplier", "rounds_trained", "privacy_unit", "randomness") if k in p}
        for p in federated.get("privacy", [])
    ]
    metrics = federated.get(checkpoint, {})
    return ModelCard(
        name=f"medsilo {info.name} {meta.get('model')} (round {meta.get('round')})",
        task=info.task.value,
        classes=list(info.labels),
        output="softmax" if info.task in (Task.MULTICLASS, Task.ORDINAL) else "sigmoid",
        threshold=float(meta.get("threshold", 0.5)),
        preprocessing=_preprocessing(info),
        model=str(meta.get("model")),
        sites=int(summary.get("sites", len(privacy))),
        rounds=int(federated.get("rounds", config.get("rounds", 0))),
        checkpoint_round=int(meta.get("round", 0)),
        strategy=str(federated.get("strategy", config.get("strategy", ""))),
        privacy=privacy,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, list))},
        dataset={"name": info.name, "version": _dataset_version(info, summary.get("dataset_release")),
                 "md5": summary.get("dataset_md5"),
                 "splits": {"train": info.n_train, "val": info.n_val, "test": info.n_test},
                 "resolution": info.size, "source_resolution": info.source_resolution},
        medsilo_version=medsilo_version(),
        files=files,
    )
