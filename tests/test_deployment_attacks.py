"""Issue 24's attacks by a coordinator with bad intentions, against real SuperNodes on loopback.

Each test launches a run with Flower's own ``flwr run``, from this checkout or from a copy the "coordinator" edited,
and checks what the hospitals did from their own state folders (audit log, ledger, kept bundles) and what reached
the coordinator's ``metrics.jsonl``. Every process is started by these tests, bound to 127.0.0.1 and stopped here.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
from test_deployment import ROOT, SITES, Federation, _finish, _run_config
from test_deployment import federation as federation  # the same module-scoped federation, its own here

import client.node
from common.io import read_jsonl

pytestmark = pytest.mark.slow


def coordinator_copy(root: Path, edits: dict[str, tuple[str, str]]) -> Path:
    """A copy of the app the coordinator ships, with ``path: (old, new)`` text replacements."""
    app = root / "app"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    for name in ("client", "common", "server", "simulations"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, app / name)
    for path, (old, new) in edits.items():
        text = (app / path).read_text()
        assert old in text, f"{path} no longer holds the text this attack edits"
        (app / path).write_text(text.replace(old, new, 1))
    return app


def policy_edit(federation: Federation, site: str, old: str, new: str) -> Path:
    """Edit a hospital's own site policy (the node reads it at every request); returns the file."""
    path = federation.kits / site / "site-policy.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def refusals(rows: list[dict]) -> dict[str, str]:
    """Site -> refusal reason over every round of a metrics.jsonl."""
    return {r["site"]: r["reason"] for row in rows for r in row.get("refused", [])}


def audit_entries(federation: Federation, site: str) -> list[dict]:
    path = federation.kits / site / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ------------------------------------------------------------------------------ app code
def test_a_tampered_app_bundle_is_refused_before_its_code_runs_and_approval_never_runs_it(
        federation: Federation) -> None:
    # Prepare: the attack, a copy whose policy check allows everything, launched with dp=false; its ClientApp
    # would also leave a mark on disk if any hospital imported it.
    mark = federation.root / "coordinator-code-ran"
    app = coordinator_copy(federation.root, {
        "common/site_policy.py": ("    out: list[str] = []\n", "    return []\n    out: list[str] = []\n"),
        "client/app.py": ("log = logging.getLogger(__name__)\n",
                          f"log = logging.getLogger(__name__)\nopen({str(mark)!r}, 'w').close()\n"),
    })
    nodes = [federation.node(s).start(timeout=60) for s in SITES]
    out = federation.root / "run-tampered"
    # Execute
    output = _finish(federation.run(_run_config(out, rounds=1, dp="false"), app=app), nodes)
    # Assert: every hospital refused the bundle, said why, kept it for review; nothing of it ran; nothing was spent
    assert not mark.exists()
    reasons = refusals(read_jsonl(out / "metrics.jsonl"))
    assert set(reasons) == set(SITES), output[-3000:]
    assert all("runs only app code its hospital approved" in r and "common/site_policy.py (differs)" in r
               for r in reasons.values())
    for site in SITES:
        kept = list((federation.kits / site / "state" / "refused-apps").glob("sha256-*.fab"))
        assert len(kept) == 1
        assert any(e.get("event") == "app-refused" for e in audit_entries(federation, site))
        assert not list((federation.kits / site / "state").glob("ledger*"))  # no privacy budget touched
    # Prepare 2: every hospital reviews the kept bundle and approves it (`medsilo site approve --yes`)
    from common.cli import main as cli

    for site in SITES:
        [kept] = (federation.kits / site / "state" / "refused-apps").glob("*.fab")
        assert cli(["site", "approve", str(kept), "--kit", str(federation.kits / site), "--yes"]) == 0
    nodes = [federation.node(s).start(timeout=60) for s in SITES]
    out = federation.root / "run-approved"
    # Execute 2
    output = _finish(federation.run(_run_config(out, rounds=1, dp="false"), app=app), nodes)
    # Assert 2: the bundle is accepted, yet the hospitals ran their own code: their policy refused dp=false
    assert not mark.exists()
    reasons = refusals(read_jsonl(out / "metrics.jsonl"))
    assert set(reasons) == set(SITES), output[-3000:]
    assert all("dp=false but this site requires record-level DP" in r for r in reasons.values())


