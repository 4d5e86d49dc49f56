"""The researcher's commands: ``simulate`` and ``archive``.

Research tooling only: the coordinator's commands live in ``server.cli``, a hospital's in ``client.cli``, the frame
that composes them in ``common.cli``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.config import ACCOUNTANTS, FINE_TUNE, STRATEGIES, RunConfig
from common.errors import MedsiloError, NothingAggregated, Problems
from common.recipes import (
    MODEL_DEFAULTS,
    RECIPE_OPTIONS,
    SCATTERING_CNN_RECORDS,
    SEGMENTATION_DEFAULTS,
    SEGMENTATION_DP_DEFAULTS,
    SMALL_DATASET_DEFAULTS,
    SMALL_DATASET_DP_SCAFFOLD_EPSILON,
    SMALL_DATASET_RECORDS,
)

DEFAULTS = RunConfig()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the researcher's sub-commands to ``medsilo``'s parser (entry point ``medsilo.commands: simulations``)."""
    _simulate_parser(sub)
    _archive_parser(sub)
    _sweep_parser(sub)


def _default_help(name: str, text: str = "") -> str:
    seg = f"{SEGMENTATION_DEFAULTS[name]}"
    if name in SEGMENTATION_DP_DEFAULTS:
        seg += f", with DP-SGD {SEGMENTATION_DP_DEFAULTS[name]}"
    small = (f"; 2D datasets under {SMALL_DATASET_RECORDS:,} training records: {SMALL_DATASET_DEFAULTS[name]}"
             if name in SMALL_DATASET_DEFAULTS else "")
    small += "".join(f"; model {model}: {values[name]}" for model, values in MODEL_DEFAULTS.items() if name in values)
    return (f"{text + '; ' if text else ''}default {getattr(DEFAULTS, name)} (segmentation datasets: {seg}{small})"
            "%(default).0s")


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a federation of hospitals on one machine",
        description=(
            "Split a MedMNIST dataset (classification) or the MSD hippocampus volumes (segmentation) into "
            "simulated hospitals (non-IID), train the same ServerApp and ClientApp that a real federation runs, "
            "with DP-SGD at every site, and compare against pooled and local-only training. Writes "
            "OUT/summary.json, metrics.jsonl, report.md and model-best/model-final.safetensors; --resume "
            "continues an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULTS.dataset,
                   help="e.g. pneumoniamnist, msd-hippocampus (see `medsilo datasets`)")
    g.add_argument("--sites", type=int, default=5, help="number of simulated hospitals")
    g.add_argument("--partition", default="dirichlet:0.5",
                   help="iid, dirichlet:ALPHA (label skew) or quantity:ALPHA (size skew)")
    g.add_argument("--scanner-shift", type=float, default=0.0,
                   help="per-site equipment differences (gamma, contrast, blur, noise), strength 0..1")
    g.add_argument("--no-download", action="store_true", help="never try to download a missing dataset file")
    g.add_argument("--dicom", action="store_true",
                   help="give each hospital a DICOM archive (realistic headers, per-site equipment, synthetic PHI) "
                        "that its node ingests, instead of a ready array file")
    g = p.add_argument_group("training")
    g.add_argument("--model", default=DEFAULTS.model,
                   help="auto, cnn, scatnet, scatnet-mirror, scatcnn, cnn-3d, coarse-3d, resnet18, resnet18-small, "
                        "resnet18-3d; segmentation: unet2d, unet3d. auto: for 2D datasets under "
                        f"{SMALL_DATASET_RECORDS:,} training records scatnet-mirror under DP-SGD and scatcnn without "
                        f"DP (colour images: cnn with --augment), scatcnn under {SCATTERING_CNN_RECORDS:,}, else the "
                        "compact CNN; 3D: coarse-3d (a linear model on a coarse grid) under DP-SGD, cnn-3d without; "
                        "segmentation: unet2d")
    g.add_argument("--strategy", default=None, help=_default_help("strategy", f"one of {', '.join(STRATEGIES)}"))
    g.add_argument("--scaffold", action=argparse.BooleanOptionalAction, default=None,
                   help="SCAFFOLD drift correction on top of --strategy (label-skewed sites); default off, on for "
                        f"2D datasets under {SMALL_DATASET_RECORDS:,} training records without DP or with ε ≥ "
                        f"{SMALL_DATASET_DP_SCAFFOLD_EPSILON:g}%(default).0s")
    g.add_argument("--rounds", type=int, default=None, help=_default_help("rounds"))
    g.add_argument("--local-epochs", type=int, default=None, help=_default_help("local_epochs"))
    g.add_argument("--batch-size", type=int, default=None,
                   help=_default_help("batch_size", "expected batch size in records (Poisson sampling under DP)"))
    g.add_argument("--lr", type=float, default=None, help=_default_help("lr", "local Adam learning rate without DP"))
    g.add_argument("--dp-lr", type=float, default=None,
                   help=_default_help("dp_lr", "local Adam learning rate with DP-SGD"))
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    g.add_argument("--proximal-mu", type=float, default=DEFAULTS.proximal_mu, help="FedProx proximal term")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random shift/rotation/intensity augmentation of 2D training batches at every site; default "
                        "off, on for small colour datasets without DP%(default).0s")
    g.add_argument("--server-lr", type=float, default=DEFAULTS.server_lr, help="FedAdam server learning rate")
    g.add_argument("--server-momentum", type=float, default=DEFAULTS.server_momentum, help="FedAvgM server momentum")
    g.add_argument("--init-checkpoint", default="", help="start from these weights (.safetensors or .pt)")
    g.add_argument("--fine-tune", default=DEFAULTS.fine_tune, choices=FINE_TUNE,
                   help="what the sites train of the --init-checkpoint model, the rest frozen (DP-SGD clips and "
                        "noises what is trained)")
    g.add_argument("--public-records", type=int, default=0,
                   help="training records declared public: set aside from every site (those `medsilo pretrain "
                        "--public-records N` trained on)")
    g.add_argument("--resolution", type=int, default=0, choices=[0, 28, 64, 128, 224],
                   help="input side in pixels for 2D classification (0: the dataset's own, 28 for MedMNIST; 64/128/224 "
                        "upsample MedMNIST's 28-px images; the scattering models train at 28 only)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g = p.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, default=DEFAULTS.epsilon, help="each site's ε for the whole run")
    g.add_argument("--delta", type=float, default=DEFAULTS.delta, help="each site's δ")
    g.add_argument("--max-grad-norm", type=float, default=None,
                   help=_default_help("max_grad_norm", "per-record (segmentation: per-patient) clipping bound"))
    g.add_argument("--accountant", default=DEFAULTS.accountant, help=f"one of {', '.join(ACCOUNTANTS)}")
    g.add_argument("--validation-releases", type=int, default=DEFAULTS.validation_releases,
                   help="global models the sites validate, spread over the run, the last always; under DP each is a "
                        "release charged to every site's ε (default: the final model only)")
    g.add_argument("--validation-noise", type=float, default=DEFAULTS.validation_noise,
                   help="σ of each DP validation release in records (default 0: 3 at ε=8, scaled by 8/ε)")
    g.add_argument("--no-dp", action="store_true", help="turn DP-SGD off at every site (explicit opt-out)")
    g.add_argument("--site-policy", default=None, metavar="FILE",
                   help="a site-policy.toml every simulated hospital applies (refusals show in the report)")
    g.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="mask every site update with SecAgg+ as a deployment does, so the coordinator sees only the "
                        "sum (default); --no-secagg sends updates unmasked (explicit opt-out, warns)")
    g = p.add_argument_group("personalisation")
    g.add_argument("--personalise-epsilon", type=float, default=None, metavar="EPS",
                   help="after the federation, every site fine-tunes the federated model on its own training records "
                        "under DP-SGD within this ε (charged to its ledger as a run of its own; the site's total is "
                        "the composition, reported), scored on the test split beside local-only and federated")
    g.add_argument("--personalise-epochs", type=int, default=5, help="DP-SGD epochs of the personalisation")
    g.add_argument("--personalise-lr", type=float, default=None,
                   help="its learning rate (default: a quarter of the run's DP-SGD rate)")
    g = p.add_argument_group("output")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also train pooled and local-only references (no DP) and compare")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --out (same flags) after its last completed round")
    g.add_argument("--cpus", type=int, default=None, help="CPU cores for the simulation (default: all)")
    g.add_argument("--reproducible", action="store_true",
                   help="research only: seed the sites' DP noise and sampling from --seed for bit-for-bit reruns "
                        "(default: the OS's entropy, as hospital nodes; summary.json records which)")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.experiment import build_simulation, research_config_values, run_simulation
    from simulations.personalisation import PersonaliseSpec

    out = args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    values = research_config_values(args.dataset, dp=not args.no_dp, epsilon=args.epsilon, model=args.model, settings={
        "weight_decay": args.weight_decay, "proximal_mu": args.proximal_mu,
        "server_lr": args.server_lr, "server_momentum": args.server_momentum, "delta": args.delta,
        "accountant": args.accountant, "seed": args.seed, "init_checkpoint": args.init_checkpoint,
        "fine_tune": args.fine_tune, "public_records": args.public_records,
        "secure_aggregation": args.secagg, "validation_releases": args.validation_releases,
        "validation_noise": args.validation_noise, "resolution": args.resolution,
        **{name: getattr(args, name) for name in RECIPE_OPTIONS},
    })
    if args.no_dp:
        logging.getLogger("medsilo").warning(
            "DP-SGD is OFF (--no-dp): site updates carry no record-level privacy guarantee"
        )
    if not args.secagg:
        logging.getLogger("medsilo").warning(
            "secure aggregation is OFF (--no-secagg): the coordinator sees every site's update in the clear"
        )
    if args.reproducible:
        logging.getLogger("medsilo").warning(
            "--reproducible: the sites' DP noise is seeded from --seed and predictable; research only"
        )
    sim, data = build_simulation(
        config_values=values, sites=args.sites, partition=args.partition, out=out,
        scanner_shift=args.scanner_shift, compare=args.compare, overwrite=args.overwrite,
        download=not args.no_download, site_policy=args.site_policy, dicom=args.dicom, resume=args.resume,
        reproducible=args.reproducible,
        personalise=(PersonaliseSpec(args.personalise_epsilon, args.personalise_epochs, args.personalise_lr)
                     if args.personalise_epsilon is not None else None),
    )
    summary = run_simulation(sim, data)
    _print_summary(summary, out)
    if not summary.get("aggregated_rounds"):
        print(f"medsilo: error: {NothingAggregated(summary.get('why_not_aggregated', []))}\n"
              f"the run folder {out} keeps the rounds' refusals (metrics.jsonl, report.md)", file=sys.stderr)
        return 3
    return 0


