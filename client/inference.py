"""Inference at the hospital with an exported model: class probabilities and Grad-CAM overlays per image.

``medsilo predict --model BUNDLE INPUT...`` loads the folder ``medsilo export`` wrote (TorchScript and/or
ONNX plus ``model-card.json``), checks each model file against the SHA-256 in the card, preprocesses every
image exactly as the card says, prints the probabilities and writes ``<name>-gradcam.png`` overlays and
``predictions.json``.

Inputs are read through :class:`ImageReader` objects tried in order (:data:`READERS`): PNG/JPEG/TIFF
(Pillow), ``.npy`` arrays, and DICOM, which is delegated to ``client.dicom`` (the only module of medsilo that
imports pydicom). Results go back to a PACS through the same module (``--dicom-out``). The functions that
module must provide are :data:`DICOM_READ` and :data:`DICOM_WRITE` (see :class:`DicomReader`).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from client.explain import grad_cam, overlay, write_png
from common.errors import DataError
from common.io import atomic_write_json
from common.model_card import ModelCard, Preprocessing

#: Module and functions the DICOM support plugs in through.
DICOM_MODULE = "client.dicom"
DICOM_READ = "read_image"  # read_image(path: Path) -> ImageRecord
DICOM_WRITE = "write_result"  # write_result(record, prediction, overlay_rgb, out_dir) -> Path


@dataclass
class ImageRecord:
    """One image as read from a file.

    Attributes
    ----------
    path
        The file it came from.
    pixels
        ``(H, W)`` grayscale, ``(H, W, 3|4)`` colour, or ``(D, H, W)`` for 3D models; any numeric dtype
        (non-8-bit data is windowed to 8 bits as the model card says).
    source
        What the reader keeps to write results back (e.g. the DICOM dataset); ``None`` for plain images.

    """

    path: Path
    pixels: np.ndarray
    source: Any = None


@dataclass
class Prediction:
    """The model's output for one image."""

    path: str
    probabilities: dict[str, float]
    label: str
    heatmap_png: str | None = None
    written: list[str] = field(default_factory=list)


class ImageReader(Protocol):
    """Reads one kind of image file."""

    name: str

    def can_read(self, path: Path) -> bool:
        """Whether ``path`` is a file of this kind."""
        ...

    def read(self, path: Path) -> ImageRecord:
        """The image of ``path``; :class:`DataError` when it cannot be read."""
        ...


class PillowReader:
    """PNG, JPEG, TIFF and BMP images."""

    name = "image"
    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

    def can_read(self, path: Path) -> bool:
        return path.suffix.lower() in self.suffixes

    def read(self, path: Path) -> ImageRecord:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return ImageRecord(path, np.asarray(image))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None


