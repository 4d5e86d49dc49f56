"""Personalised models in a simulation: each site fine-tunes the federated model on its own records under DP.

Each simulated hospital does what ``medsilo site personalise`` does at a deployed node (:mod:`client.personalise`):
the federation's reported model (best on federated validation), fine-tuned with the site's DP-SGD on its training
records, charged first to the site's own ledger (``sites/site-NN-state``) as a run of its own, within the
personalisation ε; its randomness is the site's (the OS's entropy, or seeded with ``--reproducible``). The model is
then scored on the official test split as the local-only references are, with the federated model's decision
threshold (binary) or rule (multi-class, ordinal), as a deployed node's personalised model keeps it: chosen from the
sites' DP validation releases, so the personalised model with its decision rule is covered by the ε reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.data import load_site_data
from client.dp.budget import Refused
from client.dp.ledger import Ledger, data_source
from client.dp.rng import os_entropy, reproducible
from client.personalise import DEFAULT_EPOCHS, load_global_model, personalisation_config, personalise
from client.policy import site_policy, state_dir
from common.config import RunConfig
from common.datasets import Task
from common.features import CACHE_FOLDER, FeatureCache
from common.metrics import Decision
from server.evaluation import TestSet

log = logging.getLogger("medsilo")


@dataclass(frozen=True)
class PersonaliseSpec:
    """``--personalise-epsilon`` and friends: the personalisation budget per site and its training."""

    epsilon: float
    epochs: int = DEFAULT_EPOCHS
    lr: float | None = None

    def problems(self, *, dp: bool) -> list[str]:
        """Every problem with these settings, as one-line messages naming the flag and the fix."""
        out = []
        if not self.epsilon > 0:
            out.append(f"--personalise-epsilon {self.epsilon}: expected ε > 0, e.g. 2")
        if self.epochs < 1:
            out.append(f"--personalise-epochs {self.epochs}: expected at least 1, e.g. {DEFAULT_EPOCHS}")
        if self.lr is not None and not self.lr > 0:
            out.append(f"--personalise-lr {self.lr}: expected a learning rate > 0")
        if not dp:
            out.append("--personalise-epsilon fine-tunes under DP-SGD at each site: drop --no-dp, or drop "
                       "--personalise-epsilon")
        return out


def guarantee_text(spec: PersonaliseSpec, delta: float) -> str:
    """The privacy statement of a simulation's personalised models, for the report and ``summary.json``."""
    return (f"each personalised model is (ε={spec.epsilon:g}, δ={delta:g})-DP with respect to its site's training "
            "records (a run of its own in the site's ledger: the record count released once by a Gaussian "
            "mechanism, then DP-SGD steps with σ calibrated so that both spend exactly that ε); the site's total "
            "over the federation and the personalisation is their composition in the same accountant, the "
            "ledger's lifetime ε of the site's data source (the table's ε site total)")


def personalise_sites(run_dir: Path, config: RunConfig, *, sites: int, test_set: TestSet, spec: PersonaliseSpec,
                      federated: dict[str, Any], reproducible_seed: int | None = None) -> list[dict[str, Any]]:
    """Fine-tune the federation's reported model at every simulated site; one result row per site.

    ``config`` is the federation's (its ``site_data_dir`` holds the sites' files and state folders); ``federated``
    the reported model's test metrics, whose ``threshold`` and ``decision`` the personalised models keep. Each row has
    the site, its training records, the test metrics, and ``privacy``
    (:meth:`client.personalise.Personalised.record`); a site whose policy refuses has ``refused`` (the reason).
    """
    checkpoint = run_dir / "model-best.safetensors"
    threshold = float(federated.get("threshold", 0.5))
    rule = federated.get("decision") or {}
    multiclass = test_set.info.task in (Task.MULTICLASS, Task.ORDINAL)
    decision = Decision.from_meta(rule) if multiclass else None
    run_config = config.to_flower()
    tuning = personalisation_config(config, epsilon=spec.epsilon, epochs=spec.epochs, lr=spec.lr)
    rows = []
    for site in range(sites):
        node_config = {"partition-id": site}
        folder = state_dir(node_config, run_config)
        assert folder is not None  # a simulated site always has one
        policy = site_policy(node_config, run_config)
        randomness = (os_entropy() if reproducible_seed is None
                      else reproducible(seed=reproducible_seed + 7_919, site=site))  # not the federation's streams
        model, _ = load_global_model(checkpoint, tuning, test_set.info)
        data = load_site_data(node_config, config)
        features = FeatureCache(folder / CACHE_FOLDER)
        try:
            done = personalise(model, data, tuning, ledger=Ledger(folder, data_source(node_config, run_config)),
                               policy=policy, randomness=randomness, features=features)
        except Refused as refusal:  # the site's rules: reported, the other sites go on
            log.warning("%s refuses to personalise: %s", data.name, refusal)
            rows.append({"site": data.name, "n_train": len(data.train), "refused": str(refusal)})
            continue
        test = test_set.metrics(test_set.scores(model), threshold=threshold, with_ci=True, seed=config.seed,
                                decision=decision)
        rows.append({"site": data.name, "n_train": len(data.train), **test, "privacy": done.record()})
    return rows
