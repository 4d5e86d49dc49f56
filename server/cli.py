"""The coordinator's commands: ``provision``, ``server start|run|sync``, ``export``, ``report``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the coordinator's sub-commands to ``medsilo``'s parser (entry point ``medsilo.commands: server``)."""
    _provision_parser(sub)
    _server_parser(sub)
    _export_parser(sub)
    _report_parser(sub)


def _provision_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision",
        help="create a federation's CA, the coordinator's TLS identity and one startup kit per hospital",
        description=(
            "medsilo provision FEDERATION.toml --out KITS creates the federation (CA, SuperLink certificate with "
            "the coordinator's names as SANs, node authentication keys, one kit per hospital, each with its "
            "systemd unit and COMMANDS.md). With --add-site or --revoke-site it changes an existing kits folder; "
            "FEDERATION.toml --renew re-issues the SuperLink's certificate from the CA (no node key changes). "
            "Private keys are written 0600; nothing is overwritten."
        ),
    )
    p.add_argument("federation", nargs="?", help="federation TOML (to create a new federation)")
    p.add_argument("--out", required=True, help="kits folder (created; must not exist or be empty)")
    p.add_argument("--add-site", metavar="NAME", help="add a hospital to the federation provisioned in --out")
    p.add_argument("--revoke-site", metavar="NAME", help="revoke a hospital's node key in --out")
    p.add_argument("--renew", action="store_true",
                   help="with FEDERATION.toml: re-issue the SuperLink's TLS certificate in --out (same names and key; "
                        "needs the CA key back in KITS/ca/ for the moment)")
    p.add_argument("--days", type=int, help="with --renew: validity in days (default: the federation's cert_days)")
    p.add_argument("--epsilon", type=float, default=8.0,
                   help="with --add-site: the site's ε per run (its policy's epsilon-per-run; epsilon-lifetime "
                        "defaults to 3 x this)")
    p.add_argument("--delta", type=float, default=1e-5, help="with --add-site: the site's δ template")
    p.set_defaults(func=_cmd_provision)


def _cmd_provision(args: argparse.Namespace) -> int:
    from common.errors import ConfigError, Problems
    from server import provision
    from server.federation import SiteSpec, load_federation, parse_site

    actions = [a for a in (args.federation, args.add_site, args.revoke_site) if a]
    if len(actions) != 1:
        raise ConfigError(["give exactly one of FEDERATION.toml, --add-site NAME or --revoke-site NAME"])
    if args.renew and not args.federation:
        raise ConfigError(["--renew needs FEDERATION.toml: the certificate is re-issued for the names it lists"])
    if args.federation and args.renew:
        spec = load_federation(args.federation)
        cert = provision.renew_server_certificate(args.out, days=args.days or spec.cert_days, spec=spec)
        print(f"renewed {cert}; copy it into the coordinator's kit and restart the SuperLink (`medsilo server start` "
              "or its service); hospitals change nothing. Take the CA key offline again.")
        return 0
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
    run = ssub.add_parser(
        "run", help="launch a run with `flwr run`, follow its log, and exit non-zero when it failed",
        description="Submits the app (a medsilo checkout) to this kit's SuperLink with the -c overrides, streams "
                    "the run's log, then asks the SuperLink how the run ended. Exit 0: completed with at least one "
                    "aggregated round; 1: failed or nothing aggregated (the reasons are printed). Flower's own "
                    "`flwr run --stream` exits 0 either way.")
    run.add_argument("--kit", required=True, help="the coordinator kit folder")
    run.add_argument("--app", default=".", help="the medsilo checkout to launch (default: the current folder)")
    run.add_argument("-c", "--run-config", action="append", default=[], metavar="'K=V ...'",
                     help="run settings, as for `flwr run -c` (repeatable), e.g. \"dataset='pneumoniamnist' "
                          "out-dir='/srv/medsilo/runs/r1'\"")
    run.set_defaults(func=_cmd_server_run)
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
        print(f"medsilo: launch a run from a medsilo checkout with:\n  medsilo server run --kit {kit.root.absolute()} "
              "-c \"dataset='pneumoniamnist' out-dir='/srv/medsilo/runs/r1'\"", flush=True)
        assert link.process is not None
        code = link.process.wait()
        return 0 if code in (0, -2, -15) else 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM / SIGHUP (common.processes.Stopped)
        print(f"medsilo: {stop or 'interrupted'}; stopping the SuperLink and every process it started", flush=True)
        return 0
    finally:
        link.stop()


def _cmd_server_run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from server.launch import launch
    from server.superlink import load_kit

    outcome = launch(load_kit(args.kit), app=Path(args.app).absolute(), overrides=args.run_config, echo=sys.stdout)
    for line in outcome.lines():
        print(f"medsilo: {line}", flush=True)
    return 0 if outcome.ok else 1


def _cmd_server_sync(args: argparse.Namespace) -> int:
    from server.superlink import load_kit, sync

    changes = sync(load_kit(args.kit))
    print(f"registered: {', '.join(changes['registered']) or 'none'}; unregistered: "
          f"{', '.join(changes['unregistered']) or 'none'}; unchanged: {', '.join(changes['unchanged']) or 'none'}")
    return 0


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


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="build summary.json, report.md, report.html and plots for a coordinator's run folder",
        description="Reads only what the coordinator holds (run_config.json, metrics.jsonl, federated.json, the "
                    "checkpoint's metadata): the sites' federated validation per round, participation per site, "
                    "ε per site, the selected round. No dataset is needed. (`medsilo simulate` writes its own.)")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="the run's out-dir (holds run_config.json, metrics.jsonl, federated.json)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.report import build_deployment_report, headline

    summary = build_deployment_report(Path(args.run_dir))
    print(headline(summary, Path(args.run_dir)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from server.export import export_run

    card = export_run(args.run, args.out, checkpoint=args.checkpoint)
    print(f"exported {card.name} to {args.out}: {', '.join(card.files)}, model-card.json, model-card.md")
    return 0


def show_status(args: argparse.Namespace) -> int:
    """``medsilo status`` with a coordinator kit (entry point ``medsilo.status: coordinator``)."""
    from common.errors import ConfigError
    from server.status import coordinator_status

    if args.state_dir:
        raise ConfigError(["--state-dir is a hospital node's; a coordinator kit keeps its state in the kit"])
    status = coordinator_status(args.kit)
    print(status.to_json() if args.json else "\n".join(status.lines()))
    return 0
