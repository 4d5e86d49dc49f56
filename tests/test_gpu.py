"""Training on a site's GPU: DP-SGD and plain steps on CUDA, the clipper's norms there, export of what it trained.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU machine with the bench's
GPU section. Each test's body takes the device, so the same checks can be read against the CPU path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.dp.clipping import PerRecordClipper
from client.dp.rng import os_entropy
from client.dp.sgd import plan_for_records, train_dp
from client.trainer import train_plain
from common.checkpoint import save_checkpoint
from common.config import RunConfig
from common.datasets import Split, dataset_info
from common.io import atomic_write_json
from common.models import build_model
from common.training import tensor_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU)")]

INFO_64 = dataset_info("breastmnist", resolution=64)


def _split(n: int = 48) -> Split:
    """28-pixel binary records whose label brightens the image (stored as MedMNIST's are)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = (rng.integers(0, 120, (n, 28, 28)) + labels[:, None, None] * 100).astype(np.uint8)
    return Split(images, labels)


def train_round_on(device: str, *, dp: bool) -> None:
    # Prepare: resnet18-small at 64 pixels on the device, records in host memory as a site holds them
    model = build_model("resnet18-small", INFO_64, seed=0).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = RunConfig(dataset="breastmnist", model="resnet18-small", resolution=64, batch_size=16, local_epochs=1,
                    rounds=1, epsilon=8.0, accountant="rdp", dp=dp)
    records = tensor_dataset(_split(), INFO_64)
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dp:
            plan = plan_for_records(cfg, len(records))
            result = train_dp(model, records, INFO_64.task, cfg, plan, randomness=os_entropy(), server_round=1)
        else:
            result = train_plain(model, records, INFO_64.task, cfg, seed=0)
    # Assert: the round took its steps on the device and moved every weight there, all finite
    if dp:
        assert result.steps == plan.steps_per_round
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("dp", [True, False])
def test_a_training_round_runs_on_cuda_with_and_without_dp(dp: bool) -> None:
    train_round_on("cuda", dp=dp)


def clipper_matches_a_per_record_loop_on(device: str) -> None:
    # Prepare: resnet18-small at 64 pixels, 6 records, a clipping bound below every record's norm
    torch.manual_seed(0)
    model = build_model("resnet18-small", INFO_64, seed=0).to(device).train()
    x = torch.randn(6, 1, 64, 64, device=device)
    y = torch.randint(0, 2, (6, 1), device=device).float()
    loss_fn = nn.BCEWithLogitsLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    bound = 1e-3
    # The reference, computed independently: one record at a time through plain autograd
    per_record = [torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(6)]
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) for grads in per_record])
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[j].double() for f, grads in zip(factors, per_record, strict=True))
                for j in range(len(params))]
    # Execute: the one-pass clipper, its per-layer squared norms summed per record
    clipper = PerRecordClipper(model, max_grad_norm=bound)
    inner = clipper._layer
    squares: list[torch.Tensor] = []

    def recording(layer: nn.Module, a: torch.Tensor, g: torch.Tensor):
        sq, clipped = inner(layer, a, g)
        squares.append(sq.detach().double())
        return sq, clipped

    clipper._layer = recording  # type: ignore[method-assign]
    model.zero_grad(set_to_none=True)
    clipper.backward(loss_fn(model(x), y))
    clipper.close()
    # Assert: per-record norms and the clipped sum agree with the loop, on the device
    assert torch.allclose(torch.sqrt(torch.stack(squares).sum(0)), norms, rtol=1e-3, atol=1e-6)
    assert bool((norms > bound).all())
    for p, e in zip(params, expected, strict=True):
        assert p.grad is not None and p.grad.device.type == torch.device(device).type
        assert torch.allclose(p.grad.double(), e, rtol=1e-3, atol=1e-7)


def test_the_clippers_per_record_norms_on_cuda_equal_a_per_record_loop() -> None:
    clipper_matches_a_per_record_loop_on("cuda")


def export_after_training_on(device: str, root: Path) -> None:
    # Prepare: a few plain steps of the compact CNN at 64 pixels on the device, saved as a coordinator saves it
    from client.inference import ExportedModel
    from server.export import export_run

    model = build_model("cnn", INFO_64, seed=0).to(device)
    train_plain(model, tensor_dataset(_split(), INFO_64), INFO_64.task,
                RunConfig(dataset="breastmnist", model="cnn", resolution=64, dp=False, batch_size=16), seed=0)
    run = root / "run"
    meta = {"dataset": INFO_64.name, "task": INFO_64.task.value, "labels": list(INFO_64.labels), "model": "cnn",
            "round": 1, "threshold": 0.5, "dp": False}
    save_checkpoint(run / "model-best.safetensors", model.state_dict(), meta)
    atomic_write_json(run / "federated.json", {"rounds": 1, "strategy": "fedavg", "privacy": [], "best": {}})
    atomic_write_json(run / "run_config.json", {"resolution": 64})
    # Execute
    card = export_run(run, root / "bundle")
    bundle = ExportedModel.load(root / "bundle")
    # Assert: both files, a 64-pixel card, and the exported logits equal the trained model's
    assert card.resolution == 64 and json.loads((root / "bundle" / "model-card.json").read_text())
    x = np.random.default_rng(1).uniform(-1, 1, (3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x).to(device)).cpu().numpy()
    assert np.allclose(bundle.logits(x), expected, atol=1e-4)
    onnx = ExportedModel.load(root / "bundle" / "model.onnx")
    assert np.allclose(onnx.logits(x), expected, atol=1e-4)


def test_a_model_trained_on_cuda_exports_to_torchscript_and_onnx(tmp_path) -> None:
    export_after_training_on("cuda", tmp_path)
