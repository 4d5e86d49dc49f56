"""A site's floor under secure aggregation, whatever the coordinator runs (issue 24: "a secure sum of one").

The attacks run a malicious coordinator in-process: Flower's SecAgg+ workflow with its own safety checks removed,
against the real ClientApps of three sites (tests/test_secure_aggregation.py's loopback federation).
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow
from test_secure_aggregation import SIZES, _write_sites

from client import secagg_guard as guard
from client.app import app as client_app
from client.app import secure_aggregation_mod
from common.config import RunConfig
from common.site_policy import SitePolicy, template
from common.wire import REFUSAL_CODE, SiteReport
from server.secure_workflow import ContributorFloorWorkflow
from simulations.loopback import LoopbackGrid

POLICY = SitePolicy(min_cohort=3, min_threshold=2)


# ------------------------------------------------------------------------------ the checks alone
@pytest.mark.parametrize(("share_num", "threshold", "expected"), [
    (3, 2, None),
    (5, 4, None),
    (5, 3, "too low for this site's min-cohort=3"),  # different stories to different sites: a sum of two
    (2, 2, "min-cohort=3"),          # too few sites hold the keys
    (4, 2, "not a strict majority"),  # two disjoint sets of 2 could each unmask one mask of a site
    (3, 1, "min-threshold=2"),
    (3, 4, "not a strict majority"),  # a threshold above the share count is no threshold
])
def test_setup_parameters_below_the_policy_are_refused(share_num, threshold, expected) -> None:
    # Execute
    problem = guard.setup_problem(share_num=share_num, threshold=threshold, policy=POLICY)
    # Assert
    assert problem is None if expected is None else expected in (problem or "")


def test_unmasking_needs_enough_contributors_and_a_consistent_story() -> None:
    # Prepare: this site is node 7 and sent its masked vector.
    ok = dict(node_id=7, active=[5, 6, 7], dead=[], sent=True, policy=POLICY)
    # Execute / Assert
    assert guard.unmask_problem(**ok) is None
    assert "sum of 1 site" in guard.unmask_problem(**{**ok, "active": [7], "dead": [5, 6]})
    assert "both as contributing and as dropped" in guard.unmask_problem(**{**ok, "active": [5, 6, 7], "dead": [6]})
    assert "sent no masked vector" in guard.unmask_problem(**{**ok, "sent": False})
    assert "listed as dropped" in guard.unmask_problem(**{**ok, "active": [5, 6, 8], "dead": [7]})


def test_the_key_exchange_and_the_masked_vector_stage_count_this_site_too() -> None:
    assert guard.share_keys_problem(keys=3, policy=POLICY) is None
    assert "only 2 site(s)" in (guard.share_keys_problem(keys=2, policy=POLICY) or "")
    assert guard.masked_vector_problem(sources=2, policy=POLICY) is None
    assert "does not train" in (guard.masked_vector_problem(sources=1, policy=POLICY) or "")


# ------------------------------------------------------------------------------ through the real mod
def _stage_message(configs: dict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # a message "from the coordinator"
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), dst_node_id=7,
                   message_type=MessageType.TRAIN, group_id="1")


def _setup(config: RunConfig, *, sample: int, shares: int, threshold: int, **changes) -> dict:
    """A SETUP stage as an honest coordinator sends it for ``config`` (``changes`` override its values)."""
    from common.secure_aggregation import run_settings

    s = run_settings(config)
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: s.clipping_range, Key.TARGET_RANGE: s.quantization_range,
            Key.MOD_RANGE: s.modulus_range, Key.MAX_WEIGHT: float(s.max_weight), **changes}


def test_masks_of_a_smaller_modulus_or_other_ranges_are_refused(tmp_path) -> None:
    # Prepare: the reviewer's attack: modulus 2 makes every Flower mask 0, so the "masked" vector is the update
    config = RunConfig(site_data_dir=str(tmp_path))
    def ctx() -> Context:
        return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                       run_config=config.to_flower())
    # Execute
    honest = secure_aggregation_mod(_stage_message(_setup(config, sample=3, shares=3, threshold=3)), ctx(),
                                    lambda *_: None)
    tiny = secure_aggregation_mod(_stage_message(_setup(config, sample=3, shares=3, threshold=3,
                                                        **{Key.MOD_RANGE: 2, Key.TARGET_RANGE: 1})), ctx(),
                                  lambda *_: None)
    # Assert
    assert not honest.has_error()
    assert tiny.has_error() and "mod_range=2" in tiny.error.reason and "target_range=1" in tiny.error.reason


def test_malformed_node_ids_and_a_malformed_stage_change_nothing(tmp_path) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from client.secagg_guard import COHORT_RECORD

    # Prepare: a site that set up and sent its masked vector this round
    config = RunConfig(site_data_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=config.to_flower())
    assert not secure_aggregation_mod(_stage_message(_setup(config, sample=3, shares=3, threshold=3)), ctx,
                                      lambda *_: None).has_error()
    ctx.state.config_records[COHORT_RECORD]["sent"] = 1
    # Execute: a key exchange naming "7" and "07", and a set-up Flower itself rejects (a float sample count)
    keys = secure_aggregation_mod(_stage_message({Key.STAGE: Stage.SHARE_KEYS, "7": [b"a", b"b"],
                                                  "07": [b"c", b"d"], "8": [b"e", b"f"]}), ctx, lambda *_: None)
    with pytest.raises(Exception):  # noqa: B017 - Flower's own validation error
        secure_aggregation_mod(_stage_message(_setup(config, sample=3, shares=3, threshold=3,
                                                     **{Key.SAMPLE_NUMBER: 3.5})), ctx, lambda *_: None)
    # Assert
    assert keys.has_error() and "malformed node ids" in keys.error.reason
    assert ctx.state.config_records[COHORT_RECORD]["sent"] == 1  # the rejected set-up did not reset the round
    assert RECORD_KEY_STATE in ctx.state.config_records


def test_the_counting_rule_matches_a_brute_force_search_of_every_story() -> None:
    # Prepare: every way a coordinator can tell each of n sites (all of which sent) which sites are active, each
    # list passing the sites' checks; it rebuilds a site's mask seed from `threshold` "active" and its key from
    # `threshold` "dropped" declarations, and isolates a sum S when it has S's seeds and everyone else's keys.
    from itertools import combinations, product

    def attack_exists(n: int, t: int, m: int) -> bool:
        options = []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            options.append([frozenset((i, *c)) for k in range(max(t, m) - 1, n) for c in combinations(others, k)])
        for story in product(*options):
            seeds = {j for j in range(n) if sum(j in a for a in story) >= t}
            keys = {j for j in range(n) if sum(j not in a for a in story) >= t}
            if seeds & keys:
                return True  # one site's both masks
            rest = set(range(n)) - keys
            if rest and len(rest) < m and rest <= seeds:
                return True
        return False

    # Execute / Assert: where the rule accepts, no story isolates a small sum; the reviewer's case is refused
    for n, t, m in [(3, 2, 3), (4, 3, 3), (4, 3, 2), (5, 4, 3), (5, 3, 2), (5, 4, 4)]:
        if guard.isolation_impossible(sites=n, threshold=t, min_cohort=m):
            assert not attack_exists(n, t, m), (n, t, m)
    assert not guard.isolation_impossible(sites=5, threshold=3, min_cohort=3)
    assert attack_exists(5, 3, 3)


def test_the_mod_refuses_before_flower_sees_the_stage(tmp_path) -> None:
    # Prepare: a site with its own policy (min-cohort 3) and a coordinator asking for a threshold of 1 of 3.
    (tmp_path / "policy.toml").write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5))
    ctx = Context(run_id=1, node_id=7, node_config={"policy-path": str(tmp_path / "policy.toml"),
                                                    "site-name": "st-olav"},
                  state=RecordDict(), run_config=RunConfig().to_flower())
    msg = _stage_message({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 1,
                          Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**24, Key.MOD_RANGE: 2**32,
                          Key.MAX_WEIGHT: 100.0})

    def never(*_):  # the training step must not be reached
        raise AssertionError("called the ClientApp")

    # Execute
    reply = secure_aggregation_mod(msg, ctx, never)
    # Assert: a refusal the coordinator can decode, naming the rule; Flower's SecAgg+ state never started
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    report = SiteReport.from_error_reason(reply.error.reason)
    assert report is not None and report.refused and report.site == "st-olav"
    assert "min-threshold=2" in report.reason
    assert "secaggplus" not in ctx.state.config_records


# ------------------------------------------------------------------------------ attacks, in-process coordinator
class _NoChecks(SecAggPlusWorkflow):
    """A malicious coordinator: Flower's workflow without its threshold checks, unmasking whatever arrived."""

    def _check_threshold(self, state) -> bool:
        return True


