"""A site's SCAFFOLD control variate ``c_i``, kept on its own disk between rounds.

Flower keeps ``c_i`` in the node's ``context.state``, which a restarted node (or a resumed run) has lost.
Without it the site would step uncorrected for a round, and a resumed run would differ from an
uninterrupted one. So every site, with DP-SGD or without, also writes the ``c_i`` it sent to a file in its
state folder, and reads it back when ``context.state`` has none.

``c_i`` is the mean gradient the site stepped on (under DP-SGD, of its clipped and noised gradients): a
value derived from the site's records, kept beside its ledger and feature cache and never sent again.
The file keeps the two latest rounds, so a round that is trained again (the node died after writing
round ``r``'s ``c_i``, before the coordinator got the reply) starts from round ``r - 1``'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.io import atomic_write_npz, file_stem, private_dir, read_npz

#: The store's folder in a node's state folder.
STORE_FOLDER = "scaffold"

#: Runs whose ``c_i`` a store keeps per dataset, the most recently trained; older runs' files are removed (a
#: ResNet-18's ``c_i`` of two rounds takes about 90 MB). A run resumed after that many others steps uncorrected
#: for one round.
KEPT_RUNS = 4


class ControlStore:
    """``c_i`` of each run, per round, in ``folder`` (one ``.npz`` file per dataset and run, :data:`KEPT_RUNS` runs).

    Parameters
    ----------
    folder
        The store's folder, inside the node's state folder (created on first write).
    dataset
        The dataset the runs train on (part of each file's name, as for the ledger).

    """

    def __init__(self, folder: Path, dataset: str) -> None:
        self.folder = Path(folder)
        self.dataset = file_stem(dataset)

    def _path(self, run: int) -> Path:
        return self.folder / f"{self.dataset}-run-{run}.npz"

    def _rounds(self, run: int) -> dict[int, list[np.ndarray]]:
        path = self._path(run)
        if not path.is_file():
            return {}
        counts, arrays = read_npz(path)
        return {int(r): [arrays[f"r{r}_{i:04d}"] for i in range(n)] for r, n in counts.items()}

    def save(self, run: int, server_round: int, control: list[np.ndarray]) -> None:
        """Keep ``control`` as ``run``'s ``c_i`` after ``server_round``, with the latest earlier round's."""
        earlier = {r: c for r, c in self._rounds(run).items() if r < server_round}
        kept = {r: earlier[r] for r in sorted(earlier)[-1:]}
        kept[server_round] = control
        arrays = {f"r{r}_{i:04d}": np.asarray(a) for r, c in kept.items() for i, a in enumerate(c)}
        private_dir(self.folder)  # c_i is derived from the site's records: folder 0700, files 0600
        atomic_write_npz(self._path(run), arrays, {str(r): len(c) for r, c in kept.items()})
        runs = sorted(self.folder.glob(f"{self.dataset}-run-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in runs[KEPT_RUNS:]:
            if old != self._path(run):
                old.unlink(missing_ok=True)

    def load(self, run: int, *, before_round: int) -> list[np.ndarray] | None:
        """``run``'s ``c_i`` after its latest kept round before ``before_round``; ``None`` if none is kept."""
        rounds = {r: c for r, c in self._rounds(run).items() if r < before_round}
        return rounds[max(rounds)] if rounds else None
