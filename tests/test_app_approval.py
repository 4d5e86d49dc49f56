"""A hospital node runs only app code its hospital approved (issue 24: "the policy is enforced by code the
coordinator ships").

The node's ClientApp process checks the coordinator's app bundle (FAB) before anything of it is loaded and runs the
installed medsilo either way; these tests check the decision on real bundles of this checkout, tampered ones, and
the review command. tests/test_deployment.py runs the attack against real SuperNodes.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client import app_approval
from client.runner import handle
from common import audit
from common.cli import main as cli
from common.config import RunConfig
from common.site_policy import load_policy, template
from common.wire import REFUSAL_CODE, SiteReport

ROOT = Path(__file__).resolve().parents[1]


def bundle(edit: dict[str, bytes] | None = None, *, drop: tuple[str, ...] = ()) -> bytes:
    """A FAB of this checkout (the files `flwr build` packs for a ClientApp), with files replaced or removed."""
    files = {p.relative_to(ROOT).as_posix(): p.read_bytes()
             for package in ("client", "common", "server") for p in sorted((ROOT / package).rglob("*.py"))}
    files["pyproject.toml"] = (ROOT / "pyproject.toml").read_bytes()
    files.update(edit or {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            if name not in drop:
                archive.writestr(name, data)
    return buf.getvalue()


def tampered_policy_check() -> bytes:
    """The issue's attack: the site-policy check that always allows."""
    source = (ROOT / "common" / "site_policy.py").read_text()
    return source.replace("    out: list[str] = []\n", "    return []\n    out: list[str] = []\n", 1).encode()


def test_the_nodes_own_release_is_accepted_and_a_coordinator_side_change_does_not_matter() -> None:
    # Prepare
    policy = load_policy_text()
    # Execute
    same = app_approval.check(bundle(), policy)
    server_changed = app_approval.check(bundle({"server/app.py": b"# the coordinator's own business\n"}), policy)
    # Assert
    assert same.accepted and same.how == "the node's own medsilo release"
    assert server_changed.accepted


@pytest.mark.parametrize(("edit", "drop", "named"), [
    ({"common/site_policy.py": None}, (), "common/site_policy.py (differs)"),
    ({"client/dp/sgd.py": b"NOISE = 0\n"}, (), "client/dp/sgd.py (differs)"),
    ({"client/extra.py": b"import os\n"}, (), "client/extra.py (only in the bundle)"),
    ({}, ("client/dp/ledger.py",), "client/dp/ledger.py (missing from the bundle)"),
])
def test_a_bundle_with_other_site_code_is_refused_naming_the_files(edit, drop, named) -> None:
    # Prepare
    if "common/site_policy.py" in edit:
        edit = {"common/site_policy.py": tampered_policy_check()}
    content = bundle(edit, drop=drop)
    # Execute
    verdict = app_approval.check(content, load_policy_text())
    # Assert
    assert not verdict.accepted
    assert named in verdict.reason and verdict.digest in verdict.reason
    assert "medsilo site approve" in verdict.reason


def test_a_bundle_the_hospital_approved_is_accepted_and_garbage_is_refused(tmp_path) -> None:
    # Prepare
    content = bundle({"common/site_policy.py": tampered_policy_check()})
    digest = app_approval.fab_digest(content)
    policy = load_policy_text(f'[apps]\napproved = ["{digest}"]\n', tmp_path=tmp_path)
    # Execute / Assert
    assert app_approval.check(content, policy).accepted
    broken = app_approval.check(b"PK\x03\x04 not really a zip", policy)
    assert not broken.accepted and "not a readable zip" in broken.reason


def test_site_approve_shows_the_bundle_and_records_its_digest(tmp_path, capsys) -> None:
    # Prepare: a kit's policy and a tampered bundle kept by the node
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site-policy.toml").write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5))
    fab = tmp_path / "app.fab"
    fab.write_bytes(bundle({"common/site_policy.py": tampered_policy_check()}))
    # Execute
    code = cli(["site", "approve", str(fab), "--kit", str(kit), "--yes"])
    # Assert: the review names the differing file; the policy now lists the digest and still parses
    out = capsys.readouterr().out
    assert code == 0 and "common/site_policy.py (differs)" in out
    digest = app_approval.fab_digest(fab.read_bytes())
    assert load_policy(kit / "site-policy.toml").approved_apps == (digest,)
    assert "max-local-epochs = 10" in (kit / "site-policy.toml").read_text()  # the rest of the file kept


def test_the_node_refuses_an_unapproved_bundle_before_loading_it_and_keeps_it_for_review(tmp_path) -> None:
    # Prepare: a bundle whose ClientApp would leave a mark when imported; a deployed node's config.
    mark = tmp_path / "imported"
    evil = (ROOT / "client" / "app.py").read_text() + f"\nopen({str(mark)!r}, 'w').close()\n"
    content = bundle({"client/app.py": evil.encode()})
    (tmp_path / "policy.toml").write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5))
    context = Context(run_id=5, node_id=7, state=RecordDict(), run_config=RunConfig().to_flower(),
                      node_config={"policy-path": str(tmp_path / "policy.toml"), "state-dir": str(tmp_path / "state"),
                                   "site-name": "st-olav"})
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 5, 1
    message = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                      message_type=MessageType.TRAIN, group_id="1")
    # Execute
    reply = handle(message, context, content)
    # Assert: a refusal the coordinator reads; the bundle's code never ran; the node kept it and audited the refusal
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    report = SiteReport.from_error_reason(reply.error.reason)
    assert report is not None and "client/app.py (differs)" in report.reason
    assert not mark.exists()
    digest = app_approval.fab_digest(content)
    assert (tmp_path / "state" / "refused-apps" / (digest.replace(":", "-") + ".fab")).read_bytes() == content
    entries = [line for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and digest in entries[0] and '"app-refused"' in entries[0]
    assert audit.verify(tmp_path / "state" / "audit.jsonl").ok


def load_policy_text(extra: str = "", *, tmp_path: Path | None = None):
    """The template policy (plus ``extra`` TOML), parsed."""
    import tempfile

    folder = tmp_path or Path(tempfile.mkdtemp())
    path = folder / "policy.toml"
    text = template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5)
    if extra:
        text = text.split("[apps]")[0] + extra
    path.write_text(text)
    return load_policy(path)


def test_the_app_bundle_built_from_a_checkout_holds_only_the_code(tmp_path: Path) -> None:
    # Prepare: a checkout where a coordinator provisioned kits and a node kept its state (ledger, audit log)
    import shutil

    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "checkout"
    for name in ("client", "common", "server"):
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "pyproject.toml", app / "pyproject.toml")
    for path, text in {"kits/h0/site-policy.toml": "[budget]\n", "kits/h0/state/ledger-src-1.jsonl": "{}\n",
                       "kits/h0/state/audit.jsonl": "{}\n", "kits/federation.json": "{}", "README.md": "# x\n",
                       "runs/r1/metrics.jsonl": "{}\n"}.items():
        (app / path).parent.mkdir(parents=True, exist_ok=True)
        (app / path).write_text(text)
    # Execute: what `flwr run` uploads
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        names = set(fab.namelist())
    # Assert: the code (so a node can compare its site code), the manifest and the config; nothing else
    assert {n.split("/")[0] for n in names} - {".info", "pyproject.toml"} == {"client", "common", "server"}
    assert all(n.endswith(".py") for n in names if n.split("/")[0] in ("client", "common", "server"))
    assert "client/app.py" in names and not any(n.startswith(("kits/", "runs/")) for n in names)