def attack_config(tmp_path, *, min_sites: int = 1) -> RunConfig:
    return RunConfig(dataset="breastmnist", site_data_dir=str(tmp_path), batch_size=32, rounds=1, local_epochs=1,
                     strategy="fedavg", server_eval=False, out_dir=str(tmp_path / "run"), min_sites=min_sites,
                     epsilon=4.0, accountant="rdp", max_site_records=250)


def arithmetic(tmp_path) -> dict:
    """The SecAgg+ arithmetic of the attack runs' config (the sites refuse any other)."""
    from common.secure_aggregation import run_settings

    s = run_settings(attack_config(tmp_path))
    return {"max_weight": float(s.max_weight), "clipping_range": s.clipping_range,
            "quantization_range": s.quantization_range, "modulus_range": s.modulus_range}


def _attack(tmp_path, workflow: SecAggPlusWorkflow, refusing: set[int], *, min_sites: int = 1) -> LoopbackGrid:
    """Run one secure round of three sites; the sites in ``refusing`` (partition ids) refuse by policy."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    from common.datasets import dataset_info
    from server.strategy import FederationStrategy, build_inner_strategy, initial_parameters

    _write_sites(tmp_path)
    cfg = attack_config(tmp_path, min_sites=min_sites)
    nodes = {}
    for i in range(len(SIZES)):
        policy = tmp_path / f"policy-{i}.toml"
        text = template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5)
        if i in refusing:  # this hospital lets its records serve another dataset only
            text = text.replace("datasets = []", 'datasets = ["pneumoniamnist"]')
        policy.write_text(text)
        nodes[10 + i] = {"partition-id": i, "num-partitions": len(SIZES), "policy-path": str(policy),
                         "state-dir": str(tmp_path / f"state-{i}"), "site-name": f"h{i}"}
    grid = LoopbackGrid(client_app, nodes, cfg.to_flower())
    info = dataset_info(cfg.dataset)
    strategy = FederationStrategy(build_inner_strategy(cfg, initial_parameters(cfg, info), 1), config=cfg,
                                  info=info, out_dir=tmp_path / "run", test_set=None)
    legacy = LegacyContext(context=Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                           run_config=cfg.to_flower()),
                           config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    return grid


def test_a_sum_of_one_is_never_unmasked_whatever_the_coordinator_runs(tmp_path) -> None:
    # Prepare: two of three hospitals refuse the run; the coordinator skips every check and unmasks anyway.
    workflow = _NoChecks(num_shares=1.0, reconstruction_threshold=0.75, **arithmetic(tmp_path))
    # Execute
    grid = _attack(tmp_path, workflow, refusing={1, 2})
    # Assert: the refusing sites said why and left at set-up; the third refused the key exchange of two...
    errors = [SiteReport.from_error_reason(m.error.reason) for m in grid.received if m.has_error()]
    assert any(r is not None and "dataset 'breastmnist' is not allowed" in r.reason for r in errors)
    assert any(r is not None and r.site == "h0" and "min-cohort=3" in r.reason for r in errors)
    # ... so no masked vector and no unmasking share ever left a site
    sent = [m for m in grid.received if not m.has_error()]
    assert not any(Key.MASKED_PARAMETERS in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {}) for m in sent)
    assert not any(Key.SHARE_LIST in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {}) for m in sent)


def test_sites_that_drop_out_after_training_leave_a_sum_nobody_unmasks(tmp_path) -> None:
    # Prepare: every site passes set-up; two then refuse at the training request (a weights rule: the policy's
    # model-hashes), so the third trains and masks alone; the coordinator asks to unmask that "sum".
    workflow = _NoChecks(num_shares=1.0, reconstruction_threshold=0.75, **arithmetic(tmp_path))
    # Execute
    grid = _attack_with(tmp_path, workflow, edit={1: hashes_refuse, 2: hashes_refuse})
    # Assert: h0 sent a masked vector, then refused to unmask a sum of one; no share of h0's mask left any site
    masked = [m for m in grid.received if not m.has_error()
              and Key.MASKED_PARAMETERS in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {})]
    assert len(masked) == 1
    unmask_replies = [m for m in grid.received if m.metadata.group_id == "1" and m.has_error()
                      and "unmask a sum of 1 site" in (m.error.reason or "")]
    assert unmask_replies, [m.error.reason[:200] for m in grid.received if m.has_error()]
    assert not any(Key.SHARE_LIST in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {})
                   for m in grid.received if not m.has_error())


def hashes_refuse(path) -> None:
    """Make a policy refuse every model (an architecture fingerprint no model has): a rule checked on the weights."""
    path.write_text(path.read_text().replace("model-hashes = []", 'model-hashes = ["0000000000000000"]'))


def _attack_with(tmp_path, workflow, edit) -> LoopbackGrid:
    """:func:`_attack` with each site's policy file edited by ``edit[partition]`` before the run."""
    import client.app as app_module

    real = app_module.site_policy

    def policy_for(node_config, run_config):
        path = node_config.get("policy-path")
        i = int(node_config["partition-id"])
        if path and i in edit and not getattr(policy_for, f"done{i}", False):
            edit[i](__import__("pathlib").Path(path))
            setattr(policy_for, f"done{i}", True)
        return real(node_config, run_config)

    app_module.site_policy = policy_for
    try:
        return _attack(tmp_path, workflow, refusing=set())
    finally:
        app_module.site_policy = real


