"""The hospital's site policy: what this site accepts, decided by its privacy officer, not by the coordinator.

``site-policy.toml`` (written by :func:`template` into each hospital's kit; the hospital owns it) sets the
per-run and lifetime ε with its δ, the minimum noise multiplier, the maximum clipping norm, whether DP and
secure aggregation are required, the secure sum's cohort floor (how many sites at least make up a sum this
site's update is in, and the least SecAgg+ threshold), the allowed models and architecture fingerprints, the
maximum rounds and local epochs, the allowed datasets, and the app bundles (FABs) the hospital approved beside
the code of its own medsilo installation.

A node without a policy file applies :data:`DEFAULT_POLICY`, the template's rules (fail closed).

The node checks every training or validation request against the policy before touching data, and refuses
with one reason listing every violation (no PHI: only the settings and the policy's limits).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import Problems
from common.io import read_toml


@dataclass(frozen=True)
class SitePolicy:
    """A validated site policy (defaults: the template's values)."""

    epsilon_per_run: float = 8.0
    epsilon_lifetime: float = 24.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.3
    max_grad_norm: float = 1.0
    require_dp: bool = True
    require_secure_aggregation: bool = True
    models: tuple[str, ...] = ()
    model_hashes: tuple[str, ...] = ()
    max_rounds: int = 100
    max_local_epochs: int = 10
    datasets: tuple[str, ...] = field(default_factory=tuple)
    min_cohort: int = 3
    min_threshold: int = 2
    approved_apps: tuple[str, ...] = ()


#: What a node without a policy file enforces: the template's rules (DP and SecAgg+ required, ε caps, cohort floor).
DEFAULT_POLICY = SitePolicy()

#: How an approved app bundle is named: the SHA-256 of the FAB file, as ``medsilo site approve`` prints it.
APP_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


_KEYS: dict[str, dict[str, tuple[str, type]]] = {
    "privacy": {
        "epsilon-per-run": ("epsilon_per_run", float), "epsilon-lifetime": ("epsilon_lifetime", float),
        "delta": ("delta", float), "min-noise-multiplier": ("min_noise_multiplier", float),
        "max-grad-norm": ("max_grad_norm", float), "require-dp": ("require_dp", bool),
        "require-secure-aggregation": ("require_secure_aggregation", bool),
    },
    "training": {
        "models": ("models", list), "model-hashes": ("model_hashes", list), "max-rounds": ("max_rounds", int),
        "max-local-epochs": ("max_local_epochs", int),
    },
    "data": {"datasets": ("datasets", list)},
    "secure-aggregation": {"min-cohort": ("min_cohort", int), "min-threshold": ("min_threshold", int)},
    "apps": {"approved": ("approved_apps", list)},
}


def parse_policy(raw: dict[str, Any], *, source: str = "site-policy.toml") -> SitePolicy:
    """Validate a parsed policy document; every problem is reported at once."""
    p = Problems()
    values: dict[str, Any] = {}
    for table in sorted(set(raw) - set(_KEYS)):
        p.add(f"{source}: unknown table [{table}]; expected {', '.join(sorted(_KEYS))}")
    for table, keys in _KEYS.items():
        section = raw.get(table, {})
        if not isinstance(section, dict):
            p.add(f"{source}: [{table}] must be a table")
            continue
        for key in sorted(set(section) - set(keys)):
            p.add(f"{source}: [{table}] unknown key {key!r}; expected {', '.join(sorted(keys))}")
        for key, (name, kind) in keys.items():
            if key not in section:
                continue
            value = section[key]
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is list else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                p.add(f"{source}: [{table}] {key} = {value!r}; expected "
                      f"{'a list of names' if kind is list else kind.__name__}")
                continue
            values[name] = tuple(value) if kind is list else kind(value)
    policy = SitePolicy(**values)
    p.check(0 < policy.epsilon_per_run <= policy.epsilon_lifetime <= 100,
            f"{source}: need 0 < epsilon-per-run ({policy.epsilon_per_run}) <= epsilon-lifetime "
            f"({policy.epsilon_lifetime}) <= 100")
    p.check(0 < policy.delta < 1e-2, f"{source}: delta = {policy.delta}; use (0, 0.01)")
    p.check(policy.min_noise_multiplier >= 0, f"{source}: min-noise-multiplier must be >= 0")
    p.check(policy.max_grad_norm > 0, f"{source}: max-grad-norm must be > 0")
    p.check(policy.max_rounds >= 1 and policy.max_local_epochs >= 1,
            f"{source}: max-rounds and max-local-epochs must be at least 1")
    p.check(policy.min_cohort >= 2, f"{source}: [secure-aggregation] min-cohort = {policy.min_cohort}; a secure sum "
            "needs at least 2 sites (3 or more is the point: with 2, each site can subtract its own update)")
    p.check(policy.min_threshold >= 2, f"{source}: [secure-aggregation] min-threshold = {policy.min_threshold}; "
            "use 2 or more (a threshold of 1 lets one share reveal a site's mask)")
    for digest in policy.approved_apps:
        p.check(bool(APP_DIGEST.match(digest)), f"{source}: [apps] approved lists {digest[:80]!r}, which is not an "
                "app digest; use the 'sha256:<64 hex digits>' that `medsilo site approve FAB` prints")
    p.raise_if_any()
    return policy


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy file."""
    return parse_policy(read_toml(path, missing="restore site-policy.toml from the kit"), source=str(path))


def with_approved_app(text: str, digest: str) -> str:
    """``site-policy.toml``'s text with ``digest`` added to ``[apps] approved`` (the rest of the file untouched)."""
    if not APP_DIGEST.match(digest):
        raise ValueError(f"{digest[:80]!r} is not an app digest ('sha256:<64 hex digits>')")
    lines = text.splitlines()
    table = next((i for i, line in enumerate(lines) if line.strip() == "[apps]"), None)
    if table is None:
        return text.rstrip("\n") + f'\n\n[apps]\napproved = ["{digest}"]\n'
    end = next((i for i in range(table + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    for i in range(table + 1, end):
        key, _, rest = lines[i].partition("=")
        if key.strip() != "approved":
            continue
        values = rest.split("#", 1)[0].strip()
        if not (values.startswith("[") and values.endswith("]")):
            raise ValueError("[apps] approved spans several lines; add the digest by hand")
        inner = values[1:-1].strip().rstrip(",")
        lines[i] = f"approved = [{inner + ', ' if inner else ''}\"{digest}\"]"
        return "\n".join(lines) + "\n"
    lines.insert(table + 1, f'approved = ["{digest}"]')
    return "\n".join(lines) + "\n"


def architecture_fingerprint(shapes: Sequence[tuple[int, ...]]) -> str:
    """SHA-256 (first 16 hex digits) of a model's tensor shapes, in order: what the weights really are."""
    text = ";".join("x".join(str(d) for d in shape) for shape in shapes)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def fingerprint_of(parameters: Sequence[np.ndarray]) -> str:
    """The architecture fingerprint of weights received from the coordinator."""
    return architecture_fingerprint([tuple(p.shape) for p in parameters])


def violations(policy: SitePolicy, config: RunConfig, *, model_name: str | None,
               parameters: Sequence[np.ndarray] | None, secure: bool, training: bool) -> list[str]:
    """Every way a training (or, ``training=False``, validation) request breaks ``policy``; empty: allowed.

    No data is needed to decide. ``model_name=None`` or ``parameters=None`` skip the rules that need them (the
    SecAgg+ set-up stage checks the run config alone, before any weights arrive).
    """
    out: list[str] = []
    if policy.datasets and config.dataset.lower() not in {d.lower() for d in policy.datasets}:
        out.append(f"dataset {config.dataset!r} is not allowed (policy allows {', '.join(policy.datasets)})")
    if policy.models and model_name is not None and model_name not in policy.models:
        out.append(f"model {model_name!r} is not allowed (policy allows {', '.join(policy.models)})")
    if policy.model_hashes and parameters is not None and fingerprint_of(parameters) not in policy.model_hashes:
        out.append(f"model weights with architecture fingerprint {fingerprint_of(parameters)} are not among the "
                   "policy's model-hashes")
    # A validation statistic is a release of the site's records too: every rule applies to it but masking
    # (validations are released under DP, not summed under SecAgg+). A run the site refuses to train in is one
    # it does not validate for either, so it spends nothing on it.
    if policy.require_dp and not config.dp:
        out.append("the run has dp=false but this site requires record-level DP")
    if training and policy.require_secure_aggregation and not secure:
        out.append("the update would leave unmasked but this site requires secure aggregation")
    if config.rounds > policy.max_rounds:
        out.append(f"rounds={config.rounds} exceeds max-rounds={policy.max_rounds}")
    if config.local_epochs > policy.max_local_epochs:
        out.append(f"local-epochs={config.local_epochs} exceeds max-local-epochs={policy.max_local_epochs}")
    if config.dp:
        if config.epsilon > policy.epsilon_per_run:
            out.append(f"epsilon={config.epsilon} exceeds epsilon-per-run={policy.epsilon_per_run}")
        if config.delta > policy.delta:
            out.append(f"delta={config.delta} exceeds the policy's delta={policy.delta}")
        if config.max_grad_norm > policy.max_grad_norm:
            out.append(f"max-grad-norm={config.max_grad_norm} exceeds the policy's max-grad-norm="
                       f"{policy.max_grad_norm}")
    return out


def template(*, epsilon_per_run: float, epsilon_lifetime: float, delta: float) -> str:
    """The policy file written into a new hospital kit."""
    return f"""# This hospital's own rules. The coordinator cannot loosen them: the node refuses any request that
# breaks one, and says which. Edit with your privacy officer; restart the node to apply.

[privacy]
epsilon-per-run = {epsilon_per_run!r}        # most ε one run may spend on this site's records
epsilon-lifetime = {epsilon_lifetime!r}       # most ε all runs together may spend on this site's data source
delta = {delta!r}                 # δ for the ε above; runs may not ask for more
min-noise-multiplier = 0.3     # refuse DP-SGD with less noise than this
max-grad-norm = 1.0            # refuse per-record clipping bounds above this
require-dp = true              # refuse training without record-level DP-SGD
require-secure-aggregation = true   # refuse to send an update that SecAgg+ does not mask

[training]
models = []                    # allowed architectures, e.g. ["cnn", "resnet18-small"]; empty: any
model-hashes = []              # allowed architecture fingerprints (`medsilo site fingerprint`); empty: any
max-rounds = 100
max-local-epochs = 10

[data]
datasets = []                  # datasets this site's records may be used for, e.g. ["pneumoniamnist"]

[secure-aggregation]
min-cohort = 3                 # refuse unless at least this many sites make up every secure sum our update is in
min-threshold = 2              # refuse a SecAgg+ threshold below this (it must also be a majority of the shares)

[apps]
approved = []                  # app bundles (FABs) accepted beside this node's own medsilo code, as
                               # "sha256:..." from `medsilo site approve FAB`; the node always runs its own code
"""
