"""``medsilo simulate``: a whole simulated study from validated inputs to the report.

Validate everything, split the data into hospitals, run the federation, the pooled and
local-only references, and write ``summary.json`` and ``report.md``.

The run folder appears complete or not at all: work happens in ``.<name>.partial`` and is
renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.data import load_site_data
from client.dp.budget import budget_problems
from client.dp.release import count_headroom
from client.dp.rng import OS_ENTROPY, REPRODUCIBLE
from client.personalise import personalisation_config
from common.checkpoint import checkpoint_problems
from common.config import RunConfig
from common.datasets import MedMNIST, Split, Task, dataset_info, load
from common.errors import ConfigError, DataError, Problems
from common.features import CACHE_FOLDER
from common.io import atomic_write_bytes, atomic_write_json, private_dir, read_jsonl
from common.models import model_problems, resolve_model_name
from common.recipes import RECIPE_FIELDS, RECIPE_OPTIONS, defaults_for
from common.site_policy import load_policy
from server.evaluation import TestSet
from server.resume import STATE_FILE
from simulations.archive import write_archives
from simulations.baselines import train_reference
from simulations.partition import Partition, PartitionSpec, scanner_profiles
from simulations.personalisation import PersonaliseSpec, guarantee_text, personalise_sites
from simulations.report import write_report
from simulations.runner import make_sites, run_federation, site_table, write_sites

log = logging.getLogger("medsilo")


@dataclass(frozen=True)
class Simulation:
    """A simulated federation: the shared run configuration plus the research settings."""

    config: RunConfig
    sites: int
    partition: PartitionSpec
    split: Partition
    out: Path
    scanner_shift: float = 0.0
    compare: bool = True
    overwrite: bool = False
    site_policy: str | None = None
    dicom: bool = False
    resume: bool = False
    reproducible: bool = False
    #: Fine-tune the federated model at every site under DP afterwards (``--personalise-epsilon``); ``None``: not.
    personalise: PersonaliseSpec | None = None


def research_config_values(dataset: str, *, dp: bool, epsilon: float, model: str,
                           settings: dict[str, Any]) -> dict[str, Any]:
    """:class:`RunConfig` values of a research run: the dataset's recipe, then every setting given.

    ``settings`` holds the run's other values (``seed``, ``augment``, ...); a recipe field in it left ``None`` takes
    the recipe's value. The official test split scores every round (``server_eval``): the researcher holds it.
    ``medsilo simulate`` and ``medsilo sweep`` resolve their flags through here, so both run the same settings.
    """
    recipe = defaults_for(dataset, dp=dp, epsilon=epsilon, model=model)
    values = {k: v for k, v in settings.items() if k not in RECIPE_FIELDS}
    values.update(dataset=dataset, model=recipe["model"], dp=dp, epsilon=epsilon, server_eval=True)
    for name in RECIPE_OPTIONS:
        given = settings.get(name)
        values[name] = recipe[name] if given is None else given
    return values


def build_simulation(
    *, config_values: dict[str, Any], sites: int, partition: str, out: str, scanner_shift: float,
    compare: bool, overwrite: bool, download: bool = True, site_policy: str | None = None, dicom: bool = False,
    resume: bool = False, reproducible: bool = False, personalise: PersonaliseSpec | None = None,
) -> tuple[Simulation, MedMNIST]:
    """Validate every input at once; return the simulation and its loaded dataset.

    Raises
    ------
    ConfigError
        Listing every problem found (settings, dataset file, partition feasibility, output folder).

    """
    problems = Problems()
    config: RunConfig | None = None
    split: Partition | None = None
    try:
        config = RunConfig(**config_values)
        for item in config.problems():
            problems.add(item)
        if config.dp and not config.problems():  # the sites would refuse every round: say so before anything runs
            for item in budget_problems(config):
                problems.add(item)
    except TypeError as exc:
        problems.add(str(exc))
    spec, spec_problems = PartitionSpec.parse(partition)
    for item in spec_problems:
        problems.add(item)
    problems.check(sites >= 1, f"--sites {sites}: need at least 1 site")
    problems.check(0 <= scanner_shift <= 1, f"--scanner-shift {scanner_shift}: use a strength in [0, 1]")
    out_path = Path(out)
    if resume:
        state = partial_dir(out_path) / STATE_FILE
        problems.check(state.is_file(), f"--resume: {state} not found; only a run interrupted after at least one "
                                        "round can be resumed (start it again without --resume)")
    else:
        problems.check(
            overwrite or not (out_path.exists() and any(out_path.iterdir())),
            f"--out {out}: the folder exists and is not empty; choose a new name or pass --overwrite",
        )
    data = None
    if config is not None and not any(p.startswith("dataset=") for p in problems.items):
        info = dataset_info(config.dataset, resolution=config.resolution)
        for item in model_problems(config.model, info):
            if item not in problems.items:
                problems.add(item)
        try:
            data = load(config.dataset, download=download, resolution=config.resolution)
        except DataError as exc:
            problems.add(str(exc))
        for item in checkpoint_problems(config, info):  # a start checkpoint that does not fit, before any training
            problems.add(item)
        if data is not None:
            from simulations.pretrain import prepare_public  # the public records set aside, overlaps refused

            data, public_problems = prepare_public(data, config)
            for item in public_problems:
                problems.add(item)
        if data is not None and spec is not None and sites >= 1:
            try:
                split = make_sites(data, sites, spec, seed=config.seed)
            except DataError as exc:
                problems.add(str(exc))
    if personalise is not None:
        for item in personalise.problems(dp=bool(config_values.get("dp", True))):
            problems.add(item)
    if site_policy:
        try:
            load_policy(site_policy)
        except ConfigError as exc:
            for item in exc.problems:
                problems.add(f"--site-policy: {item}")
    problems.raise_if_any()
    assert config is not None and spec is not None and data is not None and split is not None
    if config.secure_aggregation:
        # Size the SecAgg+ range for the largest simulated site: the tightest range, the finest quantization.
        # A DICOM site's node makes its own validation split from all its records. Under DP a site checks its
        # DP estimate of its count against the range, so the range leaves room for that estimate's noise.
        largest = max(len(tr) + (len(va) if dicom else 0) for tr, va in zip(split.train, split.val, strict=True))
        headroom = count_headroom(epsilon=config.epsilon) if config.dp else 0
        config = config.replace(max_site_records=largest + headroom)
    return Simulation(config, sites, spec, split, out_path, scanner_shift, compare, overwrite, site_policy,
                      dicom, resume, reproducible, personalise), data


def partial_dir(out: Path) -> Path:
    """Where a run works until it is complete: ``.<name>.partial`` beside the run folder."""
    return out.parent / f".{out.name}.partial"


def run_simulation(sim: Simulation, data: MedMNIST) -> dict[str, Any]:
    """Run everything and move the finished run folder into place; returns ``summary.json``."""
    final = sim.out
    work = partial_dir(final)
    if not sim.resume:  # a resumed run continues in the folder it was interrupted in
        if work.exists():
            shutil.rmtree(work)
        private_dir(work)  # the sites' records and state, and the run's outputs: owner-only
    try:
        summary = _run(sim, data, work, final)
    except BaseException:
        log.error("run failed; partial outputs kept in %s for inspection", work)
        raise
    # The simulated sites' fixed features go with the run: derived data, some 20 times the bytes of the images.
    for cache in (work / "sites").glob(f"*-state/{CACHE_FOLDER}"):
        shutil.rmtree(cache, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    return summary


def concat_splits(splits: list[Split]) -> Split:
    """Records of several sites as one split (the pooled reference)."""
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def _headline(metrics: dict[str, Any]) -> str:
    """The log line's summary of test metrics: AUC and balanced accuracy, or Dice per class."""
    if "dice_mean" in metrics:
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in metrics["dice"].items())
        return f"test Dice {metrics['dice_mean']:.4f} ({per_class}), HD95 {metrics['hd95_mean']:.2f}"
    return f"test AUC {metrics['auc']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}"


