"""Dataset catalog: every official 28-pixel MedMNIST dataset and the MSD hippocampus volumes, by name.

Search path, first hit wins: ``$MEDSILO_DATA`` (one folder, or several separated by ``os.pathsep`` as in
``PATH``), ``./data``, ``../shared/data/medmnist`` (segmentation tasks: ``../shared/data/msd``).
A missing MedMNIST file is downloaded from the official Zenodo record when the network allows and
checked against its MD5; offline, one error says which file to put where.

The official 28-pixel file of every MedMNIST release is accepted (:data:`RELEASES`); which one a run used is
:attr:`MedMNIST.release` (:func:`dataset_release` for a file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.io import atomic_write_bytes

#: Official MedMNIST v3 record: its files are the ones :attr:`DatasetInfo.md5` names.
ZENODO_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"

#: MedMNIST releases whose official 28-pixel files are accepted, oldest first (MedMNIST+'s larger files are not
#: read: a run at another ``resolution`` resizes the 28-pixel images, see :func:`at_resolution`).
#: - ``v2``: Zenodo records 5208230 / 6496656, the ``medmnist`` package before 2.2.4.
#: - ``v3``: Zenodo records 10519195 / 10519652, ``medmnist`` 2.2.4 and 3.x. Release note of 2.2.4: "removed a
#:   small number of blank samples in OrganAMNIST, OrganCMNIST, OrganSMNIST, OrganMNIST3D, and VesselMNIST3D";
#:   those five files differ from v2's (:attr:`DatasetInfo.v2_file`), the other thirteen are the same bytes.
#:
#: Checksums and sizes: ``medmnist/info.py`` of github.com/MedMNIST/MedMNIST at ``__version__`` 2.1.0 (commit
#: 075a8ad6) and 3.0.2 (commit 3bb56be6), the same values as the ``medmnist`` 2.2.4 and 3.0.2 wheels on PyPI.
RELEASES = ("v2", "v3")

#: Official files that were replaced for a data error: MD5 -> what the file is and what replaced it.
WITHDRAWN_MD5: dict[str, str] = {
    # medmnist/info.py before 2.1.0 (Zenodo record 5208230, test split 526); 2.1.0: "NoduleMNIST3D data error fixed"
    "902d495e3d91ad1a7bcac1a6b58a8fa2": "the NoduleMNIST3D file of MedMNIST v2 before medmnist 2.1.0, withdrawn "
                                        "for a data error (fixed in medmnist 2.1.0)",
}

#: Input sizes a 2D classification run may train at (``resolution``; the MedMNIST+ sizes). 0: the dataset's own.
RESOLUTIONS = (0, 28, 64, 128, 224)


class Task(StrEnum):
    """Label structure of a dataset."""

    BINARY = "binary-class"
    MULTICLASS = "multi-class"
    ORDINAL = "ordinal-regression"  # trained and scored as multi-class
    MULTILABEL = "multi-label, binary-class"
    SEGMENTATION = "segmentation"  # a label per voxel; one record is one patient's volume


@dataclass(frozen=True)
class DatasetInfo:
    """What medsilo knows about one MedMNIST dataset without opening it."""

    name: str
    task: Task
    channels: int
    labels: tuple[str, ...]
    md5: str
    n_train: int
    n_val: int
    n_test: int
    spatial_dims: int = 2
    size: int = 28
    #: Segmentation: every volume is centre-padded / cropped to this shape (see :mod:`common.volumes`).
    volume_shape: tuple[int, int, int] | None = None
    #: Segmentation: the task folder's name under the search path (``msd/<folder>``).
    folder: str = ""
    #: Side of the images as stored (0: ``size``); differs from ``size`` when a run trains at another resolution.
    source_size: int = 0
    #: MedMNIST v2's file where it differs from v3's (``md5``, ``n_*``): its MD5 and train / val / test sizes.
    v2_file: tuple[str, tuple[int, int, int]] | None = None

    @property
    def release_md5s(self) -> dict[str, str]:
        """Official MD5 of the file of each MedMNIST release (:data:`RELEASES`; empty for segmentation)."""
        if self.task is Task.SEGMENTATION:
            return {}
        return {"v2": self.v2_file[0] if self.v2_file else self.md5, "v3": self.md5}

    def release_of(self, md5: str) -> str | None:
        """The releases whose official file has MD5 ``md5``, e.g. ``"v3"`` or ``"v2/v3"`` (``None``: none)."""
        if self.task is Task.SEGMENTATION:
            return "MSD" if md5 == self.md5 else None
        return "/".join(r for r, m in self.release_md5s.items() if m == md5) or None

    @property
    def source_resolution(self) -> int:
        """Side of the images as stored: the dataset files' (MedMNIST: 28), whatever ``size`` the run trains at."""
        return self.source_size or self.size

    @property
    def ordinal(self) -> bool:
        """Whether the classes are ordered grades (``Task.ORDINAL``): decided by cut points, scored with κ too."""
        return self.task is Task.ORDINAL

    @property
    def num_outputs(self) -> int:
        """Logits the model must produce (1 for binary tasks; segmentation: classes plus background)."""
        if self.task is Task.SEGMENTATION:
            return len(self.labels) + 1
        return 1 if self.task is Task.BINARY else len(self.labels)

    @property
    def filename(self) -> str:
        """Official file name (segmentation: the task folder's ``dataset.json``)."""
        if self.task is Task.SEGMENTATION:
            return f"{self.folder}/dataset.json"
        return f"{self.name}.npz"


