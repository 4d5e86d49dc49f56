"""Inference at the hospital with an exported model: class probabilities and Grad-CAM overlays per image.

``medsilo predict --model BUNDLE INPUT...`` loads the folder ``medsilo export`` wrote (TorchScript and/or
ONNX plus ``model-card.json``), checks each model file against the SHA-256 in the card, preprocesses every
image exactly as the card says, prints the probabilities and writes ``<name>-gradcam.png`` overlays and
``predictions.json``.

Inputs are read through :class:`ImageReader` objects tried in order (:data:`READERS`): DICOM (decoded by
``client.dicom.read_image``, from the one package of medsilo that imports pydicom, with its display pipeline),
PNG/JPEG/TIFF (Pillow) and ``.npy`` arrays. Every reader yields display values in [0, 1], which go through
``client.preprocessing.to_model_input``, the very function a DICOM site trains through. Results go back to
a PACS through ``client.dicom`` too (``--dicom-out``: a Secondary Capture in the source image's study).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from client.explain import grad_cam, overlay, write_png
from common.errors import DataError
from common.io import atomic_write_json
from common.model_card import ModelCard, Preprocessing

#: Module and function the DICOM result writer plugs in through:
#: ``write_result(record: ImageRecord, prediction: Prediction, overlay_rgb: np.ndarray, out_dir: Path) -> Path``.
DICOM_MODULE = "client.dicom"
DICOM_WRITE = "write_result"


@dataclass
class ImageRecord:
    """One image as read from a file.

    Attributes
    ----------
    path
        The file it came from.
    pixels
        Display values in [0, 1], float32 ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)``: the
        layout of ``client.dicom.Image`` (one frame for a 2D image, several for a volume).
    source
        What the reader keeps to write results back (the DICOM header facts); ``None`` for plain images.

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
            with Image.open(path) as opened:
                image: Image.Image = opened
                if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                    image = image.convert("RGB" if image.mode not in ("LA", "1") else "L")
                return ImageRecord(path, display_values(np.asarray(image)))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None


class NumpyReader:
    """``.npy`` arrays (no pickle)."""

    name = "numpy"

    def can_read(self, path: Path) -> bool:
        return path.suffix.lower() == ".npy"

    def read(self, path: Path) -> ImageRecord:
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
        if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path}: expected a numeric (H, W), (H, W, 3) or (D, H, W) array; got {array.dtype} "
                            f"{array.shape}")
        return ImageRecord(path, display_values(array))


def display_values(array: np.ndarray) -> np.ndarray:
    """A plain image as display values ``(frames, rows, cols[, 3])`` in [0, 1].

    8-bit data is divided by 255; floats already in [0, 1] are kept; anything else is stretched min-max.
    ``(H, W, 3)`` is one colour frame, ``(D, H, W)`` with D != 3 a volume of D frames.
    """
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
        values = array.astype(np.float32)
    else:
        x = array.astype(np.float64)
        low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        values = ((x - low) / (high - low) if high > low else np.zeros_like(x)).astype(np.float32)
    return values[None] if values.ndim == 2 or (values.ndim == 3 and values.shape[-1] == 3) else values


def dicom_writer() -> Any:
    """``client.dicom.write_result`` (imported only when DICOM results are asked for)."""
    return getattr(importlib.import_module(DICOM_MODULE), DICOM_WRITE)


class DicomReader:
    """DICOM files (``.dcm`` or the ``DICM`` preamble), decoded by ``client.dicom.read_image``."""

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
        from client.dicom import Rejected, read_image

        try:
            image = read_image(path)
        except Rejected as exc:
            raise DataError(f"{path}: {exc.reason}") from None
        return ImageRecord(path, image.pixels, source=image.header)


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


def preprocess(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Display values ``(frames, rows, cols[, 3])`` as the model's input ``(C, *spatial)`` float32.

    The steps of a DICOM site's training data (``client.preprocessing.to_model_input``), then the trainer's
    scaling (``common.datasets.to_tensor_layout``).
    """
    from client.dicom import Rejected
    from client.preprocessing import Preprocessing as Steps
    from client.preprocessing import to_model_input

    steps = Steps(size=pre.size, channels=pre.channels, spatial_dims=pre.spatial_dims,
                  normalization=pre.normalization)
    if pre.spatial_dims == 3 and pixels.shape[0] == 1:
        raise DataError("a 3D model needs a volume (a multi-frame object or a (D, H, W) array); received one frame")
    try:
        record = to_model_input(np.asarray(pixels, dtype=np.float32), steps)
    except Rejected as exc:
        raise DataError(exc.reason) from None
    x = record.astype(np.float32) / 127.5 - 1.0
    if pre.spatial_dims == 2 and pre.channels == 3:
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    return np.ascontiguousarray(x[None])


def overlay_base(pixels: np.ndarray) -> np.ndarray:
    """The first frame as 8-bit (gray or RGB) for the overlay."""
    return np.clip(np.rint(np.asarray(pixels[0], dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def heatmap_on_image(heat: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A heatmap of the padded square input mapped back onto the ``rows`` x ``cols`` image (padding cut off)."""
    from PIL import Image

    side = max(rows, cols)
    full = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((side, side),
                                                                              Image.Resampling.BILINEAR))
    top, left = (side - rows) // 2, (side - cols) // 2
    return full[top:top + rows, left:left + cols]


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
    writer = dicom_writer() if dicom_out else None
    results = []
    for path in inputs:
        reader = reader_for(path)
        assert reader is not None
        record = reader.read(path)
        try:
            x = preprocess(record.pixels, model.card.preprocessing)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
        probs = model.probabilities(x[None])[0]
        named, label = model.describe(probs)
        prediction = Prediction(path=str(path), probabilities=named, label=label)
        heat = model.heatmap(x) if (heatmaps or writer is not None) else None
        if heat is not None and model.card.preprocessing.spatial_dims == 2:
            base = overlay_base(record.pixels)
            rgb = overlay(base, heatmap_on_image(heat, base.shape[0], base.shape[1]))
            if heatmaps:
                png = out_dir / f"{path.stem}-gradcam.png"
                write_png(png, rgb)
                prediction.heatmap_png = str(png)
            if writer is not None and record.source is not None:  # only a DICOM input has a study to go back to
                prediction.written.append(str(writer(record, prediction, rgb, out_dir)))
        results.append(prediction)
    atomic_write_json(out_dir / "predictions.json", {
        "model": model.card.name, "threshold": model.card.threshold, "predictions": [asdict(p) for p in results],
    })
    return results