def _personalise(sim: Simulation, fed_cfg: RunConfig, work: Path, test_set: TestSet, summary: dict[str, Any]) -> None:
    """Every site fine-tunes the reported federated model under DP (:mod:`simulations.personalisation`)."""
    spec = sim.personalise
    assert spec is not None
    log.info("personalisation: every site fine-tunes the federated model, ε=%g per site, %d epoch(s)",
             spec.epsilon, spec.epochs)
    t0 = time.time()
    seed = fed_cfg.seed if sim.reproducible else None
    rows = personalise_sites(work, fed_cfg, sites=sim.sites, test_set=test_set, spec=spec,
                             federated=summary["federated"], reproducible_seed=seed)
    for row in rows:
        if "privacy" in row:
            log.info("personalised %s: %s (ε %.3f, site total %.3f)", row["site"], _headline(row),
                     row["privacy"]["epsilon"], row["privacy"]["epsilon_lifetime"])
    tuning = personalisation_config(fed_cfg, epsilon=spec.epsilon, epochs=spec.epochs, lr=spec.lr)
    summary["personalised"] = rows
    summary["personalisation"] = {"epsilon": spec.epsilon, "delta": fed_cfg.delta, "epochs": spec.epochs,
                                  "lr": tuning.dp_lr, "from": "federated best",
                                  "guarantee": guarantee_text(spec, fed_cfg.delta)}
    summary["timing_s"]["personalised"] = round(time.time() - t0, 1)


