"""Live progress of a federated run: one line per round in the terminal (rich) and TensorBoard scalars.

The coordinator's strategy hands every finished round's ``metrics.jsonl`` line to
:meth:`RoundProgress.round_finished`, in simulation (``medsilo simulate``) and in deployment alike.
TensorBoard event files go to ``<run folder>/tensorboard`` (``tensorboard --logdir RUN/tensorboard``).

The round line (:func:`round_parts`, also the coordinator's log line) names every site that refused, failed or
went silent, counts the contributors (the sites whose update is in the aggregate), and prints ``n/a`` for a
metric the round does not have.
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


def _names(entries: list[Any], *, with_stage: bool = False) -> str:
    names = []
    for e in entries:
        if not isinstance(e, dict):
            names.append(str(e))
            continue
        name = e.get("site") or (f"node {e['node_id']}" if e.get("node_id") is not None else "a site")
        names.append(f"{name} ({e['stage']})" if with_stage and e.get("stage") else str(name))
    return ", ".join(names)


def participation_parts(line: dict[str, Any]) -> list[tuple[str, str]]:
    """Who took part in the round of a ``metrics.jsonl`` line, as (text, rich style) pieces."""
    r, sampled = int(line["round"]), int(line.get("sites_sampled") or 0)
    if r == 0:
        return [("initial model", "dim")]
    if sampled == 0:
        return [("no site was asked to train", "red")]
    answered = int(line.get("sites_answered") or 0)
    parts = [("sites ", ""), (f"{answered}/{sampled}", "green" if answered else "red"), (" contributed", "")]
    if line.get("halted_stage"):
        parts.append((f" (not aggregated: secure aggregation stopped at the {line['halted_stage']} stage)", "red"))
    failed = line.get("failed")
    if failed is None and line.get("sites_failed"):  # a line written before sites were named
        failed = [{"site": f"{line['sites_failed']} site(s)"}]
    for label, entries, style, stage in (("refused", line.get("refused"), "yellow", False),
                                         ("failed", failed, "red", True),
                                         ("dropped", line.get("dropped"), "red", True)):
        if entries:
            parts += [(f"  {label}: ", ""), (_names(entries, with_stage=stage), style)]
    return parts


def round_parts(line: dict[str, Any], *, rounds: int, epsilon: float | None) -> list[tuple[str, str]]:
    """The whole round line of a ``metrics.jsonl`` line as (text, rich style) pieces."""
    test, val = line.get("test") or {}, line.get("val") or {}
    key = "dice_mean" if "dice_mean" in val or "dice_mean" in test else "auc"
    label = "Dice" if key == "dice_mean" else "AUC"
    defined = val.get("auc_defined", val.get("dice_defined", 1)) and val.get("sites", 1)
    eps = [float(p["epsilon"]) for p in line.get("privacy") or [] if _num(p.get("epsilon")) is not None]
    stale = [p["site"] for p in line.get("privacy") or [] if p.get("stale")]
    parts = [("round ", "bold"), (f"{int(line['round'])}/{rounds}", "bold cyan"), ("  ", ""),
             *participation_parts(line)]
    if _num(line.get("train_loss")) is not None:
        parts += [("  loss ", ""), (_fmt(line.get("train_loss")), "")]
    parts += [(f"  val {label} ", ""), (_fmt(val.get(key) if defined else None), "bold")]
    if test:  # only with the optional central test set (server-eval)
        parts += [(f"  test {label} ", ""), (_fmt(test.get(key)), "bold")]
    if eps:
        parts += [("  ε max ", ""), (f"{max(eps):.2f}", "magenta"), (f" / {epsilon:g}" if epsilon else "", "")]
    if stale:
        parts += [("  ε stale: ", ""), (", ".join(stale), "magenta")]
    return parts


def round_text(line: dict[str, Any], *, rounds: int, epsilon: float | None) -> str:
    """The round line as plain text (the coordinator's log)."""
    return "".join(text for text, _ in round_parts(line, rounds=rounds, epsilon=epsilon))


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
        self.console.print(Text.assemble(*round_parts(line, rounds=self.rounds, epsilon=self.epsilon)))
        if self.writer is None:
            return
        scalars = {
            "sites/answered": line.get("sites_answered"), "sites/failed": line.get("sites_failed"),
            "sites/dropped": len(line.get("dropped") or []), "sites/refused": len(line.get("refused") or []),
            "train/loss": line.get("train_loss"), "val/auc": val.get("auc"), "val/threshold": val.get("threshold"),
            **{f"test/{k}": test.get(k) for k in ("auc", "balanced_accuracy", "sensitivity", "specificity")},
            **{f"epsilon/{p['site']}": p.get("epsilon") for p in privacy if not p.get("stale")},
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
    return "n/a" if number is None else f"{number:.4f}"