def test_an_honest_coordinator_does_not_unmask_below_min_sites(tmp_path) -> None:
    # Prepare: the coordinator's own floor (min-sites=3) with one hospital refusing at the training request.
    halted: list[tuple[int, str]] = []
    workflow = ContributorFloorWorkflow(min_contributors=3,
                                        on_halt=lambda r, _res, _f, stage: halted.append((r, stage)),
                                        num_shares=1.0, reconstruction_threshold=0.75, **arithmetic(tmp_path))
    # Execute
    grid = _attack_with(tmp_path, workflow, edit={2: hashes_refuse})
    # Assert: two masked vectors arrived and the coordinator stopped before asking for unmasking shares
    assert halted == [(1, "unmask")]
    masked = [m for m in grid.received if not m.has_error()
              and Key.MASKED_PARAMETERS in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {})]
    assert len(masked) == 2
    assert not any(Key.SHARE_LIST in (m.content.config_records.get(RECORD_KEY_CONFIGS) or {})
                   for m in grid.received if not m.has_error())


def test_a_simulated_site_without_a_policy_applies_only_the_protocol_floor(tmp_path) -> None:
    # Prepare: a researcher's simulated site (no policy file) in a run without DP
    config = RunConfig(dp=False, site_data_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=config.to_flower())
    setup = _setup(config, sample=2, shares=2, threshold=2)
    # Execute
    reply = secure_aggregation_mod(_stage_message(setup), ctx, lambda *_: None)
    below = secure_aggregation_mod(_stage_message({**setup, Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1}),
                                   Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                                           run_config=ctx.run_config), lambda *_: None)
    # Assert: a sum of two is the protocol's minimum, and no other rule (require-dp) is made up for it
    assert not reply.has_error()
    assert below.has_error() and "min-cohort=2" in below.error.reason
