"""Where a node's site policy and state live, read without importing torch (the SecAgg+ stages use it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.pacs import is_dicomweb
from common.site_policy import SitePolicy, load_policy


def state_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path | None:
    """Where this node keeps its ledger and audit log: ``state-dir`` (deployment) or beside the site's data."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    data_dir = str(run_config.get("site-data-dir", ""))
    if data_dir and "partition-id" in node_config:
        return Path(data_dir) / f"site-{int(node_config['partition-id']):02d}-state"
    if "data-path" in node_config and not is_dicomweb(str(node_config["data-path"])):  # a URL names no folder
        path = Path(str(node_config["data-path"]))
        return path.with_name(path.stem + "-state")
    return None


def site_policy(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SitePolicy | None:
    """The policy this node enforces, or ``None`` when the site has none.

    The hospital's file (``policy-path`` in deployment, ``site-policy.toml`` beside simulated sites), with
    ``require-secure-aggregation`` lifted when the node was started with ``allow-unmasked-updates=true``
    (``medsilo client start --allow-unmasked-updates``).
    """
    if "policy-path" in node_config:
        policy = load_policy(str(node_config["policy-path"]))
    else:
        data_dir = str(run_config.get("site-data-dir", ""))
        if not (data_dir and (Path(data_dir) / "site-policy.toml").is_file()):
            return None
        policy = load_policy(Path(data_dir) / "site-policy.toml")
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
