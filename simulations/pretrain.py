"""``medsilo pretrain``: train a start point on data the federation declares public, without DP.

Public pretraining, then DP fine-tuning: a model trained without DP on public records, then fine-tuned by the
federation under DP-SGD from that checkpoint (``init-checkpoint``), training only what ``fine-tune`` names. Public
and private data must be disjoint, so the public records are a fixed seeded share of the dataset's training split
(``public-records``, :func:`common.volumes.public_indices`) that no site is given; the validation and test splits
are never touched. The checkpoint carries the digest of every record it was trained on, and a run that starts
from it refuses to start when any of them is a site's record or a test record (:func:`overlap_problems`).

The checkpoint is the format :mod:`common.checkpoint` reads for ``--init-checkpoint``: a safetensors file whose
metadata says the dataset, the model, the public split and the digests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import RunConfig
from common.datasets import MedMNIST, Split, Task, load
from common.errors import DataError, Problems
from common.models import build_model, model_problems, resolve_model_name
from common.recipes import defaults_for
from common.training import (
    cosine_lr,
    device,
    loss_function,
    on_fixed_features,
    tensor_dataset,
    train_epoch,
    training_dataset,
)
from common.volumes import PUBLIC_SEED, public_indices

log = logging.getLogger("medsilo")

#: What the checkpoint's metadata calls itself (``kind``).
KIND = "medsilo-pretrain"


def record_digests(split: Split) -> list[str]:
    """SHA-256 of every record's image bytes (what an overlap between public and private data is found by)."""
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in split.images]


def set_aside_public(data: MedMNIST, public_records: int) -> tuple[Split, MedMNIST]:
    """The public records and the dataset without them: the sites' training pool loses them, nothing else does.

    Raises
    ------
    DataError
        When ``public_records`` would leave the sites no training record.

    """
    index = public_indices(len(data.train), public_records)
    private = np.ones(len(data.train), dtype=bool)
    private[index] = False
    return data.train.subset(index), dataclasses.replace(data, train=data.train.subset(np.flatnonzero(private)))


def public_description(public_records: int, n_train: int) -> str:
    """The public split as reports say it."""
    return (f"{public_records} of the {n_train} training records, a fixed subset (seed {PUBLIC_SEED}) set aside "
            "from every site; validation and test splits untouched")


def overlap_problems(metadata: dict[str, Any], path: str | Path, splits: dict[str, Split]) -> list[str]:
    """Records of ``splits`` (name -> split: the sites' pool, validation, test) that the checkpoint trained on."""
    public = set(metadata.get("record_digests", []))
    if not public:
        return []
    problems = []
    for name, split in splits.items():
        shared = sum(d in public for d in record_digests(split))
        if shared:
            problems.append(
                f"checkpoint {path} was pretrained on {shared} record(s) of the {name} data (same record digest): "
                "public and private data must be disjoint; declare them public with --public-records "
                f"{metadata.get('public_records', '?')} (no site is then given them), or pretrain on other data")
    return problems


def prepare_public(data: MedMNIST, config: RunConfig) -> tuple[MedMNIST, list[str]]:
    """``data`` with ``config.public_records`` set aside, and every overlap of the start checkpoint with the rest.

    What a run that declares public data (or starts from a pretrained checkpoint) does before it partitions the
    training split into sites: the sites get the returned ``data.train``; the problems are reported before anything
    trains.
    """
    problems: list[str] = []
    if config.public_records:
        try:
            _, data = set_aside_public(data, config.public_records)
        except DataError as exc:
            return data, [str(exc)]
    if config.init_checkpoint:
        try:
            _, metadata = load_checkpoint(config.init_checkpoint)
        except DataError as exc:
            return data, [str(exc)]
        problems += overlap_problems(metadata, config.init_checkpoint,
                                     {"sites' training": data.train, "validation": data.val, "test": data.test})
    return data, problems


def _validation_score(model: torch.nn.Module, x_val: torch.Tensor, val: Split, data: MedMNIST) -> float:
    from simulations.baselines import validation_score

    return validation_score(model, x_val, val, data.info)