def _print_summary(summary: dict, out: str) -> None:
    from simulations.report import comparison_table, personalisation_table

    print()
    print(comparison_table(summary))
    if summary.get("personalised"):
        print()
        print(personalisation_table(summary))
    for p in summary.get("privacy", []):
        print(f"  {p['site']}: ε={p['epsilon']:.3f} this run, {p.get('epsilon_lifetime', p['epsilon']):.3f} lifetime "
              f"(δ={p['delta']:g}, {p['accountant']}, Poisson sampling)")
    model = ", model-best.safetensors" if summary.get("aggregated_rounds") else ", no model (nothing aggregated)"
    print(f"\nrun folder: {out} (summary.json, report.md, metrics.jsonl{model})")


def _archive_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "archive",
        help="write a MedMNIST dataset as per-hospital DICOM archives (synthetic PHI, per-site equipment)",
        description="Split a MedMNIST dataset into hospitals as `simulate` does and write each hospital's records "
                    "(train + validation) as a DICOM archive OUT/site-NN/dicom/ with realistic headers, per-site "
                    "equipment (vendor, bit depth, rescale, MONOCHROME1, matrix, transfer syntax), synthetic PHI and "
                    "OUT/site-NN/labels.csv. Every identifier is made up.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default=DEFAULTS.dataset)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA or quantity:ALPHA")
    p.add_argument("--scanner-shift", type=float, default=0.0, help="per-site intensity differences, 0..1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the archives (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_archive)


def _cmd_archive(args: argparse.Namespace) -> int:
    import shutil

    from common.datasets import load
    from common.errors import ConfigError
    from simulations.archive import write_archives
    from simulations.partition import PartitionSpec, scanner_profiles
    from simulations.runner import make_sites, site_table, write_sites

    problems = Problems()
    spec, spec_problems = PartitionSpec.parse(args.partition)
    for item in spec_problems:
        problems.add(item)
    problems.check(args.sites >= 1, f"--sites {args.sites}: need at least 1 site")
    problems.check(0 <= args.scanner_shift <= 1, f"--scanner-shift {args.scanner_shift}: use a strength in [0, 1]")
    out = Path(args.out)
    problems.check(args.overwrite or not (out.exists() and any(out.iterdir())),
                   f"--out {out}: the folder exists and is not empty; choose a new name or pass --overwrite")
    data = None
    try:
        data = load(args.dataset)
    except (ConfigError, MedsiloError) as exc:
        problems.add(str(exc))
    problems.raise_if_any()
    assert data is not None and spec is not None
    parts = make_sites(data, args.sites, spec, seed=args.seed)
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    stats = write_sites(data, parts, scanner_profiles(args.sites, strength=args.scanner_shift, seed=args.seed),
                        work, seed=args.seed)
    lines = write_archives(work, args.sites, data.info, seed=args.seed)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    print(site_table(stats, data.info.labels))
    print("\n".join(lines))
    print(f"archives in {out}/site-NN/ (dicom/ + labels.csv); check one with: medsilo site check --data "
          f"{out}/site-00 --labels {out}/site-00/labels.csv --dataset {args.dataset}")
    return 0



def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="simulate a grid of ε (or no DP) × seeds × partitions and tabulate it",
        description=(
            "Run `simulate` for every combination of --epsilon, --seeds and --partition, in one Ray session, into "
            "OUT/runs/<partition>_<eps>_seed-<s>/ (each as `simulate --out` writes it); then write OUT/sweep.md, "
            "sweep.json (per partition × ε: mean ± sd and a 95%% Student-t interval across seeds of the test AUC, "
            "or Dice, and balanced accuracy, with the pooled and local-only references) and sweep.png (AUC against "
            "ε). Running the same command again skips the finished runs and redoes an interrupted one; another "
            "grid for the same --out is refused."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--epsilon", nargs="+", required=True, metavar="EPS",
                   help="each site's ε per run, one value each; 'none' for a run without DP-SGD")
    g.add_argument("--seeds", nargs="+", required=True, metavar="SEED",
                   help="one run per seed (partition draw, initial model and, with --reproducible, DP noise)")
    g.add_argument("--partition", action="append", default=None, metavar="SPEC",
                   help="repeatable: iid, dirichlet:ALPHA or quantity:ALPHA (default dirichlet:0.5)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULTS.dataset, help="e.g. breastmnist (see `medsilo datasets`)")
    g.add_argument("--sites", type=int, default=5, help="number of simulated hospitals")
    g.add_argument("--scanner-shift", type=float, default=0.0, help="per-site equipment differences, strength 0..1")
    g.add_argument("--no-download", action="store_true", help="never try to download a missing dataset file")
    g = p.add_argument_group("training (as in simulate)")
    g.add_argument("--model", default=DEFAULTS.model, help="as in simulate (auto: the dataset's recipe for the ε)")
    g.add_argument("--strategy", default=None, help=_default_help("strategy", f"one of {', '.join(STRATEGIES)}"))
    g.add_argument("--scaffold", action=argparse.BooleanOptionalAction, default=None,
                   help="SCAFFOLD drift correction (default: the recipe for each ε)")
    g.add_argument("--rounds", type=int, default=None, help=_default_help("rounds"))
    g.add_argument("--local-epochs", type=int, default=None, help=_default_help("local_epochs"))
    g.add_argument("--batch-size", type=int, default=None, help=_default_help("batch_size"))
    g.add_argument("--lr", type=float, default=None, help=_default_help("lr", "local Adam learning rate without DP"))
    g.add_argument("--dp-lr", type=float, default=None, help=_default_help("dp_lr", "local learning rate with DP"))
    g.add_argument("--max-grad-norm", type=float, default=None, help=_default_help("max_grad_norm"))
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    g.add_argument("--proximal-mu", type=float, default=DEFAULTS.proximal_mu, help="FedProx proximal term")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augment 2D training batches at every site (default: the recipe for each ε)")
    g.add_argument("--server-lr", type=float, default=DEFAULTS.server_lr, help="FedAdam server learning rate")
    g.add_argument("--server-momentum", type=float, default=DEFAULTS.server_momentum, help="FedAvgM server momentum")
    g = p.add_argument_group("privacy")
    g.add_argument("--delta", type=float, default=DEFAULTS.delta, help="each site's δ (runs with DP)")
    g.add_argument("--accountant", default=DEFAULTS.accountant, help=f"one of {', '.join(ACCOUNTANTS)}")
    g.add_argument("--validation-releases", type=int, default=DEFAULTS.validation_releases)
    g.add_argument("--validation-noise", type=float, default=DEFAULTS.validation_noise)
    g.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="SecAgg+ on every site update, as in simulate")
    g.add_argument("--reproducible", action="store_true",
                   help="research only: seed the sites' DP noise from each run's seed")
    g = p.add_argument_group("output")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="train the pooled and local-only references (no DP) in every run")
    g.add_argument("--out", required=True, help="the sweep folder (run the same command again to continue it)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import SweepSettings, run_sweep
    from simulations.sweep_table import markdown

    options = dict(
        model=args.model, weight_decay=args.weight_decay, proximal_mu=args.proximal_mu,
        server_lr=args.server_lr, server_momentum=args.server_momentum, delta=args.delta,
        accountant=args.accountant, secure_aggregation=args.secagg, validation_releases=args.validation_releases,
        validation_noise=args.validation_noise, **{name: getattr(args, name) for name in RECIPE_OPTIONS},
    )
    if not args.secagg:
        logging.getLogger("medsilo").warning("secure aggregation is OFF (--no-secagg) in every run")
    settings = SweepSettings(
        dataset=args.dataset, sites=args.sites, partitions=args.partition or ["dirichlet:0.5"],
        epsilons=args.epsilon, seeds=args.seeds, out=Path(args.out), options=options,
        scanner_shift=args.scanner_shift, compare=args.compare, download=not args.no_download,
        reproducible=args.reproducible,
    )
    table = run_sweep(settings)
    print(markdown(table))
    print(f"sweep folder: {args.out} (sweep.md, sweep.json, sweep.png, runs/)")
    failed = [name for cell in table["cells"] for name in cell["not_aggregated"]]
    if failed:
        print(f"medsilo: error: {len(failed)} run(s) aggregated nothing: {', '.join(failed)} (see their report.md)",
              file=sys.stderr)
        return 3
    return 0
