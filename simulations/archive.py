"""Simulated hospital archives: MedMNIST records written as DICOM studies with realistic headers.

Each hospital gets its own equipment (vendor, model, bit depth, rescale, MONOCHROME1 or not,
matrix size, transfer syntax), patients with one to three studies, synthetic protected health
information (names, IDs, birth dates, accession numbers, institution, referring physician) and a
label manifest. The whole hospital journey (archive -> ``medsilo site check`` -> client node ->
federation) then runs on data that looks like a PACS export. Every identifier is made up.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from client.dicom import ANATOMICAL_STRUCTURE, dataset_bytes, new_uid, segmentation_dataset
from common.datasets import DatasetInfo, Task
from common.io import atomic_write_bytes, private_dir
from simulations.synthetic_dicom import Equipment, Identity, image_dataset

_FIRST = ("Jane", "John", "Maria", "Ahmed", "Li", "Olga", "Pierre", "Aisha", "Kenji", "Sofia", "Lucas", "Emma")
_LAST = ("Doe", "Smith", "Garcia", "Khan", "Wang", "Ivanova", "Martin", "Okafor", "Tanaka", "Rossi", "Silva", "Berg")
_VENDORS = (
    ("Siemens Healthineers", "Ysio Max"), ("GE Healthcare", "Definium 8000"), ("Philips", "DigitalDiagnost C90"),
    ("Canon Medical", "Radrex-i"), ("Fujifilm", "FDR D-EVO II"), ("Agfa", "DX-D 600"),
)
_MR_VENDORS = (
    ("Siemens Healthineers", "MAGNETOM Skyra"), ("GE Healthcare", "SIGNA Premier"), ("Philips", "Ingenia Elition"),
    ("Canon Medical", "Vantage Orian"), ("Fujifilm", "ECHELON Smart"),
)
_CODECS_GRAY = ("explicit", "jpeg2000", "rle", "jpeg-ls", "deflate", "jpeg")
_CODECS_RGB = ("explicit", "rle", "jpeg2000", "deflate")
_CODECS_LOSSLESS = ("explicit", "jpeg2000", "rle", "jpeg-ls", "deflate")
#: SNOMED CT code of what a segmentation task's masks outline (DICOM-SEG Segmented Property Type).
_STRUCTURES = {"msd-hippocampus": ("5366008", "SCT", "Hippocampus")}


@dataclass(frozen=True)
class ArchiveSite:
    """What one simulated hospital's archive holds (for tests and the run log)."""

    folder: Path
    files: int
    patients: int
    equipment: Equipment
    phi: tuple[str, ...]  # every synthetic identifying value written (for leak tests)


def modality_for(info: DatasetInfo) -> str:
    """The DICOM modality of a dataset's images (the segmentation tasks are MRI)."""
    name = info.name
    if info.task is Task.SEGMENTATION:
        return "MR"
    if name in ("pneumoniamnist", "chestmnist"):
        return "DX"
    if name == "breastmnist":
        return "US"
    if info.spatial_dims == 3 and name != "vesselmnist3d":
        return "CT" if name != "synapsemnist3d" else "OT"
    if name.startswith("organ"):
        return "CT"
    if name == "vesselmnist3d":
        return "MR"
    return "OT"


def site_equipment(info: DatasetInfo, site: int, *, seed: int, codecs: tuple[str, ...] | None = None) -> Equipment:
    """A seeded, site-specific device: vendor, bit depth, rescale, photometric, matrix, transfer syntax."""
    rng = np.random.default_rng(seed * 1009 + site)
    modality = modality_for(info)
    vendors = _MR_VENDORS if modality == "MR" else _VENDORS
    vendor, model = vendors[(site + seed) % len(vendors)]
    rgb = info.channels == 3 and info.spatial_dims == 2
    pool = codecs or (_CODECS_RGB if rgb else _CODECS_LOSSLESS if info.task is Task.SEGMENTATION else _CODECS_GRAY)
    codec = pool[site % len(pool)]
    bits = 8 if (rgb or codec == "jpeg" or modality == "US") else int(rng.choice((8, 12, 16)))
    slope, intercept = 1.0, 0.0
    if modality == "CT":
        bits, slope, intercept = 12, 1.0, -1024.0
    elif bits > 8:
        slope = float(rng.choice((0.5, 1.0, 2.0)))
    return Equipment(
        manufacturer=vendor,
        model=model,
        station=f"RAD{site:02d}-{int(rng.integers(1, 9))}",
        modality=modality,
        bits_stored=bits,
        rescale_slope=slope,
        rescale_intercept=intercept,
        monochrome1=modality in ("DX", "CR") and site % 3 == 1,
        transfer_syntax=codec,
        pixel_spacing=1.0 if info.task is Task.SEGMENTATION else round(float(rng.uniform(0.14, 0.8)), 3),
    )


