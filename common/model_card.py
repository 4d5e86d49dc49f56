"""The model card of an exported model: what it predicts, how to feed it, how it was trained, with what privacy.

Written by the coordinator's export (:mod:`server.export`) beside the TorchScript and ONNX files, read by a
hospital's inference (:mod:`client.inference`), which takes its preprocessing from here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.io import atomic_write_json, atomic_write_text

SCHEMA = "medsilo-model-card/1"
CARD_JSON = "model-card.json"
CARD_MARKDOWN = "model-card.md"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (the same steps a DICOM site trains with).

    Attributes
    ----------
    channels
        1 (grayscale; colour converted with BT.601 luma) or 3 (RGB; grayscale repeated).
    size
        Side length in pixels (voxels for 3D).
    spatial_dims
        2 or 3.
    layout
        Tensor layout, ``NCHW`` (2D) or ``NCDHW`` (3D).
    display
        Pixels to display values in [0, 1]: DICOM through its Modality LUT and VOI window (or the modality's
        preset), 8-bit images divided by 255, other arrays stretched min-max.
    geometry
        Padded to a square with the image's darkest value (aspect kept), then resized (antialiased bilinear).
    normalization
        ``window`` (display values as they are) or ``minmax`` (each image stretched to [0, 1]).
    scale
        Display values ``d`` become 8-bit ``v = round(255 d)``, then ``v / 127.5 - 1`` (range [-1, 1]).
    volume_shape
        Segmentation: the ``(slices, rows, columns)`` every volume is padded or cropped to; predictions are
        mapped back to the input's shape.

    """

    channels: int
    size: int
    spatial_dims: int = 2
    layout: str = "NCHW"
    display: str = "DICOM VOI window; 8-bit / 255; otherwise min-max"
    geometry: str = "pad to square (darkest value), antialiased bilinear resize"
    normalization: str = "window"
    scale: str = "v / 127.5 - 1"
    volume_shape: list[int] | None = None


@dataclass(frozen=True)
class ModelCard:
    """Everything a clinician or a PACS integrator needs to know about an exported model."""

    name: str
    task: str
    classes: list[str]
    output: str  # "sigmoid" (binary, multi-label: one probability per output) or "softmax"
    threshold: float
    preprocessing: Preprocessing
    model: str
    sites: int
    rounds: int
    checkpoint_round: int
    strategy: str
    privacy: list[dict[str, Any]]
    metrics: dict[str, Any]
    dataset: dict[str, Any]
    medsilo_version: str
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    intended_use: str = "research use only; not a medical device"
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "model card") -> ModelCard:
        """Parse a card; every missing field is reported at once."""
        if data.get("schema") != SCHEMA:
            raise DataError(f"{source}: schema {data.get('schema')!r}, expected {SCHEMA!r}; export the model again "
                            "with this medsilo version (medsilo export)")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise DataError(f"{source} lacks {', '.join(missing)}; export the model again (medsilo export)")
        values = dict(data)
        values["preprocessing"] = Preprocessing(**values["preprocessing"])
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    # ------------------------------------------------------------------ files
    def write(self, folder: Path) -> None:
        """``model-card.json`` and ``model-card.md`` in ``folder`` (atomic)."""
        atomic_write_json(folder / CARD_JSON, self.to_dict())
        atomic_write_text(folder / CARD_MARKDOWN, self.to_markdown())

    @classmethod
    def read(cls, folder: Path) -> ModelCard:
        """The card in ``folder``; :class:`DataError` when absent or malformed."""
        path = folder / CARD_JSON
        if not path.is_file():
            raise DataError(f"{path} not found: a model needs its card (preprocessing, classes) beside it; "
                            "pass the folder `medsilo export` wrote")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); export the model again") from None
        return cls.from_dict(data, source=str(path))

    def _privacy_unit(self) -> str:
        """What one DP-SGD record (the unit ε protects) was at the sites (``privacy_unit`` of their reports)."""
        if self.task == "segmentation":
            return "a patient's volume, all of its slices (privacy_unit: patient)"
        if self.privacy and all(p.get("privacy_unit") == "patient" for p in self.privacy):
            return "a patient, all of their images (privacy_unit: patient)"
        record = "an image" if self.preprocessing.spatial_dims == 2 else "a volume"
        return f"{record} (privacy_unit: record; the sites' data named no patients)"

    def _output(self) -> str:
        """What the model's output means, for the card's table."""
        if self.task == "segmentation":
            return "per voxel, softmax over background and the classes; the label is the most probable"
        return f"{self.output} probabilities; decision threshold {self.threshold:.3f}"

    @property
    def resolution(self) -> int:
        """The input side the model was trained at (pixels; voxels for 3D)."""
        return int(self.dataset.get("resolution", self.preprocessing.size))

    @property
    def source_resolution(self) -> int:
        """The side of the training images as stored; differs from :attr:`resolution` when they were resized."""
        return int(self.dataset.get("source_resolution", self.resolution))

    def _resized(self) -> str:
        """A note on the card when the training images were resized from another resolution."""
        if self.source_resolution == self.resolution:
            return ""
        how = "upsampled" if self.source_resolution < self.resolution else "downsampled"
        return f" (trained on {self.source_resolution}-pixel images {how} to {self.resolution})"

    def to_markdown(self) -> str:
        """Human-readable card."""
        pre = self.preprocessing
        privacy = "\n".join(
            f"| {p.get('site')} | {p.get('epsilon', float('nan')):.3f} | {p.get('delta', float('nan')):g} "
            f"| {p.get('accountant', '')} | {p.get('rounds_trained', '')} |"
            for p in self.privacy
        ) or "| (DP off) | | | | |"
        metrics = "\n".join(
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in self.metrics.items() if not isinstance(v, (list, dict))
        )
        files = "\n".join(f"- `{name}` ({info.get('format')}, sha256 `{info.get('sha256')}`)"
                          for name, info in self.files.items())
        return f"""# Model card: {self.name}

**Intended use:** {self.intended_use}.

| | |
|---|---|
| task | {self.task} |
| classes | {", ".join(self.classes)} |
| output | {self._output()} |
| model | `{self.model}`, checkpoint of round {self.checkpoint_round} of {self.rounds} (`{self.strategy}`) |
| trained on | {self.sites} sites, dataset `{self.dataset.get('name')}` ({self.dataset.get('version')}\
{f", md5 `{self.dataset['md5']}`" if self.dataset.get('md5') else ""}) |
| medsilo | {self.medsilo_version} |

## Input preprocessing

{pre.channels} channel(s), {_extent(pre)}{self._resized()}, layout `{pre.layout}`. Display values: {pre.display}.
Geometry: {pre.geometry}. Normalization `{pre.normalization}`. 8-bit values `v` scaled as `{pre.scale}`.

## Privacy (DP-SGD at every site; one record is {self._privacy_unit()})

| site | ε | δ | accountant | rounds trained |
|---|---|---|---|---|
{privacy}

## Metrics (the dataset's test split)

| metric | value |
|---|---|
{metrics}

## Files

{files}
"""


def _extent(pre: Preprocessing) -> str:
    if pre.volume_shape:
        return "volumes of " + "×".join(str(v) for v in pre.volume_shape) + " voxels (slices × rows × columns)"
    return f"{pre.size} px per side"