def _info(name: str, task: Task, channels: int, labels: str, md5: str, n: tuple[int, int, int],
          v2: tuple[str, tuple[int, int, int]] | None = None) -> DatasetInfo:
    """A MedMNIST entry: ``md5`` and ``n`` of the v3 file; ``v2``: MD5 and sizes of v2's where it differs."""
    return DatasetInfo(
        name=name,
        task=task,
        channels=channels,
        labels=tuple(labels.split("|")),
        md5=md5,
        n_train=n[0],
        n_val=n[1],
        n_test=n[2],
        spatial_dims=3 if name.endswith("3d") else 2,
        v2_file=v2,
    )


_ORGANS = (
    "bladder|femur-left|femur-right|heart|kidney-left|kidney-right|liver|lung-left|lung-right|"
    "pancreas|spleen"
)

CATALOG: dict[str, DatasetInfo] = {
    i.name: i
    for i in [
        _info("pathmnist", Task.MULTICLASS, 3,
              "adipose|background|debris|lymphocytes|mucus|smooth muscle|normal colon mucosa|"
              "cancer-associated stroma|colorectal adenocarcinoma epithelium",
              "a8b06965200029087d5bd730944a56c1", (89996, 10004, 7180)),
        _info("chestmnist", Task.MULTILABEL, 1,
              "atelectasis|cardiomegaly|effusion|infiltration|mass|nodule|pneumonia|pneumothorax|"
              "consolidation|edema|emphysema|fibrosis|pleural|hernia",
              "02c8a6516a18b556561a56cbdd36c4a8", (78468, 11219, 22433)),
        _info("dermamnist", Task.MULTICLASS, 3,
              "actinic keratoses and intraepithelial carcinoma|basal cell carcinoma|"
              "benign keratosis-like lesions|dermatofibroma|melanoma|melanocytic nevi|vascular lesions",
              "0744692d530f8e62ec473284d019b0c7", (7007, 1003, 2005)),
        _info("octmnist", Task.MULTICLASS, 1,
              "choroidal neovascularization|diabetic macular edema|drusen|normal",
              "c68d92d5b585d8d81f7112f81e2d0842", (97477, 10832, 1000)),
        _info("pneumoniamnist", Task.BINARY, 1, "normal|pneumonia",
              "28209eda62fecd6e6a2d98b1501bb15f", (4708, 524, 624)),
        _info("retinamnist", Task.ORDINAL, 3, "0|1|2|3|4",
              "bd4c0672f1bba3e3a89f0e4e876791e4", (1080, 120, 400)),
        _info("breastmnist", Task.BINARY, 1, "malignant|normal, benign",
              "750601b1f35ba3300ea97c75c52ff8f6", (546, 78, 156)),
        _info("bloodmnist", Task.MULTICLASS, 3,
              "basophil|eosinophil|erythroblast|immature granulocytes|lymphocyte|monocyte|"
              "neutrophil|platelet",
              "7053d0359d879ad8a5505303e11de1dc", (11959, 1712, 3421)),
        _info("tissuemnist", Task.MULTICLASS, 1,
              "collecting duct, connecting tubule|distal convoluted tubule|"
              "glomerular endothelial cells|interstitial endothelial cells|leukocytes|podocytes|"
              "proximal tubule segments|thick ascending limb",
              "ebe78ee8b05294063de985d821c1c34b", (165466, 23640, 47280)),
        _info("organamnist", Task.MULTICLASS, 1, _ORGANS,
              "68e3f8846a6bd62f0c9bf841c0d9eacc", (34561, 6491, 17778),
              v2=("866b832ed4eeba67bfb9edee1d5544e6", (34581, 6491, 17778))),
        _info("organcmnist", Task.MULTICLASS, 1, _ORGANS,
              "b9ceb9546e10131b32923c5bbeaea2b1", (12975, 2392, 8216),
              v2=("0afa5834fb105f7705a7d93372119a21", (13000, 2392, 8268))),
        _info("organsmnist", Task.MULTICLASS, 1, _ORGANS,
              "9ab87b696fb54e2a387ebe992d6ed5f1", (13932, 2452, 8827),
              v2=("e5c39f1af030238290b9557d9503af9d", (13940, 2452, 8829))),
        _info("organmnist3d", Task.MULTICLASS, 1,
              "liver|kidney-right|kidney-left|femur-right|femur-left|bladder|heart|lung-right|"
              "lung-left|spleen|pancreas",
              "a0c5a1ff56af4f155c46d46fbb45a2fe", (971, 161, 610),
              v2=("21f0a239e7f502e6eca33c3fc453c0b6", (972, 161, 610))),
        _info("nodulemnist3d", Task.BINARY, 1, "benign|malignant",
              "8755a7e9e05a4d9ce80a24c3e7a256f3", (1158, 165, 310)),
        _info("adrenalmnist3d", Task.BINARY, 1, "normal|hyperplasia",
              "bbd3c5a5576322bc4cdfea780653b1ce", (1188, 98, 298)),
        _info("fracturemnist3d", Task.MULTICLASS, 1,
              "buckle rib fracture|nondisplaced rib fracture|displaced rib fracture",
              "6aa7b0143a6b42da40027a9dda61302f", (1027, 103, 240)),
        _info("vesselmnist3d", Task.BINARY, 1, "vessel|aneurysm",
              "b41fd4f7e7e2feedddb201585ecafa1b", (1335, 191, 382),
              v2=("2ba5b80617d705141f3f85627108fce8", (1335, 192, 382))),
        _info("synapsemnist3d", Task.BINARY, 1, "inhibitory synapse|excitatory synapse",
              "1235b78a3cd6280881dd7850a78eadb6", (1230, 177, 352)),
        # 200 labeled MRI volumes split once with a fixed seed (common.volumes.SPLIT_SEED); the 130 official
        # test volumes have no masks and are not used. The shape holds every mask of the 200 (checked in tests).
        DatasetInfo(name="msd-hippocampus", task=Task.SEGMENTATION, channels=1,
                    labels=("anterior", "posterior"), md5="aac0f46e0b872d1cdfd6b8eb64d87bec",
                    n_train=150, n_val=20, n_test=30, spatial_dims=3, size=56, volume_shape=(32, 56, 40),
                    folder="Task04_Hippocampus"),
    ]
}