def _public_split(cfg: RunConfig, data: MedMNIST) -> str | None:
    """Which training records the run declared public (``None``: none); ``data.train`` is what the sites shared."""
    from simulations.pretrain import public_description

    return public_description(cfg.public_records, len(data.train) + cfg.public_records) if cfg.public_records else None


def _run(sim: Simulation, data: MedMNIST, work: Path, final: Path) -> dict[str, Any]:
    info = data.info
    cfg = sim.config
    started = time.time()
    parts = sim.split
    profiles = scanner_profiles(sim.sites, strength=sim.scanner_shift, seed=cfg.seed)
    site_dir = work / "sites"
    stats = write_sites(data, parts, profiles, site_dir, seed=cfg.seed)
    if sim.dicom:  # each hospital holds a DICOM archive instead: nodes ingest it as a deployed node does
        for stat in write_archives(site_dir, sim.sites, info, seed=cfg.seed):
            log.info("%s", stat)
    if sim.site_policy:  # every simulated hospital applies this policy, as a deployed node applies its own
        atomic_write_bytes(site_dir / "site-policy.toml", Path(sim.site_policy).read_bytes())
    table = site_table(stats, info.labels)
    log.info("%s split into %d sites (%s, scanner shift %g), training records per label:\n%s",
             info.name, sim.sites, sim.partition, sim.scanner_shift, table)
    atomic_write_json(work / "sites.json", stats)
    fed_cfg = cfg.replace(out_dir=str(work.absolute()), site_data_dir=str(site_dir.absolute()),
                          min_sites=sim.sites)
    if sim.resume:
        before = json.loads((work / "run_config.json").read_text())
        changed = sorted(k for k, v in fed_cfg.to_flower().items() if before.get(k) != v)
        if changed:
            raise ConfigError([f"--resume: {k}={fed_cfg.to_flower()[k]!r} differs from the interrupted run's "
                               f"{before.get(k)!r}; resume with the same settings" for k in changed])
        log.info("resuming the interrupted run in %s", work)
        fed_cfg = fed_cfg.replace(resume=True)
    test_set = TestSet.from_split(data.test, info)

    summary: dict[str, Any] = {
        "dataset": info.name,
        "task": info.task.value,
        "sites": sim.sites,
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "model": resolve_model_name(cfg.model, info),
        "strategy": cfg.aggregation,
        "partition": str(sim.partition),
        "scanner_shift": sim.scanner_shift,
        "seed": cfg.seed,
        "dp": cfg.dp,
        "epsilon": cfg.epsilon if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "n_test": len(data.test),
        "dataset_release": data.release,
        "dataset_md5": data.info.release_md5s.get(data.release.rsplit("/", 1)[-1], data.info.md5),  # the file read
        "init_checkpoint": cfg.init_checkpoint or None,
        "fine_tune": cfg.fine_tune,
        "public_split": _public_split(cfg, data),
        "privacy_unit": "patient" if info.task is Task.SEGMENTATION else "record",
        # Where the sites' DP noise and sampling came from: the OS's entropy, or seeded (research reruns only).
        "randomness": REPRODUCIBLE if sim.reproducible else OS_ENTROPY,
        "site_table": table,
    }
    if info.source_size:  # trained at another resolution than the files': their images were resized
        summary["resolution"], summary["source_resolution"] = info.size, info.source_resolution
    log.info("federated training: %d sites x %d rounds (%s)", sim.sites, cfg.rounds,
             f"DP-SGD ε={cfg.epsilon}, δ={cfg.delta} per site" if cfg.dp else "no DP")
    t0 = time.time()
    # One intra-op thread here while the sites' Ray actors train (the server-side test evaluation runs beside
    # them): more threads than free cores spin instead of computing (a pooled segmentation epoch took 61 s
    # instead of 3 s on 2 busy cores). The references below, with Ray gone, get every core back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fed = run_federation(fed_cfg, num_sites=sim.sites, work_dir=work, reproducible=sim.reproducible)
    finally:
        torch.set_num_threads(threads)
    summary["aggregated_rounds"] = fed.get("aggregated_rounds", 0)
    if "why_not_aggregated" in fed:  # no trained model: the CLI fails the run with these reasons
        summary["why_not_aggregated"] = fed["why_not_aggregated"]
    summary["federated"] = fed.get("best", {})
    summary["federated_final"] = fed.get("final", {})
    summary["privacy"] = fed.get("privacy", [])
    if any(row.get("privacy_unit") == "patient" for row in summary["privacy"]):
        summary["privacy_unit"] = "patient"
    summary["timing_s"] = {"federated": round(time.time() - t0, 1)}

    if sim.compare:
        log.info("pooled reference (all sites' records centralised, no DP)")
        t0 = time.time()
        site_data = [load_site_data({"partition-id": i}, fed_cfg) for i in range(sim.sites)]
        pooled_train = concat_splits([s.train for s in site_data])
        pooled_val = concat_splits([s.val for s in site_data])
        pooled = train_reference("pooled", pooled_train, pooled_val, info, cfg, test_set, seed=cfg.seed)
        summary["pooled"] = pooled.test
        log.info("pooled: %s", _headline(pooled.test))
        summary["timing_s"]["pooled"] = round(time.time() - t0, 1)
        t0 = time.time()
        local = []
        for s in site_data:
            ref = train_reference(s.name, s.train, s.val, info, cfg, test_set, seed=cfg.seed)
            local.append({"site": s.name, "n_train": ref.n_train, **ref.test})
            log.info("local-only %s: %s", s.name, _headline(ref.test))
        summary["local"] = local
        summary["timing_s"]["local"] = round(time.time() - t0, 1)
    if sim.personalise is not None and summary["aggregated_rounds"]:
        _personalise(sim, fed_cfg, work, test_set, summary)
    summary["timing_s"]["total"] = round(time.time() - started, 1)
    atomic_write_json(work / "summary.json", summary)
    rounds = read_jsonl(work / "metrics.jsonl")
    scores_file = work / "test_scores.npy"
    scores = np.load(scores_file, allow_pickle=False) if scores_file.is_file() else None
    if info.task is Task.SEGMENTATION:
        write_report(work, summary, rounds, test=data.test if scores is not None else None, predictions=scores)
    else:
        write_report(work, summary, rounds, test_labels=data.test.labels if scores is not None else None,
                     test_scores=scores)
    return summary