class NumpyReader:
    """``.npy`` arrays (no pickle)."""

    name = "numpy"

    def can_read(self, path: Path) -> bool:
        return path.suffix.lower() == ".npy"

    def read(self, path: Path) -> ImageRecord:
        try:
            return ImageRecord(path, np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None


def dicom_module() -> ModuleType:
    """``client.dicom``, or a :class:`DataError` saying that DICOM support is not installed."""
    try:
        module = importlib.import_module(DICOM_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != DICOM_MODULE:
            raise
        raise DataError("DICOM input and --dicom-out need client/dicom.py (DICOM ingestion), which this "
                        "installation lacks; convert the images to PNG meanwhile") from None
    missing = [f for f in (DICOM_READ, DICOM_WRITE) if not hasattr(module, f)]
    if missing:
        raise DataError(f"{DICOM_MODULE} lacks {', '.join(missing)}; update medsilo")
    return module


class DicomReader:
    """DICOM files (``.dcm`` or the ``DICM`` preamble), read by ``client.dicom.read_image``."""

    name = "dicom"

    def can_read(self, path: Path) -> bool:
        if path.suffix.lower() == ".dcm":
            return True
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                return handle.read(4) == b"DICM"
        except OSError:
            return False

    def read(self, path: Path) -> ImageRecord:
        record = getattr(dicom_module(), DICOM_READ)(path)
        if not isinstance(record, ImageRecord):
            raise DataError(f"{DICOM_MODULE}.{DICOM_READ} returned {type(record).__name__}, expected ImageRecord")
        return record


#: Readers tried in order; the first whose ``can_read`` accepts a file reads it.
READERS: list[ImageReader] = [DicomReader(), PillowReader(), NumpyReader()]


def reader_for(path: Path) -> ImageReader | None:
    """The first reader that accepts ``path``."""
    return next((r for r in READERS if r.can_read(path)), None)


def find_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Every readable file among ``paths`` (folders searched recursively, in name order); all problems at once."""
    found: list[Path] = []
    problems = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += [p for p in sorted(path.rglob("*")) if p.is_file() and reader_for(p) is not None]
        elif path.is_file():
            if reader_for(path) is None:
                problems.append(f"{path}: unknown image type; give PNG, JPEG, TIFF, .npy or DICOM files")
            else:
                found.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    if problems:
        from common.errors import ConfigError

        raise ConfigError(problems)
    if not found:
        raise DataError(f"no image found in {', '.join(map(str, paths))}")
    return found


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels as they are; anything else windowed min-max to 0..255 (the card's ``minmax``)."""
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(scaled * 255).astype(np.uint8)


def preprocess(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """An image as the model's input ``(C, *spatial)`` float32, following the model card."""
    from PIL import Image

    image = to_8bit(np.asarray(pixels))
    if pre.spatial_dims == 3:
        if image.ndim != 3:
            raise DataError(f"a 3D model needs (D, H, W) volumes; received shape {image.shape}")
        volume = torch.from_numpy(image.astype(np.float32))[None, None]
        volume = torch.nn.functional.interpolate(volume, size=(pre.size,) * 3, mode="trilinear", align_corners=False)
        return (volume[0].numpy() / 127.5 - 1.0).astype(np.float32)
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
        raise DataError(f"expected a 2D image (H, W) or (H, W, 3); received shape {image.shape}")
    picture = Image.fromarray(image)
    picture = picture.convert("L" if pre.channels == 1 else "RGB").resize((pre.size, pre.size),
                                                                          Image.Resampling.BILINEAR)
    x = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
    return x[None] if pre.channels == 1 else np.ascontiguousarray(x.transpose(2, 0, 1))


class ExportedModel:
    """A model bundle loaded for inference: TorchScript (probabilities and heatmaps) and/or ONNX (probabilities)."""

    def __init__(self, card: ModelCard, *, torchscript: Any = None, onnx: Any = None) -> None:
        self.card = card
        self.torchscript = torchscript
        self.onnx = onnx

    @classmethod
    def load(cls, path: str | Path, *, backend: str | None = None) -> ExportedModel:
        """Load a bundle folder or one of its model files (``model.pt``, ``model.onnx``).

        ``backend`` (``torchscript`` or ``onnx``) picks the engine for probabilities; by default the file
        given, or TorchScript for a folder. TorchScript, when present, also gives Grad-CAM heatmaps.
        """
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        card = ModelCard.read(folder)
        if backend is None:
            backend = "onnx" if path.suffix == ".onnx" else "torchscript"
        files = {info.get("format"): folder / name for name, info in card.files.items()}
        script_path, onnx_path = files.get("TorchScript"), files.get("ONNX")
        torchscript = onnx = None
        if script_path is not None and script_path.is_file():
            _verify(script_path, card)
            torchscript = torch.jit.load(str(script_path), map_location="cpu").eval()
        if backend == "onnx":
            if onnx_path is None or not onnx_path.is_file():
                raise DataError(f"{folder} has no ONNX model; export again or use the TorchScript file")
            import onnxruntime as ort

            _verify(onnx_path, card)
            onnx = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        elif torchscript is None:
            raise DataError(f"{folder} has no TorchScript model ({script_path}); pass model.onnx instead")
        return cls(card, torchscript=torchscript, onnx=onnx)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch ``(N, C, *spatial)``."""
        batch = np.ascontiguousarray(x, dtype=np.float32)
        if self.onnx is not None:
            return np.asarray(self.onnx.run(None, {"image": batch})[0])
        with torch.no_grad():
            return self.torchscript(torch.from_numpy(batch)).numpy()

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """``(N, outputs)`` probabilities: sigmoid per output, or softmax over classes (as the card says)."""
        logits = torch.from_numpy(self.logits(x)).double()
        probs = torch.softmax(logits, dim=1) if self.card.output == "softmax" else torch.sigmoid(logits)
        return probs.numpy()

    def heatmap(self, x: np.ndarray, target: int | None = None) -> np.ndarray | None:
        """Grad-CAM of one preprocessed image ``(C, *spatial)``; ``None`` without a TorchScript model."""
        if self.torchscript is None:
            return None
        return grad_cam(self.torchscript, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], target)

    def describe(self, probs: np.ndarray) -> tuple[dict[str, float], str]:
        """Named probabilities of one image and the decided label (binary: at the card's threshold)."""
        classes, card = self.card.classes, self.card
        if card.output == "softmax":
            named = {c: float(p) for c, p in zip(classes, probs, strict=True)}
            return named, classes[int(np.argmax(probs))]
        if len(probs) == 1:  # binary: the output is the probability of the second class
            p = float(probs[0])
            return {classes[0]: 1 - p, classes[1]: p}, classes[1] if p >= card.threshold else classes[0]
        named = {c: float(p) for c, p in zip(classes, probs, strict=True)}
        found = [c for c, p in named.items() if p >= card.threshold]
        return named, ", ".join(found) or "none"


def _verify(path: Path, card: ModelCard) -> None:
    expected = card.files.get(path.name, {}).get("sha256")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected != actual:
        raise DataError(f"{path}: SHA-256 {actual[:16]}… does not match the model card ({str(expected)[:16]}…); "
                        "the file was changed or belongs to another export")


def predict(model: ExportedModel, inputs: Sequence[Path], out_dir: Path, *, heatmaps: bool = True,
            dicom_out: bool = False) -> list[Prediction]:
    """Predict every input, write overlays (``<stem>-gradcam.png``), DICOM results and ``predictions.json``."""
    writer = getattr(dicom_module(), DICOM_WRITE) if dicom_out else None
    results = []
    for path in inputs:
        reader = reader_for(path)
        assert reader is not None
        record = reader.read(path)
        x = preprocess(record.pixels, model.card.preprocessing)
        probs = model.probabilities(x[None])[0]
        named, label = model.describe(probs)
        prediction = Prediction(path=str(path), probabilities=named, label=label)
        heat = model.heatmap(x) if (heatmaps or writer is not None) else None
        if heat is not None and model.card.preprocessing.spatial_dims == 2:
            rgb = overlay(to_8bit(np.asarray(record.pixels)), heat)
            if heatmaps:
                png = out_dir / f"{path.stem}-gradcam.png"
                write_png(png, rgb)
                prediction.heatmap_png = str(png)
            if writer is not None:
                prediction.written.append(str(writer(record, prediction, rgb, out_dir)))
        results.append(prediction)
    atomic_write_json(out_dir / "predictions.json", {
        "model": model.card.name, "threshold": model.card.threshold, "predictions": [asdict(p) for p in results],
    })
    return results