def pretrain(
    dataset: str, out: str | Path, *, public_records: int, model: str = "auto", epochs: int = 0, lr: float = 0.0,
    batch_size: int = 0, seed: int = 0, holdout: float = 0.1, download: bool = True,
) -> dict[str, Any]:
    """Train ``model`` without DP on the public records of ``dataset``; write the checkpoint; return its metadata.

    ``epochs``, ``lr`` and ``batch_size`` at 0 take the dataset's non-DP recipe (epochs: rounds x local epochs, the
    pooled reference's budget). The last ``holdout`` share of the public records selects the best epoch
    (validation Dice or AUC); the test split only reports what the checkpoint gives alone.

    Raises
    ------
    ConfigError
        Every bad input at once, before anything trains.

    """
    problems = Problems()
    recipe = defaults_for(dataset, dp=False, model=model)
    cfg: RunConfig | None = None
    try:
        cfg = RunConfig(**{**recipe, "dataset": dataset, "dp": False, "seed": seed, "public_records": public_records,
                           **({"lr": lr} if lr else {}), **({"batch_size": batch_size} if batch_size else {})})
        for item in cfg.problems():
            problems.add(item)
    except TypeError as exc:
        problems.add(str(exc))
    problems.check(public_records >= 2, f"--public-records {public_records}: pretraining needs at least 2 public "
                                        "records (one to train on, one to select the epoch)")
    problems.check(0 < holdout < 1, f"--holdout {holdout}: use a share in (0, 1)")
    problems.check(epochs >= 0, f"--epochs {epochs} must be >= 0 (0: the recipe's)")
    out_path = Path(out)
    problems.check(not out_path.is_dir(), f"--out {out}: a folder; give the checkpoint's file name (.safetensors)")
    problems.check(out_path.suffix == ".safetensors", f"--out {out}: name the checkpoint *.safetensors")
    data = None
    if cfg is not None and not any(p.startswith("dataset=") for p in problems.items):
        for item in model_problems(cfg.model, _info(cfg)):
            problems.add(item)
        try:
            data = load(cfg.dataset, download=download)
        except DataError as exc:
            problems.add(str(exc))
    public = None
    duplicates = 0
    if data is not None and public_records >= 2:
        try:
            public, rest = set_aside_public(data, public_records)
            # A public record identical to a private one (MedMNIST's official splits share a few images) would
            # put that private image into the checkpoint: such records are set aside but not trained on.
            private = {*record_digests(rest.train), *record_digests(data.val), *record_digests(data.test)}
            keep = [i for i, d in enumerate(record_digests(public)) if d not in private]
            duplicates = len(public) - len(keep)
            public = public.subset(np.asarray(keep, dtype=np.int64))
            problems.check(len(public) >= 2, f"--public-records {public_records}: only {len(public)} of them differ "
                                              "from every private record; declare more records public")
        except DataError as exc:
            problems.add(str(exc))
    problems.raise_if_any()
    assert cfg is not None and data is not None and public is not None
    if duplicates:
        log.info("pretrain: %d public record(s) equal a private record (same pixels) and are not trained on",
                 duplicates)
    info = data.info
    model_name = resolve_model_name(cfg.model, info)
    n_val = max(1, round(len(public) * holdout))
    train, val = public.subset(np.arange(len(public) - n_val)), public.subset(np.arange(len(public) - n_val,
                                                                                        len(public)))
    total = epochs or cfg.rounds * cfg.local_epochs
    started = time.time()
    torch.manual_seed(seed)
    net = build_model(model_name, info, seed=seed).to(device())
    trainee, loader_data = on_fixed_features(net, training_dataset(train, info, model_name, seed=seed), augmented=False)
    loader = DataLoader(loader_data, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    _, val_set = on_fixed_features(net, tensor_dataset(val, info), augmented=False)
    x_val = val_set.tensors[0]
    opt = torch.optim.Adam(trainee.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = loss_function(info.task)
    every = max(1, total // 30) if info.task is Task.SEGMENTATION else 1  # whole-volume validation is costly
    best, best_score, best_epoch = None, -np.inf, 0
    for epoch in range(1, total + 1):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.lr, step=epoch, total=total)
        loss = train_epoch(trainee, loader, opt, loss_fn)
        if epoch % every and epoch < total:
            continue
        score = _validation_score(trainee, x_val, val, data)
        log.info("pretrain epoch %d/%d: loss %.4f, public validation %.4f", epoch, total, loss, score)
        # a NaN score (a holdout without both classes) never replaces a scored epoch
        if best is None or (np.isfinite(score) and score >= best_score):
            best, best_score, best_epoch = {k: v.detach().clone() for k, v in net.state_dict().items()}, score, epoch
    assert best is not None
    net.load_state_dict(best)
    from server.evaluation import TestSet

    test_set = TestSet.from_split(data.test, info)
    test = test_set.metrics(test_set.scores(net))
    metadata = {
        "kind": KIND, "dataset": info.name, "model": model_name, "public_records": public_records,
        "public_split": public_description(public_records, len(data.train)), "public_seed": PUBLIC_SEED,
        "record_digests": record_digests(public), "duplicates_of_private": duplicates, "epochs": total,
        "best_epoch": best_epoch,
        "validation_score": round(float(best_score), 4), "holdout_records": n_val, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "seed": seed, "dp": False,
        "test": {k: v for k, v in test.items() if k in ("dice_mean", "dice", "hd95_mean", "auc")},
        "train_seconds": round(time.time() - started, 1),
    }
    save_checkpoint(out_path, net.state_dict(), metadata)
    return metadata


def _info(cfg: RunConfig) -> Any:
    from common.datasets import dataset_info

    return dataset_info(cfg.dataset, resolution=cfg.resolution)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``medsilo pretrain`` (entry point ``medsilo.commands: pretrain``)."""
    p = sub.add_parser(
        "pretrain", help="train a start checkpoint without DP on records the federation declares public",
        description="Train a model without DP on the training records a federation declares public (a fixed "
                    "seeded share of the training split that no site is given) and write a checkpoint for "
                    "`medsilo simulate --init-checkpoint` (with the same --public-records, and --fine-tune to train "
                    "only part of it under DP). The validation and test splits are not trained on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="e.g. msd-hippocampus (see `medsilo datasets`)")
    p.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument("--public-records", type=int, required=True,
                   help="how many training records are public (hippocampus: e.g. 50 of 150)")
    p.add_argument("--model", default="auto", help="the model the federation will fine-tune")
    p.add_argument("--epochs", type=int, default=0, help="0: the dataset's non-DP recipe (rounds x local epochs)")
    p.add_argument("--lr", type=float, default=0.0, help="0: the dataset's non-DP recipe")
    p.add_argument("--batch-size", type=int, default=0, help="0: the dataset's non-DP recipe")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the public records that selects the epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-download", action="store_true", help="never try to download a missing dataset file")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    meta = pretrain(args.dataset, args.out, public_records=args.public_records, model=args.model,
                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                    holdout=args.holdout, download=not args.no_download)
    test = meta["test"]
    headline = f"test Dice {test['dice_mean']:.4f}" if "dice_mean" in test else f"test AUC {test.get('auc', 0):.4f}"
    print(f"wrote {args.out}: {meta['model']} on {meta['public_split']}; best epoch {meta['best_epoch']} of "
          f"{meta['epochs']}, {headline} (the checkpoint alone)")
    return 0
