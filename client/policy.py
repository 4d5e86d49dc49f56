"""Where a node's site policy and state live, read without importing torch (the SecAgg+ stages use it).

Everything here comes from the node config, which the hospital writes (``medsilo client start``), never from the
run config the coordinator writes, with one exception: a site simulated by Flower's simulation engine (its node
config carries ``partition-id``, which a hospital's never does) finds its data, state and policy under the run's
``site-data-dir``, because in a simulation the researcher plays every part.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.pacs import is_dicomweb
from common.site_policy import DEFAULT_POLICY, SitePolicy, load_policy

log = logging.getLogger(__name__)

#: What a node without a policy file logs at every request (loudly: it should have one).
NO_POLICY_WARNING = (
    "THIS NODE HAS NO SITE POLICY (no policy-path in its node config): it applies the template's rules (DP and "
    "secure aggregation required, ε per run {per_run:g}, lifetime {lifetime:g}, cohort of at least {cohort} "
    "sites). Start it with `medsilo client start --kit KIT`, which passes the kit's site-policy.toml."
)


def simulated(node_config: Mapping[str, Any]) -> bool:
    """Whether this node is a site of a simulation (Flower's simulation engine sets ``partition-id``)."""
    return "partition-id" in node_config


def state_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path | None:
    """Where this node keeps its ledger and audit log: ``state-dir`` (deployment) or beside the site's data."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    data_dir = str(run_config.get("site-data-dir", ""))
    if data_dir and simulated(node_config):
        return Path(data_dir) / f"site-{int(node_config['partition-id']):02d}-state"
    if "data-path" in node_config and not is_dicomweb(str(node_config["data-path"])):  # a URL names no folder
        path = Path(str(node_config["data-path"]))
        return path.with_name(path.stem + "-state")
    return None


def site_policy(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SitePolicy | None:
    """The policy this node enforces; ``None`` only for a simulated site whose researcher gave it none.

    The hospital's file (``policy-path`` in the node config; ``site-policy.toml`` beside simulated sites), with
    ``require-secure-aggregation`` lifted when the node was started with ``allow-unmasked-updates=true``
    (``medsilo client start --allow-unmasked-updates``). A deployed node without a policy file applies
    :data:`~common.site_policy.DEFAULT_POLICY` and says so loudly (fail closed).
    """
    if "policy-path" in node_config:
        policy = load_policy(str(node_config["policy-path"]))
    elif simulated(node_config):
        data_dir = str(run_config.get("site-data-dir", ""))
        if not (data_dir and (Path(data_dir) / "site-policy.toml").is_file()):
            return None
        policy = load_policy(Path(data_dir) / "site-policy.toml")
    else:
        policy = DEFAULT_POLICY
        log.warning(NO_POLICY_WARNING.format(per_run=policy.epsilon_per_run, lifetime=policy.epsilon_lifetime,
                                             cohort=policy.min_cohort))
    if flag(node_config, "allow-unmasked-updates"):
        policy = dataclasses.replace(policy, require_secure_aggregation=False)
    return policy


def flag(node_config: Mapping[str, Any], key: str) -> bool:
    """A boolean node-config value (``true``/``1``/``yes``)."""
    return str(node_config.get(key, "false")).strip().lower() in ("1", "true", "yes")


def requires_masking(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> bool:
    """Whether this node must refuse to send an unmasked update."""
    if "require-secure-aggregation" in node_config:  # an explicit node setting overrides the policy file
        return flag(node_config, "require-secure-aggregation")
    policy = site_policy(node_config, run_config)
    return policy is not None and policy.require_secure_aggregation
