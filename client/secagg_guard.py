"""The site's own floor under secure aggregation: it never takes part in a sum of too few sites.

Flower's SecAgg+ client trusts the coordinator's parameters and lists. A coordinator that wants one hospital's
update can ask for a "sum" that holds only that update (the others refused or were never asked), lower the
threshold until one share reveals a mask, or tell different sites different stories about who dropped out and
collect both masks of one site. Each check here is a pure function of what the coordinator sent at one SecAgg+
stage, what this site did earlier in the round, and the site's policy (``[secure-aggregation]`` in
``site-policy.toml``); :func:`client.app.secure_aggregation_mod` calls them before Flower's ``secaggplus_mod``
sees the message and refuses the stage with the returned reason.

- **setup**: the site's keys are shared with ``share_num`` sites (itself included): at least ``min-cohort``; the
  reconstruction threshold is at least ``min-threshold`` and a strict majority of the shares (SecAgg+'s condition
  against a coordinator that lies about dropouts: two disjoint sets of ``t`` sites cannot both exist).
- **share-keys**: the public keys forwarded (this site's included) come from at least ``min-cohort`` sites.
- **masked-vector**: at least ``min-cohort`` sites (this one included) sent this site key shares, checked before
  the site trains.
- **unmask**: the sum being unmasked holds at least ``min-cohort`` contributors; no site is listed both as a
  contributor and as dropped; this site is listed as a contributor exactly when it sent its masked vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.secure_aggregation import SecAggSettings
from common.site_policy import SitePolicy

#: The record of the node's ``context.state`` where a site keeps what it did in the current SecAgg+ round: whether it
#: sent its masked vector (``sent``) and the sites of the round's key exchange (``cohort``, node ids).
COHORT_RECORD = "medsilo.secagg-round"


def cohort_of(state: Any) -> list[int]:
    """The node ids of the current SecAgg+ round's key exchange (empty outside SecAgg+), from ``context.state``.

    A site replays a kept update (a coordinator that restarted) only into the same cohort: the same update summed
    with a different set of sites would let the coordinator difference two sums and isolate one site's update.
    """
    record = state.config_records.get(COHORT_RECORD)
    if record is None or "cohort" not in record:
        return []
    return sorted(int(n) for n in record["cohort"])  # type: ignore[union-attr]


#: Where a site notes the rounds whose sums it helped unmask (a kept update of such a round is never replayed).
UNMASKED_FOLDER = "secagg-unmasked"


def unmasked_marker(state: Path, *, run: int, server_round: int) -> Path:
    """The file saying that this site handed over unmasking shares for a sum holding its ``run``/round update."""
    return state / UNMASKED_FOLDER / f"run-{int(run)}-round-{int(server_round)}"


def parameters_problem(received: Mapping[str, Any], expected: SecAggSettings) -> str | None:
    """Why the coordinator's SecAgg+ arithmetic is refused: anything but the run's own settings.

    The modulus decides whether the masks hide anything at all (Flower draws mask words below the modulus: with a
    modulus of 2 every mask is 0); the clipping range, quantization range and weight cap follow from the run
    config (:func:`common.secure_aggregation.run_settings`), so the site recomputes them.
    """
    wanted = {"mod_range": expected.modulus_range, "target_range": expected.quantization_range,
              "clipping_range": expected.clipping_range, "max_weight": float(expected.max_weight)}
    wrong = [f"{key}={received.get(key)!r} (this run's is {value!r})" for key, value in wanted.items()
             if not isinstance(received.get(key), (int, float))
             or not math.isclose(float(received[key]), float(value), rel_tol=1e-9)]
    if wrong:
        return "SecAgg+ parameters differ from the run's own: " + ", ".join(wrong)
    return None


def setup_problem(*, share_num: int, threshold: int, policy: SitePolicy) -> str | None:
    """Why the SecAgg+ parameters of a round are refused (``None``: accepted)."""
    out = []
    if share_num < policy.min_cohort:
        out.append(f"the coordinator would share this site's keys with {share_num} site(s) (this one included); "
                   f"the site's policy needs min-cohort={policy.min_cohort}")
    if threshold < policy.min_threshold:
        out.append(f"SecAgg+ threshold {threshold} is below the site's min-threshold={policy.min_threshold}")
    if not share_num / 2 < threshold <= share_num:
        out.append(f"SecAgg+ threshold {threshold} of {share_num} shares is not a strict majority: a coordinator "
                   "that lies about which sites dropped out could then recover both masks of one site "
                   "(use secagg-threshold above 0.5)")
    elif not isolation_impossible(sites=share_num, threshold=threshold, min_cohort=policy.min_cohort):
        out.append(f"SecAgg+ threshold {threshold} of {share_num} shares is too low for this site's min-cohort="
                   f"{policy.min_cohort}: a coordinator telling each site a different story about who dropped out "
                   "could unmask a sum of fewer sites (raise secagg-threshold)")
    return "; ".join(out) or None


def isolation_impossible(*, sites: int, threshold: int, min_cohort: int) -> bool:
    """Whether no story about dropouts lets a coordinator unmask a sum of fewer than ``min_cohort`` of ``sites``.

    Pure counting, with every site applying this module's unmask checks. To unmask the sum of a set ``S`` of
    ``s`` senders and no more, the coordinator must remove the pairwise masks between ``S`` and the other
    ``sites - s`` sites, whose private keys it then needs (the keys of ``S`` itself it cannot also have: with a
    majority threshold, a site's key and its mask seed cannot both be rebuilt). Each of those keys needs
    ``threshold`` sites listing its owner as dropped, and a site lists at most ``sites - max(threshold,
    min_cohort)`` sites as dropped (Flower requires ``threshold`` live sites in a site's list, this module
    ``min_cohort``). So ``(sites - s) * threshold`` declarations must fit in ``sites * (sites - max(threshold,
    min_cohort))``: when they cannot for ``s = min_cohort - 1`` (and so for any smaller ``s``), no such sum
    exists, whatever each site is told.
    """
    most_dropped = sites - max(threshold, min_cohort)
    return (sites - (min_cohort - 1)) * threshold > sites * most_dropped


def share_keys_problem(*, keys: int, policy: SitePolicy) -> str | None:
    """Why the key exchange is refused: too few sites' public keys (``keys`` counts this site's own)."""
    if keys < policy.min_cohort:
        return (f"only {keys} site(s) (this one included) are in this round's key exchange; the site's policy needs "
                f"min-cohort={policy.min_cohort}")
    return None


def masked_vector_problem(*, sources: int, policy: SitePolicy) -> str | None:
    """Why the site will not train and mask its update: too few sites sent it their key shares."""
    if sources + 1 < policy.min_cohort:
        return (f"only {sources + 1} site(s) (this one included) hold key shares for this round's sum; the site's "
                f"policy needs min-cohort={policy.min_cohort}, so it does not train")
    return None


def unmask_problem(*, node_id: int, active: Sequence[int], dead: Sequence[int], sent: bool,
                   policy: SitePolicy) -> str | None:
    """Why the site refuses to hand over unmasking shares for the sum the coordinator describes."""
    out = []
    if len(set(active)) < policy.min_cohort:
        out.append(f"the coordinator asks to unmask a sum of {len(set(active))} site(s); the site's policy needs "
                   f"min-cohort={policy.min_cohort}")
    both = sorted(set(active) & set(dead))
    if both:
        out.append(f"{len(both)} site(s) are listed both as contributing and as dropped out (that would reveal both "
                   "masks of a site)")
    if node_id in active and not sent:
        out.append("this site is listed as contributing although it sent no masked vector this round")
    if node_id in dead and sent:
        out.append("this site is listed as dropped out although it sent its masked vector this round")
    return "; ".join(out) or None
