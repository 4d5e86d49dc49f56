"""Launching a run on the coordinator's SuperLink and reporting how it ended, as an exit status.

Flower's ``flwr run --stream`` exits 0 whatever happened to the run. ``medsilo server run`` submits the run with
``flwr run``, follows its log with ``flwr log --stream``, then asks the SuperLink for the run's final status
(``flwr ls --run-id``): a run that failed (every hospital refused, no secure sum had enough sites, a config error)
gives a non-zero exit, with the reasons the ServerApp wrote in ``federated.json`` when the run folder is on this
machine. A scheduler or a script can then trust the exit status.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flwr.common.config import parse_config_args

from common.errors import ConfigError
from common.processes import pump, stop_tree
from server.superlink import CoordinatorKit, SuperLinkError, flower_env, flwr_command, flwr_json

#: The SuperLink's status of a run that ended well (``flwr ls``).
COMPLETED = "finished:completed"


@dataclass(frozen=True)
class RunOutcome:
    """How a launched run ended."""

    run_id: int
    status: str
    details: str
    out_dir: Path | None
    why_not_aggregated: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The run completed and at least one round was aggregated."""
        return self.status == COMPLETED and not self.why_not_aggregated

    def lines(self) -> list[str]:
        """What the coordinator reads at the end of ``medsilo server run``."""
        where = f"; outputs in {self.out_dir}" if self.out_dir else ""
        head = f"run {self.run_id}: {self.status}{where}"
        lines = [head + (f" ({self.details})" if self.details else "")]
        lines += [f"  not aggregated: {reason}" for reason in self.why_not_aggregated]
        return lines


def out_dir_of(overrides: list[str]) -> Path | None:
    """The ``out-dir`` a run's ``-c`` overrides name, if any (where ``federated.json`` is written).

    Parsed by Flower's own ``-c`` parser, as ``flwr run`` parses them; overrides it cannot parse name no folder.
    """
    try:
        values = parse_config_args(overrides)
    except (ValueError, TypeError):
        return None
    out = values.get("out-dir")
    return Path(str(out)) if out else None


def submit(kit: CoordinatorKit, app: Path, overrides: list[str]) -> int:
    """Submit the app at ``app`` with the ``-c`` overrides; returns the run id.

    Raises
    ------
    ConfigError
        ``app`` is not a Flower app folder.
    SuperLinkError
        The SuperLink refused the run or cannot be reached; the message is Flower's.

    """
    if not (app / "pyproject.toml").is_file():
        raise ConfigError([f"--app {app}: no pyproject.toml there; give the medsilo checkout (or app folder) that "
                           "the coordinator launches runs from"])
    args = ["run", str(app)]
    for text in overrides:
        args += ["-c", text]
    out = flwr_json(kit, *args)
    if not out.get("success") or out.get("run-id") is None:
        raise SuperLinkError(f"the SuperLink did not start the run: {out.get('error-message', out)}; is "
                             "`medsilo server start` running for this kit?")
    return int(out["run-id"])


def run_status(kit: CoordinatorKit, run_id: int) -> tuple[str, str]:
    """The SuperLink's ``(status, details)`` of run ``run_id``."""
    out = flwr_json(kit, "ls", "--run-id", str(run_id))
    runs: list[dict[str, Any]] = out.get("runs", []) if out.get("success") else []
    if not runs:
        raise SuperLinkError(f"the SuperLink does not list run {run_id}: {out.get('error-message', out)}")
    details = str(runs[0].get("status-details", "") or "")
    return str(runs[0].get("status", "")), "" if details.upper() in ("N/A", "NONE") else details


def follow(kit: CoordinatorKit, run_id: int, echo: IO[str]) -> None:
    """Copy the run's log to ``echo`` until Flower reports every line retrieved (the run ended)."""
    proc = subprocess.Popen([flwr_command(), "log", str(run_id), kit.federation, "--stream"], env=flower_env(kit),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    assert proc.stdout is not None
    copier = pump(proc.stdout, echo)
    try:
        proc.wait()
    finally:
        if proc.poll() is None:
            stop_tree(proc, timeout=10)
        copier.join(timeout=5)


def wait_finished(kit: CoordinatorKit, run_id: int, *, poll_s: float = 2.0) -> tuple[str, str]:
    """The run's final ``(status, details)``, asking the SuperLink until the run has finished."""
    while True:
        status, details = run_status(kit, run_id)
        if status.startswith("finished"):
            return status, details
        time.sleep(poll_s)


def launch(kit: CoordinatorKit, *, app: Path, overrides: list[str], echo: IO[str]) -> RunOutcome:
    """Submit a run, follow its log and return how it ended (see :class:`RunOutcome`)."""
    run_id = submit(kit, app, overrides)
    print(f"medsilo: run {run_id} submitted to '{kit.federation}'; following its log", file=echo, flush=True)
    try:
        follow(kit, run_id, echo)
        status, details = wait_finished(kit, run_id)
    except KeyboardInterrupt as stop:  # Ctrl-C stops following; the run itself goes on at the SuperLink
        raise KeyboardInterrupt(f"{stop or 'interrupted'}; run {run_id} goes on at the SuperLink (stop it with "
                                f"`FLWR_HOME={kit.flwr_home} flwr stop {run_id} {kit.federation}`)") from None
    out_dir = out_dir_of(overrides)
    reasons: tuple[str, ...] = ()
    summary = out_dir / "federated.json" if out_dir else None
    if summary is not None and summary.is_file():
        data = json.loads(summary.read_text())
        if not data.get("aggregated_rounds", 1):
            reasons = tuple(str(r) for r in data.get("why_not_aggregated", ["no round was aggregated"]))
    return RunOutcome(run_id=run_id, status=status, details=details, out_dir=out_dir, why_not_aggregated=reasons)