def _upsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    size = (image.shape[1] * factor, image.shape[0] * factor)
    return np.asarray(PILImage.fromarray(image).resize(size, PILImage.Resampling.BICUBIC))


def _patients(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Records grouped into patients of one to three studies."""
    order = rng.permutation(n)
    groups, i = [], 0
    while i < n:
        k = int(rng.choice((1, 1, 2, 3)))
        groups.append(order[i : i + k].tolist())
        i += k
    return groups


def write_archive(
    folder: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    info: DatasetInfo,
    *,
    site: int,
    seed: int,
    upsample: int | None = None,
    codecs: tuple[str, ...] | None = None,
) -> ArchiveSite:
    """Write one hospital's records as DICOM plus ``labels.csv`` (SOP or series UID -> class index).

    Segmentation records become one MR series per patient with its expert mask as a DICOM-SEG (no
    ``labels.csv``: the masks are the labels).

    Parameters
    ----------
    folder
        Where the archive goes (``dicom/`` and ``labels.csv``).
    images, labels
        The site's records in MedMNIST layout (uint8) and labels (``(N,)`` or ``(N, L)``).
    info
        The dataset (modality, dimensions, channels).
    site, seed
        Choose the site's equipment and synthetic patients.
    upsample
        Matrix size factor (default: a site-specific 2-4x, as equipment differs).
    codecs
        Transfer syntaxes to rotate through across sites (default: all medsilo writes).

    """
    folder = private_dir(folder)  # made-up patients, but written as a hospital's would be: owner-only
    rng = np.random.default_rng(seed * 7919 + site)
    equipment = site_equipment(info, site, seed=seed, codecs=codecs)
    factor = upsample if upsample is not None else int(rng.choice((2, 3, 4)))
    institution = f"{('St. Mary', 'General', 'University', 'Riverside', 'Mercy', 'County')[site % 6]} Hospital {site}"
    if info.task is Task.SEGMENTATION:
        return _write_segmented(folder, images, labels, info, site=site, equipment=equipment, rng=rng,
                                institution=institution)
    rgb = info.channels == 3 and info.spatial_dims == 2
    phi: set[str] = {institution}
    rows: list[tuple[str, str]] = []
    written = 0
    groups = _patients(len(images), rng)
    level = "SeriesInstanceUID" if info.spatial_dims == 3 else "SOPInstanceUID"
    for p, records in enumerate(groups):
        patient = _patient(rng, site=site, number=p)
        phi |= set(patient)
        for s, r in enumerate(records):
            identity = _identity(rng, patient, site=site, institution=institution, description=f"{info.name} exam")
            phi |= {identity.accession, identity.referring_physician}
            base = folder / "dicom" / f"P{p:05d}" / f"S{s + 1}"
            label = labels[r]
            label_text = ";".join(str(i) for i in np.flatnonzero(label)) if np.ndim(label) else str(int(label))
            if info.spatial_dims == 3:
                volume = images[r].astype(np.float32) / 255.0
                order = rng.permutation(volume.shape[0])  # files are not stored in slice order
                for k, z in enumerate(order):
                    ds = image_dataset(
                        _up(volume[z], factor), identity=identity, equipment=equipment, instance_number=int(z) + 1,
                        position=(0.0, 0.0, float(z) * equipment.pixel_spacing * factor),
                    )
                    atomic_write_bytes(base / f"IM{k:04d}.dcm", dataset_bytes(ds))
                    written += 1
                rows.append((identity.series_uid, label_text))
            else:
                up = _upsample(images[r], factor).astype(np.float32) / 255.0
                sop = new_uid()
                ds = image_dataset(up, identity=identity, equipment=equipment, instance_number=1, sop_uid=sop, rgb=rgb)
                atomic_write_bytes(base / "IM0001.dcm", dataset_bytes(ds))
                written += 1
                rows.append((sop, label_text))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([level, "label"])
    w.writerows(rows)
    atomic_write_bytes(folder / "labels.csv", buf.getvalue().encode())
    return ArchiveSite(folder=folder, files=written, patients=len(groups), equipment=equipment,
                       phi=tuple(sorted(phi)))


def _patient(rng: np.random.Generator, *, site: int, number: int) -> tuple[str, str, str]:
    """A made-up patient: name, medical record number, birth date."""
    name = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}^{number:04d}"
    patient_id = f"MRN{site:02d}{int(rng.integers(10**6, 10**7))}"
    birth = f"{int(rng.integers(1930, 2020))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    return name, patient_id, birth


def _identity(
    rng: np.random.Generator, patient: tuple[str, str, str], *, site: int, institution: str, description: str
) -> Identity:
    """One made-up study of ``patient``: accession number, referring physician, date, new UIDs."""
    accession = f"ACC{site:02d}{int(rng.integers(10**7, 10**8))}"
    doctor = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}^Dr"
    name, patient_id, birth = patient
    return Identity(
        patient_name=name, patient_id=patient_id, birth_date=birth, sex=("F", "M")[int(rng.integers(2))],
        accession=accession, study_uid=new_uid(), series_uid=new_uid(),
        study_date=f"20{int(rng.integers(15, 26)):02d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        institution=institution, referring_physician=doctor, study_description=description,
    )


def _write_segmented(
    folder: Path, images: np.ndarray, masks: np.ndarray, info: DatasetInfo, *, site: int, equipment: Equipment,
    rng: np.random.Generator, institution: str,
) -> ArchiveSite:
    """One MR series per patient (slices along the volume's first axis, files in random order) plus a DICOM-SEG."""
    phi: set[str] = {institution}
    written = 0
    spacing = equipment.pixel_spacing
    for p in range(len(images)):
        patient = _patient(rng, site=site, number=p)
        identity = _identity(rng, patient, site=site, institution=institution, description=f"{info.name} MRI")
        phi |= {*patient, identity.accession, identity.referring_physician}
        volume = images[p].astype(np.float32) / 255.0
        base = folder / "dicom" / f"P{p:05d}"
        slices = [
            image_dataset(volume[z], identity=identity, equipment=equipment, instance_number=z + 1,
                          position=(0.0, 0.0, z * spacing))
            for z in range(volume.shape[0])
        ]
        for k, z in enumerate(rng.permutation(len(slices))):  # files are not stored in slice order
            atomic_write_bytes(base / "MR" / f"IM{k:04d}.dcm", dataset_bytes(slices[z]))
        seg = segmentation_dataset(slices, np.asarray(masks[p], dtype=np.uint8), info.labels,
                                   structure=_STRUCTURES.get(info.name, ANATOMICAL_STRUCTURE))
        atomic_write_bytes(base / "SEG" / "SEG0001.dcm", dataset_bytes(seg))
        written += len(slices) + 1
    return ArchiveSite(folder=folder, files=written, patients=len(images), equipment=equipment,
                       phi=tuple(sorted(phi)))


def _up(slice2d: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return slice2d
    img = PILImage.fromarray(slice2d.astype(np.float32), mode="F")
    return np.asarray(img.resize((slice2d.shape[1] * factor, slice2d.shape[0] * factor),
                                 PILImage.Resampling.BILINEAR), dtype=np.float32)


def write_archives(site_dir: Path, sites: int, info: DatasetInfo, *, seed: int) -> list[str]:
    """Replace each simulated site's ``site-NN.npz`` by a DICOM archive ``site-NN/`` of the same records.

    Training and validation records both go into the archive (a hospital's PACS has no split);
    the node makes its own patient-level validation split.
    """
    lines = []
    for site in range(sites):
        npz_path = site_dir / f"site-{site:02d}.npz"
        with np.load(npz_path, allow_pickle=False) as npz:
            images = np.concatenate([npz["train_images"], npz["val_images"]])
            labels = np.concatenate([npz["train_labels"], npz["val_labels"]])
        archive = write_archive(site_dir / f"site-{site:02d}", images, labels, info, site=site, seed=seed)
        npz_path.unlink()
        eq = archive.equipment
        lines.append(
            f"site-{site}: DICOM archive of {archive.files} files, {archive.patients} patients "
            f"({eq.manufacturer} {eq.model}, {eq.modality}, {eq.bits_stored}-bit, {eq.transfer_syntax}"
            f"{', MONOCHROME1' if eq.monochrome1 else ''})"
        )
    return lines
