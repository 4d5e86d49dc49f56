"""The ``medsilo`` command line: the shared frame that the roles' commands plug into.

Each role registers its own commands (``server.cli``, ``client.cli``, ``simulations.cli``) through the
distribution's ``medsilo.commands`` entry points, so this module knows neither side: it parses, configures
logging, turns SIGTERM/SIGHUP into the same clean stop as Ctrl-C, and prints medsilo's errors without a traceback.
Built in: ``datasets`` and ``audit verify`` (both need only ``common``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from common.errors import MedsiloError
from common.processes import stop_signals_interrupt

#: The entry-point group through which a role registers its sub-commands: ``register(subparsers) -> None``.
COMMANDS_GROUP = "medsilo.commands"
#: The order the roles' commands are listed in ``medsilo --help``.
ROLE_ORDER = ("simulations", "server", "client")


def role_registrars() -> list[tuple[str, Callable[[argparse._SubParsersAction], None]]]:
    """Each installed role's ``register`` function, in :data:`ROLE_ORDER`.

    Raises
    ------
    MedsiloError
        No role is registered: the package metadata is missing (the fix: reinstall medsilo).

    """
    found = {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}
    if not found:
        raise MedsiloError("no medsilo commands are registered (package metadata missing); reinstall medsilo with "
                           "`pip install -e .` in the checkout, or `make setup`")
    ordered = sorted(found, key=lambda n: (ROLE_ORDER.index(n) if n in ROLE_ORDER else len(ROLE_ORDER), n))
    return [(name, found[name].load()) for name in ordered]


def build_parser() -> argparse.ArgumentParser:
    """The ``medsilo`` argument parser with every role's sub-commands."""
    parser = argparse.ArgumentParser(prog="medsilo", description="Federated learning for hospitals.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, register in role_registrars():
        register(sub)
    _audit_parser(sub)
    _status_parser(sub)
    d = sub.add_parser("datasets", help="list the datasets medsilo knows (MedMNIST, MSD hippocampus)")
    d.set_defaults(func=_cmd_datasets)
    return parser


#: The entry-point group through which a role shows the status of its kit: ``status(args) -> exit code``, named
#: by the kit's role (``kit.toml``: ``[kit] role``).
STATUS_GROUP = "medsilo.status"


def _status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="a kit's state: the coordinator's sites, connections, runs and certificate, or a node's "
                       "connection, approved code, policy and ε per data source",
        description="With a coordinator kit: every hospital registered (connected, last seen), the runs, the "
                    "SuperLink's certificate expiry. With a hospital kit: whether the node joined, the code it runs "
                    "and the app digests its policy approves, the policy in force, ε spent and remaining per data "
                    "source. Read-only.")
    p.add_argument("--kit", required=True, help="a coordinator kit or a hospital kit folder")
    p.add_argument("--state-dir", help="hospital: the node's state folder (default: the kit's state/)")
    p.add_argument("--accountant", default="prv", choices=("prv", "rdp"), help="hospital: the ledger's accountant")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from common.io import read_toml

    kit_file = Path(args.kit) / "kit.toml"
    role = str(read_toml(kit_file, missing="give a folder `medsilo provision` wrote (kits/coordinator or "
                                           "kits/<hospital>)").get("kit", {}).get("role", ""))
    providers = {ep.name: ep for ep in entry_points(group=STATUS_GROUP)}
    if role not in providers:
        raise ConfigError([f"{kit_file}: role {role!r} has no status (known: {', '.join(sorted(providers))}); "
                           "give a coordinator or hospital kit"])
    show: Callable[[argparse.Namespace], int] = providers[role].load()
    return show(args)


def _cmd_datasets(args: argparse.Namespace) -> int:
    from common.datasets import CATALOG

    for info in CATALOG.values():
        print(f"{info.name:16s} {info.spatial_dims}D {info.channels}ch {info.task.value:26s} "
              f"{len(info.labels):2d} labels  train/val/test {info.n_train}/{info.n_val}/{info.n_test}")
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
