"""Live progress of a federated run: one line per round in the terminal (rich) and TensorBoard scalars.

The coordinator's strategy hands every finished round's ``metrics.jsonl`` line to
:meth:`RoundProgress.round_finished`, in simulation (``medsilo simulate``) and in deployment alike.
TensorBoard event files go to ``<run folder>/tensorboard`` (``tensorboard --logdir RUN/tensorboard``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class RoundProgress:
    """Prints each round as it finishes and writes its metrics as TensorBoard scalars.

    Parameters
    ----------
    rounds
        Planned number of rounds (for ``round r/R``).
    epsilon
        Each site's ε budget for the run, or ``None`` without DP.
    tensorboard_dir
        Folder for TensorBoard event files, or ``None`` for none.
    stream
        Where the terminal lines go (standard error by default, beside Flower's log).

    """

    def __init__(self, *, rounds: int, epsilon: float | None, tensorboard_dir: Path | None,
                 stream: TextIO | None = None) -> None:
        self.rounds = rounds
        self.epsilon = epsilon
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.writer: Any = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def round_finished(self, line: dict[str, Any]) -> None:
        """Report one ``metrics.jsonl`` line (round 0 is the initial model)."""
        r = int(line["round"])
        test = line.get("test") or {}
        val = line.get("val") or {}
        privacy = line.get("privacy") or []
        eps = [p["epsilon"] for p in privacy if _num(p.get("epsilon")) is not None]
        dropped = int(line.get("sites_failed", 0)) + len(line.get("refused", []))
        text = Text.assemble(
            ("round ", "bold"), (f"{r}/{self.rounds}", "bold cyan"), "  sites ",
            (f"{line.get('sites_answered', 0)}/{line.get('sites_sampled', 0)}", "green"), " answered, ",
            (f"{dropped}", "red" if dropped else "dim"), " dropped/refused  loss ",
            _fmt(line.get("train_loss")), "  val AUC ", (_fmt(val.get("auc")), "bold"), "  test AUC ",
            (_fmt(test.get("auc")), "bold"), "  ε max ",
            (f"{max(eps):.2f}" if eps else "-", "magenta"),
            f" / {self.epsilon:g}" if self.epsilon else "",
        )
        self.console.print(text)
        if self.writer is None:
            return
        scalars = {
            "sites/answered": line.get("sites_answered"), "sites/dropped": line.get("sites_failed"),
            "sites/refused": len(line.get("refused", [])), "train/loss": line.get("train_loss"),
            "val/auc": val.get("auc"), "val/threshold": val.get("threshold"),
            **{f"test/{k}": test.get(k) for k in ("auc", "balanced_accuracy", "sensitivity", "specificity")},
            **{f"epsilon/{p['site']}": p.get("epsilon") for p in privacy},
            **{f"val_auc/{s['site']}": s.get("auc") for s in line.get("val_sites", []) if "site" in s},
        }
        for tag, value in scalars.items():
            number = _num(value)
            if number is not None:
                self.writer.add_scalar(tag, number, global_step=r)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _fmt(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.4f}"
