"""The coordinator's commands: ``provision``, ``server start|sync``, ``export``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the coordinator's sub-commands to ``medsilo``'s parser (entry point ``medsilo.commands: server``)."""
    _provision_parser(sub)
    _server_parser(sub)
    _export_parser(sub)


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