@dataclass(frozen=True)
class Split:
    """One split of a dataset: uint8 images and integer labels.

    ``labels`` is ``(N,)`` for binary and multi-class tasks and ``(N, L)`` for multi-label.
    """

    images: np.ndarray
    labels: np.ndarray
    #: Segmentation: each volume's shape before padding / cropping ``(N, 3)`` (None: not known).
    shapes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray) -> Split:
        """Rows ``index`` of this split."""
        return Split(self.images[index], self.labels[index], None if self.shapes is None else self.shapes[index])


@dataclass(frozen=True)
class MedMNIST:
    """A loaded dataset with its official train / val / test splits."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    #: Which official file was read: MedMNIST releases (``"v3"``, ``"v2/v3"``: the releases share the file; see
    #: :data:`RELEASES`), ``"MSD"`` for segmentation; empty when the data did not come from :func:`load`.
    release: str = ""


def dataset_info(name: str, *, resolution: int = 0) -> DatasetInfo:
    """Catalog entry for ``name``, at ``resolution`` pixels (see :func:`at_resolution`; 0: the dataset's own).

    Raises
    ------
    DataError
        Naming the known datasets when ``name`` is unknown; naming the sizes when ``resolution`` is not one.

    """
    try:
        info = CATALOG[name.lower()]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise DataError(f"unknown dataset {name!r}; use one of: {known}") from None
    return at_resolution(info, resolution)


def resolution_problems(info: DatasetInfo | None, resolution: int) -> list[str]:
    """Why ``info`` cannot train at ``resolution`` pixels (empty when it can; ``None``: any dataset)."""
    sizes = ", ".join(str(r) for r in RESOLUTIONS)
    if resolution not in RESOLUTIONS:
        return [f"resolution={resolution} is not a supported input size; use one of {sizes} "
                "(0: the dataset's own size, 28 for MedMNIST)"]
    if info is not None and resolution and resolution != info.size and (
            info.spatial_dims != 2 or info.task is Task.SEGMENTATION):
        return [f"resolution={resolution}: {info.name} is a {info.spatial_dims}D {info.task.value} dataset, which "
                f"trains at its own size ({info.size}); use resolution=0 (another resolution applies to 2D "
                "classification datasets)"]
    return []


def at_resolution(info: DatasetInfo, resolution: int) -> DatasetInfo:
    """``info`` with input side ``resolution`` (0 or the dataset's own size: ``info`` itself, unchanged).

    The records keep their stored size (:attr:`DatasetInfo.source_resolution`); :func:`to_tensor_layout` resizes
    them to ``size`` (a 64-pixel run of a MedMNIST dataset upsamples its 28-pixel images), and DICOM sites resize
    from the images' native resolution straight to ``size`` (:mod:`client.preprocessing`).

    Raises
    ------
    DataError
        ``resolution`` is not one of :data:`RESOLUTIONS`, or ``info`` is not a 2D classification dataset.

    """
    if problems := resolution_problems(info, resolution):
        raise DataError(problems[0])
    if not resolution or resolution == info.size:
        return info
    return dataclasses.replace(info, size=resolution, source_size=info.source_resolution)


def _env_dirs() -> list[Path]:
    """The folders of ``$MEDSILO_DATA``: one, or several separated by ``os.pathsep`` (``:`` on Linux)."""
    return [Path(d) for d in os.environ.get("MEDSILO_DATA", "").split(os.pathsep) if d]


def search_path() -> list[Path]:
    """Folders searched for dataset files, in order."""
    return [*_env_dirs(), Path("data"), Path("..") / "shared" / "data" / "medmnist"]


def volume_search_path() -> list[Path]:
    """Folders searched for segmentation task folders, in order."""
    return [*_env_dirs(), Path("data"), Path("..") / "shared" / "data" / "msd"]


def md5sum(path: Path) -> str:
    """MD5 of a file, streamed."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(info: DatasetInfo, *, download: bool = True, timeout_s: float = 10.0) -> Path:
    """Path of the verified file for ``info`` (any release's, see :data:`RELEASES`), downloaded if allowed and possible.

    Raises
    ------
    DataError
        The file is missing and cannot be fetched, or its MD5 is no official one.

    """
    return _locate(info, download=download, timeout_s=timeout_s)[0]


def dataset_release(name: str, path: Path) -> str:
    """Which MedMNIST release the file at ``path`` is, by its MD5: ``"v2"``, ``"v3"`` or ``"v2/v3"`` (shared file).

    Raises
    ------
    DataError
        Naming the file, its MD5, the expected ones and the fix when the file is no official file of ``name``.

    """
    info = dataset_info(name)
    return _release_or_error(info, path, md5sum(path), "")


def _expected(info: DatasetInfo) -> str:
    """The official checksums of ``info``'s file, with their releases (for messages)."""
    if info.task is Task.SEGMENTATION:
        return info.md5
    by_md5: dict[str, list[str]] = {}
    for release, md5 in info.release_md5s.items():
        by_md5.setdefault(md5, []).append(release)
    return " or ".join(f"{md5} (MedMNIST {' and '.join(rs)})" for md5, rs in by_md5.items())


def _release_or_error(info: DatasetInfo, path: Path, actual: str, what: str) -> str:
    """The release label of a file with MD5 ``actual``; a :class:`DataError` naming file, MD5s and fix if none."""
    release = info.release_of(actual)
    if release is not None:
        return release
    what = f" ({what})" if what else ""
    why = f", {WITHDRAWN_MD5[actual]}" if actual in WITHDRAWN_MD5 else ""
    fix = "replace it with the expected file or remove it"
    if info.task is not Task.SEGMENTATION:
        fix = f"replace it with the official file ({ZENODO_URL.format(name=info.name)}) or remove it"
    raise DataError(f"{path} has MD5 {actual}{why}, expected {_expected(info)}{what}; {fix}")


def _locate(info: DatasetInfo, *, download: bool = True, timeout_s: float = 10.0) -> tuple[Path, str]:
    """:func:`locate`, and the release of the file found (:meth:`DatasetInfo.release_of`)."""
    if info.task is Task.SEGMENTATION:
        return _locate_volumes(info), "MSD"
    dirs = search_path()
    found = _first_verified(dirs, info, f"official MedMNIST {info.name}, 28 px")
    if found is not None:
        return found
    searched = ", ".join(str(d) for d in dirs)
    target = dirs[0] / info.filename
    if not download:
        raise DataError(
            f"{info.filename} not found (searched {searched}); put the official file "
            f"(md5 {_expected(info)}) at {target} or set MEDSILO_DATA to its folder"
        )
    url = ZENODO_URL.format(name=info.name)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            payload = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DataError(
            f"{info.filename} not found (searched {searched}) and downloading {url} failed "
            f"({type(exc).__name__}); offline, put the official file (md5 {_expected(info)}) at "
            f"{target} or set MEDSILO_DATA to its folder"
        ) from None
    actual = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    if actual != info.md5:
        raise DataError(f"downloaded {url} has MD5 {actual}, expected {info.md5}; nothing was saved")
    atomic_write_bytes(target, payload)
    return target, str(info.release_of(actual))


def _first_verified(dirs: list[Path], info: DatasetInfo, what: str) -> tuple[Path, str] | None:
    """The first ``info.filename`` found in ``dirs`` and its release, by MD5 (``None`` if absent).

    Raises
    ------
    DataError
        When the file found has no official MD5.

    """
    for directory in dirs:
        candidate = directory / info.filename
        if candidate.is_file():
            return candidate, _release_or_error(info, candidate, md5sum(candidate), what)
    return None


def _locate_volumes(info: DatasetInfo) -> Path:
    """The task folder of a segmentation dataset, its ``dataset.json`` checked against the catalog's MD5."""
    dirs = volume_search_path()
    found = _first_verified(dirs, info, f"the {info.name} case list medsilo's fixed split was made from")
    if found is not None:
        return found[0].parent
    raise DataError(
        f"{info.filename} not found (searched {', '.join(str(d) for d in dirs)}); put the Medical Segmentation "
        f"Decathlon folder {info.folder} at {dirs[0] / info.folder} or set MEDSILO_DATA to its parent folder"
    )


def load_volumes(info: DatasetInfo) -> MedMNIST:
    """Read a segmentation dataset's labeled volumes into its fixed train / validation / test split."""
    from common.volumes import NiftiSource, load_records, seeded_split

    assert info.volume_shape is not None
    source = NiftiSource(_locate_volumes(info))
    names = seeded_split(source.cases(), (info.n_train, info.n_val, info.n_test))
    splits = []
    for cases in names:
        images, masks, shapes = load_records(source, cases, info.volume_shape)
        splits.append(Split(images, masks.astype(np.int64), shapes))
    return MedMNIST(info=info, train=splits[0], val=splits[1], test=splits[2], release="MSD")


def load(name: str, *, download: bool = True, resolution: int = 0) -> MedMNIST:
    """Load all splits of dataset ``name`` (verified against the MD5s of its official files).

    ``resolution`` (see :func:`at_resolution`) sets ``info.size``; the images keep the size they are stored at.
    The result's ``release`` says which MedMNIST release the file is (:data:`RELEASES`).
    """
    info = dataset_info(name, resolution=resolution)
    if info.task is Task.SEGMENTATION:
        return load_volumes(info)
    path, release = _locate(info, download=download)
    with np.load(path, allow_pickle=False) as npz:
        splits = {}
        for split in ("train", "val", "test"):
            labels = npz[f"{split}_labels"].astype(np.int64)
            if info.task is not Task.MULTILABEL:
                labels = labels.reshape(-1)
            splits[split] = Split(npz[f"{split}_images"], labels)
    return MedMNIST(info=info, release=release, **splits)


def to_tensor_layout(images: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """uint8 images to float32 ``(N, C, *spatial)`` scaled to [-1, 1].

    In a run at another resolution (:func:`at_resolution`), 2D images of another side than ``info.size`` are
    resized to it: bilinear, antialiased when shrinking. At the dataset's own size the images are used as they are.
    """
    x = images.astype(np.float32) / 127.5 - 1.0
    x = x.transpose(0, 3, 1, 2) if info.spatial_dims == 2 and info.channels == 3 else x[:, None]
    if info.source_size and info.spatial_dims == 2 and x.shape[-2:] != (info.size, info.size):
        x = _resize(x, info.size)
    return np.ascontiguousarray(x)


def _resize(x: np.ndarray, size: int, *, chunk: int = 1024) -> np.ndarray:
    """``(N, C, H, W)`` float32 resized to ``(N, C, size, size)`` (bilinear; antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    out = np.empty((*x.shape[:2], size, size), dtype=np.float32)
    shrink = size < min(x.shape[-2:])
    for start in range(0, x.shape[0], chunk):
        part = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk]))
        out[start:start + chunk] = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=shrink).numpy()
    return out


def stratify_key(labels: np.ndarray) -> np.ndarray:
    """One integer class per record for partitioning (multi-label: first positive, else 'none').

    Segmentation masks ``(N, D, H, W)`` give every volume class 0: partitions divide patients
    (iid, or by size with ``quantity``), never slices.
    """
    if labels.ndim > 2:
        return np.zeros(labels.shape[0], dtype=np.int64)
    if labels.ndim == 1:
        return labels
    has_any = labels.any(axis=1)
    return np.where(has_any, labels.argmax(axis=1), labels.shape[1]).astype(np.int64)
