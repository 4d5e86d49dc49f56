"""The ``medsilo`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import (
    ACCOUNTANTS,
    MODEL_DEFAULTS,
    SCATTERING_CNN_RECORDS,
    SEGMENTATION_DEFAULTS,
    SEGMENTATION_DP_DEFAULTS,
    SMALL_DATASET_DEFAULTS,
    SMALL_DATASET_DP_SCAFFOLD_EPSILON,
    SMALL_DATASET_RECORDS,
    STRATEGIES,
    RunConfig,
    defaults_for,
)
from common.errors import MedsiloError, NothingAggregated, Problems
from common.processes import stop_signals_interrupt

if TYPE_CHECKING:  # torch-heavy, imported by the commands that need it
    from client.inference import ExportedModel
    from common.datasets import DatasetInfo

DEFAULTS = RunConfig()
#: Flags whose default depends on the dataset's task (classification / segmentation).
TASK_DEFAULTED = tuple(SEGMENTATION_DEFAULTS)


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
                   help="auto, cnn, scatnet, scatnet-mirror, scatcnn, cnn-3d, resnet18, resnet18-small, resnet18-3d; "
                        "segmentation: unet2d, unet3d. auto: for 2D datasets under "
                        f"{SMALL_DATASET_RECORDS:,} training records scatnet-mirror under DP-SGD and scatcnn without "
                        f"DP, scatcnn under {SCATTERING_CNN_RECORDS:,}, "
                        "else the compact CNN (2D or 3D); segmentation: unet2d")
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
    g.add_argument("--augment", action="store_true",
                   help="random shift/rotation/intensity augmentation of 2D training batches at every site")
    g.add_argument("--server-lr", type=float, default=DEFAULTS.server_lr, help="FedAdam server learning rate")
    g.add_argument("--server-momentum", type=float, default=DEFAULTS.server_momentum, help="FedAvgM server momentum")
    g.add_argument("--init-checkpoint", default="", help="start from these weights (.safetensors or .pt)")
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
    from simulations.experiment import build_simulation, run_simulation

    out = args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    task_defaults = defaults_for(args.dataset, dp=not args.no_dp, epsilon=args.epsilon, model=args.model)
    values = dict(
        dataset=args.dataset, model=task_defaults["model"], augment=args.augment,
        weight_decay=args.weight_decay, proximal_mu=args.proximal_mu, server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        dp=not args.no_dp, epsilon=args.epsilon, delta=args.delta,
        accountant=args.accountant, seed=args.seed, init_checkpoint=args.init_checkpoint,
        secure_aggregation=args.secagg, validation_releases=args.validation_releases,
        validation_noise=args.validation_noise,
    )
    for name in (*TASK_DEFAULTED, "scaffold"):
        given = getattr(args, name)
        values[name] = task_defaults[name] if given is None else given
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
    )
    summary = run_simulation(sim, data)
    _print_summary(summary, out)
    if not summary.get("aggregated_rounds"):
        print(f"medsilo: error: {NothingAggregated(summary.get('why_not_aggregated', []))}\n"
              f"the run folder {out} keeps the rounds' refusals (metrics.jsonl, report.md)", file=sys.stderr)
        return 3
    return 0


def _print_summary(summary: dict, out: str) -> None:
    from simulations.report import comparison_table

    print()
    print(comparison_table(summary))
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
    from common.errors import ConfigError, Problems
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


def _cmd_datasets(args: argparse.Namespace) -> int:
    from common.datasets import CATALOG

    for info in CATALOG.values():
        print(f"{info.name:16s} {info.spatial_dims}D {info.channels}ch {info.task.value:26s} "
              f"{len(info.labels):2d} labels  train/val/test {info.n_train}/{info.n_val}/{info.n_test}")
    return 0


def _provision_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision",
        help="create a federation's CA, the coordinator's TLS identity and one startup kit per hospital",
        description=(
            "medsilo provision FEDERATION.toml --out KITS creates the federation (CA, SuperLink certificate with "
            "the coordinator's names as SANs, node authentication keys, one kit per hospital). With --add-site or "
            "--revoke-site it changes an existing kits folder. Private keys are written 0600; nothing is "
            "overwritten."
        ),
    )
    p.add_argument("federation", nargs="?", help="federation TOML (to create a new federation)")
    p.add_argument("--out", required=True, help="kits folder (created; must not exist or be empty)")
    p.add_argument("--add-site", metavar="NAME", help="add a hospital to the federation provisioned in --out")
    p.add_argument("--revoke-site", metavar="NAME", help="revoke a hospital's node key in --out")
    p.add_argument("--epsilon", type=float, default=8.0, help="with --add-site: the site's lifetime ε template")
    p.add_argument("--delta", type=float, default=1e-5, help="with --add-site: the site's δ template")
    p.set_defaults(func=_cmd_provision)


def _cmd_provision(args: argparse.Namespace) -> int:
    from common.errors import ConfigError, Problems
    from server import provision
    from server.federation import SiteSpec, load_federation, parse_site

    actions = [a for a in (args.federation, args.add_site, args.revoke_site) if a]
    if len(actions) != 1:
        raise ConfigError(["give exactly one of FEDERATION.toml, --add-site NAME or --revoke-site NAME"])
    if args.federation:
        spec = load_federation(args.federation)
        kits = provision.provision(spec, args.out)
        print(f"provisioned federation '{spec.name}' in {kits.root}: coordinator kit {kits.coordinator}, "
              f"{len(spec.sites)} hospital kit(s): {', '.join(s.name for s in spec.sites)}")
        print(f"keep {kits.root / 'ca' / 'ca.key'} offline; send each hospital its own folder over a trusted channel")
        return 0
    if args.add_site:
        p = Problems()
        site = parse_site({"name": args.add_site, "epsilon": args.epsilon, "delta": args.delta}, p, "--add-site")
        p.raise_if_any()
        assert isinstance(site, SiteSpec)
        folder = provision.add_site(args.out, site)
        print(f"added hospital '{site.name}': kit {folder}; copy {args.out}/coordinator/nodes/{site.name}.pub to "
              "the coordinator and run `medsilo server sync` (or restart the server)")
        return 0
    provision.revoke_site(args.out, args.revoke_site)
    print(f"revoked hospital '{args.revoke_site}'; run `medsilo server sync` on the coordinator (or restart it) "
          "so the SuperLink refuses its node")
    return 0


def _server_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="the coordinator's SuperLink (start, sync hospital keys)")
    ssub = p.add_subparsers(dest="server_command", required=True)
    start = ssub.add_parser(
        "start", help="start the SuperLink from the coordinator kit (TLS, node authentication, durable state)",
        description="Checks the kit, starts flower-superlink with TLS 1.3, SuperNode authentication and an SQLite "
                    "state database, registers the hospitals' keys, writes the `flwr` connection and runs until "
                    "Ctrl-C.")
    start.add_argument("--kit", required=True, help="the coordinator kit folder (kits/coordinator)")
    start.add_argument("--insecure", action="store_true",
                       help="NO TLS and NO node authentication (testing only; prints a warning)")
    start.set_defaults(func=_cmd_server_start)
    sync = ssub.add_parser("sync", help="register new hospital keys and unregister revoked ones (SuperLink running)")
    sync.add_argument("--kit", required=True, help="the coordinator kit folder")
    sync.set_defaults(func=_cmd_server_sync)


def _cmd_server_start(args: argparse.Namespace) -> int:
    from server.superlink import SuperLink, load_kit, sync

    kit = load_kit(args.kit, check_tls=not args.insecure)
    link = SuperLink(kit, insecure=args.insecure)
    try:
        link.start()
        print(f"medsilo: SuperLink of '{kit.federation}' ready in {link.startup_s:.1f} s; hospitals dial "
              f"{kit.hosts[0]}:{kit.port} (listening on {kit.bind}:{kit.port})", flush=True)
        if not args.insecure:
            changes = sync(kit)
            known = ", ".join(changes["registered"] + changes["unchanged"]) or "none"
            revoked = f"; revoked: {', '.join(changes['unregistered'])}" if changes["unregistered"] else ""
            print(f"medsilo: hospital keys registered: {known}{revoked}", flush=True)
        print(f"medsilo: launch a run from a medsilo checkout with:\n  FLWR_HOME={kit.flwr_home.absolute()} "
              f"flwr run . {kit.federation} --stream", flush=True)
        assert link.process is not None
        code = link.process.wait()
        return 0 if code in (0, -2, -15) else 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM / SIGHUP (common.processes.Stopped)
        print(f"medsilo: {stop or 'interrupted'}; stopping the SuperLink and every process it started", flush=True)
        return 0
    finally:
        link.stop()


def _cmd_server_sync(args: argparse.Namespace) -> int:
    from server.superlink import load_kit, sync

    changes = sync(load_kit(args.kit))
    print(f"registered: {', '.join(changes['registered']) or 'none'}; unregistered: "
          f"{', '.join(changes['unregistered']) or 'none'}; unchanged: {', '.join(changes['unchanged']) or 'none'}")
    return 0


def _client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a hospital's SuperNode")
    csub = p.add_subparsers(dest="client_command", required=True)
    start = csub.add_parser(
        "start", help="start this hospital's SuperNode from its startup kit",
        description="Checks the kit and the coordinator's certificate, then runs flower-supernode with TLS, the "
                    "node key and this site's policy until Ctrl-C. Only masked (SecAgg+) updates leave the site "
                    "unless --allow-unmasked-updates.")
    start.add_argument("--kit", required=True, help="this hospital's kit folder")
    start.add_argument("--data", required=True,
                       help="the site's data: a DICOM folder (with labels.csv), a DICOMweb root URL, or an .npz file")
    start.add_argument("--labels", help="label manifest CSV (default: labels.csv in the DICOM folder)")
    start.add_argument("--runtime-port", type=int, default=9094,
                       help="loopback port of the node's local Runtime API (unique per node on one machine)")
    start.add_argument("--insecure", action="store_true", help="NO TLS and NO node key (testing only; warns)")
    start.add_argument("--allow-unmasked-updates", action="store_true",
                       help="also answer runs without secure aggregation (the coordinator then sees this "
                            "site's update)")
    start.set_defaults(func=_cmd_client_start)


def _cmd_client_start(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client.node import SuperNode, check_coordinator_certificate, load_kit
    from common.errors import ConfigError

    problems = []
    url = args.data.startswith(("http://", "https://"))
    data: Path | str = args.data if url else Path(args.data)
    labels = Path(args.labels) if args.labels else None
    if not url and not Path(args.data).exists():
        problems.append(f"--data {args.data}: no such file or folder; give the site's DICOM folder or .npz file")
    if url and labels is None:
        problems.append("--data is a DICOMweb URL: pass --labels with the site's label manifest")
    if not url and Path(args.data).is_dir() and labels is None and not (Path(args.data) / "labels.csv").is_file():
        problems.append(f"--data {args.data}: no labels.csv in the folder; pass --labels")
    if labels is not None and not labels.is_file():
        problems.append(f"--labels {labels}: no such file")
    try:
        kit = load_kit(args.kit, insecure=args.insecure)
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems]) from None
    if problems:
        raise ConfigError(problems)
    if not args.insecure:
        warning = check_coordinator_certificate(kit)
        if warning:
            logging.getLogger("medsilo").warning(warning)
    node = SuperNode(kit, data, runtime_port=args.runtime_port, insecure=args.insecure,
                     allow_unmasked=args.allow_unmasked_updates, echo=sys.stdout, labels=labels)
    t0 = time.monotonic()
    try:
        node.start()
        print(f"medsilo: hospital '{kit.site}' joined federation '{kit.federation}' as node {node.node_id} "
              f"({time.monotonic() - t0:.1f} s after start); waiting for rounds (Ctrl-C or SIGTERM stops)",
              flush=True)
        node.wait()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM / SIGHUP (common.processes.Stopped)
        print(f"medsilo: {stop or 'interrupted'}; stopping the node and every process it started", flush=True)
    finally:
        node.stop()
    return 0


def _site_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="a hospital's privacy ledger and policy helpers")
    ssub = p.add_subparsers(dest="site_command", required=True)
    ledger = ssub.add_parser("ledger", help="ε spent and remaining per data source, from the site's durable ledgers")
    where = ledger.add_mutually_exclusive_group(required=True)
    where.add_argument("--kit", help="the hospital's kit folder (its state/ holds the ledgers)")
    where.add_argument("--state-dir", help="a node state folder (simulated sites: sites/site-NN-state)")
    ledger.add_argument("--accountant", default="prv", help="prv or rdp")
    ledger.add_argument("--json", action="store_true", help="print the ledgers as JSON")
    ledger.set_defaults(func=_cmd_site_ledger)
    approve = ssub.add_parser(
        "approve", help="review an app bundle (FAB) and record its digest in the site policy",
        description="Shows what a FAB holds: its digest, what it declares, and whether its site code (client/, "
        "common/) is this node's installed medsilo. A node accepts a FAB whose site code is its own release, or "
        "whose digest the policy's [apps] approved lists; it always runs its own installed code. A refused FAB is "
        "kept in the node's state/refused-apps/ for this review.")
    approve.add_argument("fab", help="the .fab file (from the coordinator, `flwr build`, or state/refused-apps/)")
    target = approve.add_mutually_exclusive_group(required=True)
    target.add_argument("--kit", help="the hospital's kit folder (its site-policy.toml is updated)")
    target.add_argument("--policy", help="a site-policy.toml to update")
    approve.add_argument("--yes", action="store_true", help="record the digest without asking")
    approve.set_defaults(func=_cmd_site_approve)
    fp = ssub.add_parser("fingerprint", help="the architecture fingerprint to list in a policy's model-hashes")
    fp.add_argument("--model", required=True)
    fp.add_argument("--dataset", required=True)
    fp.set_defaults(func=_cmd_site_fingerprint)
    chk = ssub.add_parser(
        "check",
        help="pre-flight report of a DICOM folder or DICOMweb service: ingested and rejected files, labels, PHI",
        description="Decode every file with the node's pipeline (warming its cache), validate the label manifest "
        "and report counts per label, modalities, transfer syntaxes, sizes, rejected files with reasons and PHI "
        "findings (attribute names only). For a segmentation --dataset: read every image series with its DICOM-SEG "
        "or RT-STRUCT as the node would and report each case (pseudonym, slices, shape, voxels per class, cropped "
        "voxels) and every file or case left out, with reasons. Exit code 0 when the site is ready, 1 when it is not.",
    )
    chk.add_argument("--data", required=True, help="DICOM folder or DICOMweb root URL (e.g. https://pacs/dicom-web)")
    chk.add_argument("--labels", help="label manifest CSV (UID columns + label); without it only images are checked")
    chk.add_argument("--json", dest="json_out", help="also write the full report as JSON to this file")
    chk.add_argument("--dataset", help="task the images are for (input size, channels, modalities, classes)")
    chk.add_argument("--state-dir", default="medsilo-site-state",
                     help="the node's state folder; its dicom-cache/ is what the node reads later")
    chk.add_argument("--window", help="CENTER,WIDTH display window replacing the files' own and the presets")
    chk.add_argument("--modality", action="append", help="accepted modality (repeat); default: the task's")
    chk.add_argument("--workers", type=int, help="decoder processes (default: CPUs, at most 8)")
    chk.set_defaults(func=_cmd_site_check)


def _cmd_site_ledger(args: argparse.Namespace) -> int:
    import json

    from client.dp.ledger import ledgers_in, legacy_summary
    from common.errors import DataError
    from common.site_policy import load_policy

    folder = Path(args.kit) / "state" if args.kit else Path(args.state_dir)
    policy_file = Path(args.kit) / "site-policy.toml" if args.kit else folder.parent / "site-policy.toml"
    policy = load_policy(policy_file) if policy_file.is_file() else None
    ledgers, legacy = ledgers_in(folder) if folder.is_dir() else ([], [])
    if not ledgers and not legacy:
        raise DataError(f"no privacy ledger in {folder}: this site has not released anything under DP there; "
                        "give the node's state folder (its state-dir)")
    # δ: the policy's (the lifetime budget's), else each ledger's plans', else 1e-5
    delta = policy.delta if policy else None
    sources = [ledger.summary(delta=delta, accountant=args.accountant) for ledger in ledgers]
    old = [legacy_summary(path, delta=delta or 1e-5, accountant=args.accountant) for path in legacy]
    budget = policy.epsilon_lifetime if policy else None
    if args.json:
        print(json.dumps({"state_dir": str(folder), "accountant": args.accountant, "epsilon_lifetime_budget": budget,
                          "sources": sources, "legacy": old}, indent=2))
        return 0
    print(f"privacy ledgers of {folder} ({args.accountant} accountant, Poisson sampling; reserved releases count as "
          "spent)")
    for s in sources:
        releases = ", ".join(f"{k} {v}" for k, v in sorted(s["releases"].items())) or "none"
        remaining = f"  lifetime budget {budget:g}  remaining {max(0.0, budget - s['epsilon_lifetime']):.3f}" \
            if budget is not None else ""
        print(f"  {s['source']}  {s['label']}\n      runs {s['runs']:3d}  releases {releases}  lifetime ε "
              f"{s['epsilon_lifetime']:.3f} (δ={s['delta']:g}){remaining}")
        for run, eps in s["per_run"].items():
            print(f"      run {run}: ε {eps:.3f}")
    if old:
        print("legacy ledgers (previous format, keyed by dataset name; counted toward every source's lifetime ε):")
        for o in old:
            print(f"  {o['file']}  runs {o['runs']:3d}  releases {o['releases']:4d}  ε {o['epsilon']:.3f} "
                  f"(δ={o['delta']:g})")
    return 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    from client.preprocessing import Preprocessing
    from client.site_check import check_source
    from common.datasets import Task, dataset_info
    from common.errors import Problems
    from common.io import atomic_write_json

    problems = Problems()
    info = None
    if args.dataset:
        try:
            info = dataset_info(args.dataset)
        except Exception as exc:
            problems.add(str(exc))
    elif args.labels:
        problems.add("--labels needs --dataset, which names the classes the labels refer to")
    window = None
    if args.window:
        try:
            c, w = (float(v) for v in args.window.split(","))
            window = (c, w)
        except ValueError:
            problems.add(f"--window {args.window!r} is not CENTER,WIDTH; e.g. --window 40,400")
    if info is not None and info.task is Task.SEGMENTATION:
        return _site_check_segmentation(args, info, problems)
    labels = args.labels
    default_manifest = Path(args.data) / "labels.csv"
    if labels is None and default_manifest.is_file():  # the manifest the node reads: check it as the node will
        if info is None:
            problems.add(f"--data {args.data} holds labels.csv, which the node will read: pass --dataset so that "
                         "its labels are checked against the task's classes")
        else:
            labels = str(default_manifest)
            print(f"labels: {default_manifest} (the node's default manifest; --labels names another)")
    if labels and not Path(labels).is_file():
        problems.add(f"--labels {labels} does not exist; give the site's label manifest CSV")
    if args.workers is not None and args.workers < 1:
        problems.add(f"--workers {args.workers} must be at least 1")
    extra: dict[str, Any] = {"window": window}
    if args.modality:
        extra["modalities"] = tuple(m.upper() for m in args.modality)
    settings = (Preprocessing.for_dataset(info.name, size=info.size, channels=info.channels,
                                          spatial_dims=info.spatial_dims, **extra)
                if info is not None else Preprocessing(**extra))
    for problem in settings.problems():
        problems.add(problem)
    problems.raise_if_any()
    check = check_source(
        args.data, settings, state_dir=args.state_dir, labels=labels,
        classes=info.labels if info else (), multilabel=bool(info and info.task is Task.MULTILABEL),
        workers=args.workers,
    )
    print(check.table())
    if args.json_out:
        atomic_write_json(Path(args.json_out), check.to_json())
        print(f"full report: {args.json_out}")
    return 0 if check.ready else 1


def _site_check_segmentation(args: argparse.Namespace, info: DatasetInfo, problems: Problems) -> int:
    """The pre-flight of a folder of image series with DICOM-SEG / RT-STRUCT masks."""
    from client.pacs import is_dicomweb
    from client.series import check_folder, local_folder
    from common.io import atomic_write_json

    if args.labels:
        problems.add("--labels: segmentation takes its labels from the DICOM-SEG / RT-STRUCT masks; drop --labels")
    if not is_dicomweb(args.data) and not Path(args.data).is_dir():
        problems.add(f"--data {args.data} is not a folder or DICOMweb URL; give the folder of image series and masks")
    if is_dicomweb(args.data) and Path(args.state_dir).exists() and not Path(args.state_dir).is_dir():
        problems.add(f"--state-dir {args.state_dir} is a file; the PACS spool goes into a folder")
    if args.window or args.modality:
        problems.add("--window / --modality apply to classification; segmentation reads modality values as stored")
    problems.raise_if_any()
    folder, failures = local_folder(args.data, Path(args.state_dir))
    check = check_folder(folder, info, source=args.data if is_dicomweb(args.data) else None,
                         retrieval_failures=failures)
    print(check.table())
    if args.json_out:
        atomic_write_json(Path(args.json_out), check.to_json())
        print(f"full report: {args.json_out}")
    return 0 if check.ready else 1


def _cmd_site_approve(args: argparse.Namespace) -> int:
    from client.app_approval import FabError, describe, fab_digest
    from common.errors import DataError
    from common.io import atomic_write_text
    from common.site_policy import load_policy, with_approved_app

    fab = Path(args.fab)
    policy_file = Path(args.kit) / "site-policy.toml" if args.kit else Path(args.policy)
    if not fab.is_file():
        raise DataError(f"{fab} does not exist; give the .fab file the coordinator shared (or one from the node's "
                        "state/refused-apps/)")
    policy = load_policy(policy_file)
    content = fab.read_bytes()
    try:
        print("\n".join(describe(content)))
    except FabError as exc:
        raise DataError(f"{fab}: {exc}") from None
    digest = fab_digest(content)
    if digest in policy.approved_apps:
        print(f"{policy_file} already approves {digest}")
        return 0
    if not args.yes:
        answer = input(f"record {digest} as approved in {policy_file}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not recorded")
            return 1
    text = with_approved_app(policy_file.read_text(), digest)
    atomic_write_text(policy_file, text)
    load_policy(policy_file)  # still a valid policy
    print(f"recorded {digest} in {policy_file}; the node applies it from its next request")
    return 0


def _cmd_site_fingerprint(args: argparse.Namespace) -> int:
    from common.datasets import dataset_info
    from common.models import build_model
    from common.site_policy import architecture_fingerprint

    model = build_model(args.model, dataset_info(args.dataset))
    print(architecture_fingerprint([tuple(v.shape) for v in model.state_dict().values()]))
    return 0


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="verify a hash-chained audit log")
    asub = p.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser(
        "verify", help="detect any edited, deleted, reordered or cut-off line",
        description="Checks every line's hash, the sequence, the chain and LOG.head. With --key, every line and "
                    "the head must also carry a valid signature by that key: only then is a log rewritten with "
                    "recomputed hashes detected. Exit 0: intact, 1: problems found, 2: the key cannot be read.")
    verify.add_argument("log", help="an audit.jsonl (a site's state/audit.jsonl or a run folder's audit.jsonl)")
    verify.add_argument("--key", metavar="PUB",
                        help="the signer's public key: a site's node.pub, a PEM public key, or the coordinator's "
                             "server.crt")
    verify.set_defaults(func=_cmd_audit_verify)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from common.audit import verify

    key = None
    if args.key is not None:
        from common.crypto import load_verifier

        key = load_verifier(Path(args.key))  # KeyFileProblem: main() prints it and exits 2
    result = verify(args.log, key=key)
    if result.ok:
        print(f"{args.log}: OK, {result.entries} entries, chain and head intact, {result.signing_summary()}")
        for note in result.notes:
            print(f"  note: {note}")
        return 0
    print(f"{args.log}: TAMPERED or damaged ({len(result.problems)} problem(s)):")
    for problem in result.problems:
        print(f"  - {problem}")
    return 1


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run's model as TorchScript and ONNX with a model card",
        description="Writes OUT/model.pt (TorchScript, with Grad-CAM support), OUT/model.onnx (checked against "
                    "torch with ONNX Runtime) and OUT/model-card.json/.md (task, classes, preprocessing, sites, "
                    "rounds, ε/δ per site, metrics, dataset and medsilo versions, file checksums).")
    p.add_argument("--run", required=True, help="a finished run folder (medsilo simulate --out, or the coordinator's "
                                                "out-dir)")
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--checkpoint", default="best", choices=("best", "final"),
                   help="best round on federated validation, or the last round")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from server.export import export_run

    card = export_run(args.run, args.out, checkpoint=args.checkpoint)
    print(f"exported {card.name} to {args.out}: {', '.join(card.files)}, model-card.json, model-card.md")
    return 0


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="class probabilities and Grad-CAM overlays for images (or masks and volumes of structures, "
                        "for a segmentation model), with an exported model",
        description="Prints each image's class probabilities and decided label, writes OUT/<name>-gradcam.png "
                    "overlays and OUT/predictions.json. Inputs: PNG/JPEG/TIFF, .npy, or DICOM files and folders. "
                    "With a segmentation model: NIfTI volumes or folders of DICOM series; writes each label mask "
                    "(NIfTI, or .npy and with --dicom-out a DICOM-SEG) and each structure's volume in mL.")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="the bundle folder of `medsilo export`, or its model.pt/model.onnx")
    p.add_argument("--out", default="predictions", help="folder for overlays and predictions.json")
    p.add_argument("--no-heatmaps", action="store_true", help="probabilities only")
    p.add_argument("--dicom-out", action="store_true",
                   help="also write each result as DICOM for a PACS (Secondary Capture with the overlay; "
                        "segmentation: a DICOM-SEG in the source series' study)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from client.inference import ExportedModel, find_inputs, predict

    model = ExportedModel.load(args.model)
    out = Path(args.out)
    if model.card.task == "segmentation":
        return _predict_volumes(model, args, out)
    inputs = find_inputs(args.inputs)
    results = predict(model, inputs, out, heatmaps=not args.no_heatmaps, dicom_out=args.dicom_out)
    for r in results:
        probs = ", ".join(f"{name}: {p:.3f}" for name, p in r.probabilities.items())
        print(f"{r.path}: {r.label} ({probs})" + (f" -> {r.heatmap_png}" if r.heatmap_png else ""))
    if model.torchscript is None and not args.no_heatmaps:
        print("no heatmaps: the bundle has no TorchScript model (Grad-CAM needs it)")
    print(f"{len(results)} image(s); {out / 'predictions.json'}")
    return 0


def _predict_volumes(model: ExportedModel, args: argparse.Namespace, out: Path) -> int:
    from client.segmentation import find_volumes, predict_volumes

    volumes, skipped = find_volumes(args.inputs)
    results = predict_volumes(model, volumes, out, dicom_out=args.dicom_out)
    for r in results:
        sizes = ", ".join(f"{name} {ml:.3f} mL" for name, ml in r.volumes_ml.items()) if r.volumes_ml else \
            ", ".join(f"{name} {n} voxels" for name, n in r.voxels.items())
        print(f"{r.input}: {sizes} -> {', '.join(r.written)}" + "".join(f"; {p}" for p in r.problems))
    for reason in skipped:
        print(f"skipped {reason}")
    print(f"{len(results)} volume(s); {out / 'predictions.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``medsilo`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="medsilo", description="Federated learning for hospitals.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _archive_parser(sub)
    _provision_parser(sub)
    _server_parser(sub)
    _client_parser(sub)
    _site_parser(sub)
    _audit_parser(sub)
    _export_parser(sub)
    _predict_parser(sub)
    d = sub.add_parser("datasets", help="list the datasets medsilo knows (MedMNIST, MSD hippocampus)")
    d.set_defaults(func=_cmd_datasets)
    return parser


def _configure_logging(*, verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s medsilo: %(message)s", "%H:%M:%S"))
    for name in ("medsilo", "client", "server", "simulations", "common"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


class _VersionAction(argparse.Action):
    """``--version``: the package versions are looked up only when asked for, not at every command's start."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``medsilo X (flwr Y, torch Z, opacus W)``: what a hospital's change record names."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"medsilo {of('medsilo')} (flwr {of('flwr')}, torch {of('torch')}, opacus {of('opacus')})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medsilo`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(verbose=args.verbose)
    try:
        with stop_signals_interrupt():  # SIGTERM/SIGHUP run the same clean-up as Ctrl-C: no process is left
            return int(args.func(args))
    except MedsiloError as exc:
        print(f"medsilo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # a command without its own clean-up stopped: say so, no traceback
        print(f"medsilo: {stop or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
