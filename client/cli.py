"""A hospital's commands: ``client start``, ``site ledger|approve|fingerprint|check|personalise``, ``predict``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-heavy, imported by the commands that need it
    from client.inference import ExportedModel
    from common.datasets import DatasetInfo
    from common.errors import Problems


def register(sub: argparse._SubParsersAction) -> None:
    """Add a hospital's sub-commands to ``medsilo``'s parser (entry point ``medsilo.commands: client``)."""
    _client_parser(sub)
    _site_parser(sub)
    _predict_parser(sub)


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
    start.add_argument("--workers", type=int, default=1,
                       help="DP-SGD worker processes that share each step of a round (one Poisson batch, clipped per "
                            "worker, noised once): the hospital's setting, never the coordinator's")
    start.add_argument("--devices", default="auto",
                       help="auto, cpu, or CUDA devices for the workers, e.g. cuda:0,cuda:1 (auto: the GPUs present)")
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
                     allow_unmasked=args.allow_unmasked_updates, echo=sys.stdout, labels=labels,
                     workers=args.workers, devices=args.devices)
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
    chk.add_argument("--train-workers", type=int, default=1, help="the node's DP-SGD workers (client start --workers)")
    chk.add_argument("--devices", default="auto", help="the node's training devices (client start --devices)")
    chk.set_defaults(func=_cmd_site_check)
    _personalise_parser(ssub)


def _personalise_parser(ssub: argparse._SubParsersAction) -> None:
    p = ssub.add_parser(
        "personalise", help="fine-tune the federation's global model on this site's records under DP (stays here)",
        description="Fine-tunes the global model the coordinator published on this hospital's training records with "
        "the node's DP-SGD, within the personalisation budget --epsilon, charged to the data source's privacy ledger "
        "in the kit's state/ before any record is read (refused when the site policy's lifetime budget would be "
        "exceeded). The ledger's lifetime ε of the data source, the federation's releases included, is the site's "
        "total. Writes OUT/model-personalised.safetensors and OUT/personalised.json, owner-only; nothing leaves "
        "the site.")
    p.add_argument("--kit", required=True, help="this hospital's kit folder (its state/ holds the ledgers)")
    p.add_argument("--data", required=True,
                   help="the site's data, as `medsilo client start --data` names it (the ledger is that source's)")
    p.add_argument("--labels", help="label manifest CSV (default: labels.csv in the DICOM folder)")
    p.add_argument("--checkpoint", required=True, help="the coordinator's global model (.safetensors)")
    p.add_argument("--epsilon", type=float, required=True, help="the personalisation's own ε, e.g. 2")
    p.add_argument("--delta", type=float, default=None, help="its δ (default: the site policy's δ)")
    p.add_argument("--epochs", type=int, default=5, help="DP-SGD epochs over the site's records")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: a quarter of the recipe's DP-SGD rate)")
    p.add_argument("--dataset", default=None, help="the task (default: the checkpoint's)")
    p.add_argument("--model", default=None, help="the model (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="folder for the personalised model (created owner-only)")
    p.set_defaults(func=_cmd_site_personalise)


def _cmd_site_personalise(args: argparse.Namespace) -> int:
    from client.personalise import site_personalise

    path, record = site_personalise(
        kit=args.kit, data=args.data, labels=args.labels, checkpoint=args.checkpoint, epsilon=args.epsilon,
        delta=args.delta, epochs=args.epochs, lr=args.lr, dataset=args.dataset, model=args.model, out=args.out)
    done = record["personalised"]
    print(f"personalised model: {path} (owner-only; the decision threshold is the federation's)")
    print(f"  this personalisation: ε={done['epsilon']:.3f} (δ={done['delta']:g}, {record['accountant']}), "
          f"{done['steps']} DP-SGD steps at σ={done['noise_multiplier']:.3f}, q={done['sample_rate']:.4f}")
    print(f"  data source {record['data_source']}: lifetime ε={done['epsilon_lifetime']:.3f} "
          f"(δ={done['delta_lifetime']:g}), every release from these records composed, the federation's included")
    return 0


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
    from client.site_check import check_source, compute_summary
    from common.datasets import Task, dataset_info
    from common.errors import MedsiloError, Problems
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
    try:
        compute = compute_summary({"workers": args.train_workers, "devices": args.devices})
    except MedsiloError as exc:
        problems.add(str(exc))
    problems.raise_if_any()
    check = check_source(
        args.data, settings, state_dir=args.state_dir, labels=labels,
        classes=info.labels if info else (), multilabel=bool(info and info.task is Task.MULTILABEL),
        workers=args.workers,
    )
    print(check.table())
    print(compute)
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


def show_status(args: argparse.Namespace) -> int:
    """``medsilo status`` with a hospital kit (entry point ``medsilo.status: site``)."""
    from client.status import node_status

    status = node_status(args.kit, Path(args.state_dir) if args.state_dir else None, accountant=args.accountant)
    print(status.to_json() if args.json else "\n".join(status.lines()))
    return 0