def test_parameters_below_a_sites_floor_and_a_node_without_policy_are_refused_with_the_reason(
        federation: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: h0 wants at least 4 sites in every sum, h1 a threshold of at least 3 (three sites give 2), and h2's
    # node was started by hand without policy-path; the run asks for dp=false.
    real = client.node.node_config

    def h2_without_policy(kit, *args, **kwargs) -> str:
        pairs = real(kit, *args, **kwargs).split(" ")
        return " ".join(p for p in pairs if kit.site != "h2" or not p.startswith("policy-path="))

    monkeypatch.setattr(client.node, "node_config", h2_without_policy)
    policy_edit(federation, "h0", "min-cohort = 3", "min-cohort = 4")
    policy_edit(federation, "h1", "min-threshold = 2", "min-threshold = 3")
    nodes = [federation.node(s).start(timeout=60) for s in SITES]
    out = federation.root / "run-floor"
    try:
        # Execute
        output = _finish(federation.run(_run_config(out, rounds=1, dp="false")), nodes)
    finally:
        policy_edit(federation, "h0", "min-cohort = 4", "min-cohort = 3")
        policy_edit(federation, "h1", "min-threshold = 3", "min-threshold = 2")
    # Assert: every refusal reaches the coordinator with every broken rule; no round was aggregated
    rows = read_jsonl(out / "metrics.jsonl")
    reasons = refusals(rows)
    assert "min-cohort=4" in reasons.get("h0", ""), output[-3000:]
    assert "min-threshold=3" in reasons.get("h1", "")
    assert all("requires record-level DP" in reasons.get(s, "") for s in SITES)  # h2: the template's rule
    assert "NO SITE POLICY" in "".join(nodes[2].output) + (federation.root / "h2.log").read_text()
    assert "NO SITE POLICY" not in "".join(nodes[0].output)
    assert "Secure aggregation completed" not in output
    assert rows[-1]["sites_answered"] == 0
    # The run failed with the reasons, and no model file claims to be its result.
    assert "no round was aggregated" in output and "h2 refused: site policy: the run has dp=false" in output
    assert not list(out.glob("model-*.safetensors"))
    assert json.loads((out / "federated.json").read_text())["aggregated_rounds"] == 0


def test_a_sum_of_one_is_never_unmasked_by_a_coordinator_that_skips_its_checks(federation: Federation) -> None:
    # Prepare: a coordinator whose SecAgg+ workflow unmasks whatever arrived (Flower's checks and medsilo's floor
    # removed), min-sites=1; h1 and h2 refuse the round at the training request (their model-hashes rule), so h0
    # trains and masks alone.
    app = coordinator_copy(federation.root, {"server/app.py": (
        "    return ContributorFloorWorkflow(\n        min_contributors=max(2, config.min_sites),",
        "    ContributorFloorWorkflow._check_threshold = lambda self, state: True\n"
        "    ContributorFloorWorkflow.unmask_stage = ContributorFloorWorkflow.__mro__[1].unmask_stage\n"
        "    return ContributorFloorWorkflow(\n        min_contributors=2,")})
    for site in ("h1", "h2"):
        policy_edit(federation, site, "model-hashes = []", 'model-hashes = ["0000000000000000"]')
    nodes = [federation.node(s).start(timeout=60) for s in SITES]
    out = federation.root / "run-sum-of-one"
    try:
        # Execute
        output = _finish(federation.run(_run_config(out, rounds=1, **{"min-sites": 1}), app=app), nodes)
    finally:
        for site in ("h1", "h2"):
            policy_edit(federation, site, 'model-hashes = ["0000000000000000"]', "model-hashes = []")
    # Assert: h0 sent its masked vector, then refused to hand over unmasking shares for a sum of one
    h0 = audit_entries(federation, "h0")
    assert any(e.get("stage") == "masked-update" for e in h0), output[-3000:]
    unmask = [e for e in h0 if e.get("refused") and "unmask a sum of 1 site" in e.get("error", "")]
    assert unmask, [e.get("error") for e in h0]
    assert "Secure aggregation completed" not in output
    assert not any(e.get("stage") == "masked-update" for e in audit_entries(federation, "h1"))
    # ...and the coordinator's own metrics name h0's refusal and its rule
    assert "unmask a sum of 1 site(s)" in refusals(read_jsonl(out / "metrics.jsonl")).get("h0", "")


# ------------------------------------------------------------------------------ at rest
def test_no_file_a_run_leaves_in_a_nodes_state_folder_is_readable_by_others(federation: Federation) -> None:
    # Prepare / Execute: the state folders as the runs above left them (ledger, audit log, caches, kept bundles)
    loose = []
    for site in SITES:
        for path in [federation.kits / site / "state", *(federation.kits / site / "state").rglob("*")]:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                loose.append(f"{path} {stat.S_IMODE(path.stat().st_mode):04o}")
    # Assert
    assert not loose
    assert sys.platform.startswith("linux")


def test_the_audit_log_is_signed_with_the_node_key_and_a_rechained_forgery_fails(federation: Federation,
                                                                                     tmp_path: Path) -> None:
    from test_audit_signing import _read, _rechain, _write_forgery

    from common.cli import main as cli

    for site in SITES:
        log = federation.kits / site / "state" / "audit.jsonl"
        assert cli(["audit", "verify", str(log), "--key", str(federation.kits / site / "node.pub")]) == 0
        other = federation.kits / ("h1" if site == "h0" else "h0") / "node.pub"
        assert cli(["audit", "verify", str(log), "--key", str(other)]) == 1
    # The issue's attack on a copy of h0's real log: a lower ε, every hash and the head recomputed
    copy = tmp_path / "audit.jsonl"
    entries = _read(federation.kits / "h0" / "state" / "audit.jsonl")
    spent = next(i for i, e in enumerate(entries) if "epsilon" in e)
    entries[spent]["epsilon"] = 0.01
    _write_forgery(copy, _rechain(entries), {})
    assert cli(["audit", "verify", str(copy)]) == 0  # the chain alone is fooled (why --key exists)
    assert cli(["audit", "verify", str(copy), "--key", str(federation.kits / "h0" / "node.pub")]) == 1
