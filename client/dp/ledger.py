"""A site's durable privacy ledger: the DP-SGD history of every run on one dataset, composed across runs.

One append-only JSON-lines file per site and dataset (``ledger-<dataset>.jsonl`` in the node's state folder).
Before a round trains, the node appends a *reservation* of the round's steps (noise multiplier, sample rate,
steps) and fsyncs it; only then does it touch the data. ε is always computed from every reservation, so a
process killed mid-round (even by SIGKILL) has already counted that round: the ledger may over-state what
was spent, never under-state it, and the site never passes its lifetime budget. A completed round appends
its actual steps and ε for the record.

A round asked for again after a coordinator restart (same run, same round) is not charged twice:

- *reserved, never completed* (the node died while training): nothing left the site, so the reservation
  already on file covers the new attempt (:meth:`Ledger.round_state`, ``history(pending=...)``);
- *completed*: the update may have left the site. If the coordinator sends the same global model, the site
  replays the update it computed then (:meth:`Ledger.replay`), which reveals nothing new; a different model
  is a new release and is reserved and charged again.

ε itself comes from Opacus's accountants through :mod:`client.dp.accounting` (pure functions); this module only
reads and writes the file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from client.dp import accounting as privacy
from common.io import append_jsonl, atomic_write_npz, file_stem, read_jsonl, read_npz
from client.dp.accounting import PrivacyPlan


class Ledger:
    """The privacy ledger of one site and one dataset."""

    def __init__(self, folder: Path, dataset: str) -> None:
        self.path = folder / f"ledger-{file_stem(dataset)}.jsonl"
        self._entries: list[dict[str, Any]] | None = None

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, read once per ledger object (this process is the file's only writer meanwhile)."""
        if self._entries is None:
            self._entries = read_jsonl(self.path) if self.path.is_file() else []
        return self._entries

    def _append(self, entry: dict[str, Any]) -> None:
        append_jsonl(self.path, entry)
        self.entries().append(entry)

    def plan(self, run: int) -> PrivacyPlan | None:
        """The plan recorded for ``run``, if any."""
        for e in self.entries():
            if e["kind"] == "plan" and e["run"] == run:
                return PrivacyPlan(float(e["sigma"]), float(e["q"]), int(e["steps_per_round"]),
                                   int(e["planned_steps"]))
        return None

    def record_plan(self, run: int, plan: PrivacyPlan) -> None:
        self._append({"kind": "plan", "run": run, "sigma": plan.noise_multiplier, "q": plan.sample_rate,
                                 "steps_per_round": plan.steps_per_round, "planned_steps": plan.planned_steps,
                                 "time": round(time.time(), 3)})

    def history(self, run: int | None = None, *, pending: tuple[int, int] | None = None) -> list[privacy.HistoryEntry]:
        """Every reserved round (of ``run``, or of all runs): the accountant's history.

        ``pending=(run, round)`` leaves out that round's open reservation (reserved, never completed), which
        the caller is about to train under: it is counted once, by the caller's projection.
        """
        skip = self._open_reservation(*pending) if pending else None
        return [
            (float(e["sigma"]), float(e["q"]), int(e["steps"]))
            for i, e in enumerate(self.entries())
            if e["kind"] == "reserve" and (run is None or e["run"] == run) and i != skip
        ]

    def _open_reservation(self, run: int, server_round: int) -> int | None:
        """Index of the reservation of ``(run, round)`` that no completion followed, if any."""
        open_at = None
        for i, e in enumerate(self.entries()):
            if e["run"] == run and e.get("round") == server_round:
                if e["kind"] == "reserve":
                    open_at = i
                elif e["kind"] == "complete":
                    open_at = None
        return open_at

    def round_state(self, run: int, server_round: int) -> str:
        """``"new"``, ``"reserved"`` (open reservation: trained partly or not at all) or ``"completed"``."""
        state = "new"
        for e in self.entries():
            if e["run"] == run and e.get("round") == server_round and e["kind"] in ("reserve", "complete"):
                state = "reserved" if e["kind"] == "reserve" else "completed"
        return state

    @property
    def _replay_path(self) -> Path:
        return self.path.with_name(self.path.stem.replace("ledger-", "replay-", 1) + ".npz")

    def keep_for_replay(self, run: int, server_round: int, model_digest: str, update: list[np.ndarray],
                        num_examples: int, metrics: dict[str, Any]) -> None:
        """Keep the last completed round's update on the node (it never leaves except as already sent)."""
        meta = {"run": run, "round": server_round, "model_sha256": model_digest, "num_examples": num_examples,
                "metrics": metrics}
        atomic_write_npz(self._replay_path, {f"u{i:04d}": np.asarray(u) for i, u in enumerate(update)}, meta)

    def replay(self, run: int, server_round: int,
               model_digest: str) -> tuple[list[np.ndarray], int, dict[str, Any]] | None:
        """The kept update of ``(run, round)`` computed from the model ``model_digest``, if that is the one kept."""
        if not self._replay_path.is_file():
            return None
        meta, arrays = read_npz(self._replay_path)
        if (meta["run"], meta["round"], meta["model_sha256"]) != (run, server_round, model_digest):
            return None
        return [arrays[k] for k in sorted(arrays)], int(meta["num_examples"]), dict(meta["metrics"])

    def reserve(self, run: int, server_round: int, entry: privacy.HistoryEntry) -> None:
        """Durably count a round's steps as spent before it trains."""
        sigma, q, steps = entry
        self._append({"kind": "reserve", "run": run, "round": server_round, "sigma": sigma, "q": q,
                                 "steps": steps, "time": round(time.time(), 3)})

    def complete(self, run: int, server_round: int, *, steps: int, epsilon_run: float,
                 epsilon_lifetime: float) -> None:
        self._append({"kind": "complete", "run": run, "round": server_round, "steps": steps,
                                 "epsilon_run": epsilon_run, "epsilon_lifetime": epsilon_lifetime,
                                 "time": round(time.time(), 3)})

    def spent(self, *, delta: float, accountant: str, run: int | None = None) -> float:
        """ε of the reserved history (of ``run`` or of the site's lifetime on this dataset)."""
        history = self.history(run)
        return privacy.epsilon_spent(history=history, delta=delta, accountant=accountant) if history else 0.0

    def summary(self, *, delta: float, accountant: str) -> dict[str, Any]:
        runs = sorted({int(e["run"]) for e in self.entries() if e["kind"] == "reserve"})
        return {
            "dataset_file": self.path.name,
            "runs": len(runs),
            "rounds": len(self.history()),
            "epsilon_lifetime": self.spent(delta=delta, accountant=accountant),
            "per_run": {r: self.spent(delta=delta, accountant=accountant, run=r) for r in runs},
        }
