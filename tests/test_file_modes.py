"""Patient data at rest is owner-only: every file medsilo derives from it is 0600, every folder 0700 (issue 24).

The tests run under the usual umask 022, under which a file written without an explicit mode is 0644 and a
folder 0755: a path that is group- or world-accessible afterwards was written by medsilo without one.
"""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.dicom import new_uid
from client.ingest import ingest
from client.pacs import sync
from client.preprocessing import Preprocessing
from client.site import SiteClient
from common import audit, crypto
from common import control_variates as cv
from common.config import RunConfig
from common.datasets import MedMNIST, load
from common.features import CACHE_FOLDER
from common.io import (
    OWNER_ONLY_UMASK,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    owner_only_umask,
    private_dir,
)
from common.models import build_model
from common.site_policy import template
from simulations.archive import write_archives
from simulations.partition import PartitionSpec, scanner_profiles
from simulations.runner import make_sites, write_sites
from simulations.synthetic_dicom import Equipment, Identity, image_dataset

ROOT = Path(__file__).resolve().parents[1]


def shared_paths(root: Path) -> list[str]:
    """Every path under ``root`` (``root`` included) whose group or others have any permission, with its mode.

    Files and folders alike: ``mode & 0o077`` must be 0. Symbolic links (whose own mode means nothing) are
    skipped; what they point to is checked where it lies.
    """
    found = []
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(st.st_mode):04o}")
    return found


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask of most Linux accounts (022), whatever the test runner's is; restored afterwards."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_shared_paths_finds_group_or_world_accessible_files_and_folders(tmp_path: Path) -> None:
    # Prepare: one private and one readable file, a private and a traversable folder
    root = private_dir(tmp_path / "root")
    (root / "ok").write_bytes(b"")
    os.chmod(root / "ok", 0o600)
    (root / "read").write_bytes(b"")
    os.chmod(root / "read", 0o604)
    (root / "dir").mkdir(mode=0o710)
    # Execute
    found = shared_paths(root)
    # Assert: the helper the tests below rest on reports both, and only them
    assert found == ["root/dir 0710", "root/read 0604"]


# ------------------------------------------------------------------------------ common.io
def test_writers_create_private_files_in_private_new_folders_and_public_writes_stay_public(tmp_path: Path) -> None:
    # Prepare: an existing folder of the user's, readable by all
    existing = tmp_path / "user"
    existing.mkdir(mode=0o755)
    # Execute: every writer, each into a folder it must create
    atomic_write_bytes(existing / "a" / "b" / "x.bin", b"x")
    atomic_write_text(existing / "t" / "x.txt", "x")
    atomic_write_json(existing / "j" / "x.json", {"x": 1})
    atomic_write_npz(existing / "n" / "x.npz", {"a": np.zeros(2)}, {})
    append_jsonl(existing / "l" / "x.jsonl", {"x": 1})
    crypto.write_public(existing / "certs" / "ca.crt", b"certificate")
    # Assert: files 0600, the folders created for them 0700; the user's folder is left as it was
    for name in ("a/b/x.bin", "t/x.txt", "j/x.json", "n/x.npz", "l/x.jsonl"):
        assert _mode(existing / name) == 0o600, name
    for name in ("a", "a/b", "t", "j", "n", "l"):
        assert _mode(existing / name) == 0o700, name
    assert _mode(existing) == 0o755
    # ...and an explicitly public file (a certificate) stays readable by all, in a folder they can enter
    assert _mode(existing / "certs" / "ca.crt") == 0o644 and _mode(existing / "certs") == 0o755


def test_private_dir_creates_every_missing_folder_0700_and_tightens_an_existing_one(tmp_path: Path) -> None:
    # Prepare: a state folder left 0755 by an earlier version, with a file in it
    old = tmp_path / "state"
    old.mkdir(mode=0o755)
    (old / "kept").write_bytes(b"")
    # Execute
    new = private_dir(tmp_path / "a" / "b" / "c")
    tightened = private_dir(old)
    # Assert: created 0700 down the chain; the old folder tightened, its file left to its writer
    assert new == tmp_path / "a" / "b" / "c" and tightened == old
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c", "state")] == [0o700] * 4
    assert _mode(old / "kept") == 0o644


def test_owner_only_umask_covers_library_writes_and_is_restored(tmp_path: Path) -> None:
    # Execute: what libraries write (np.save, SQLite, a plain open, a folder, a child process)
    with owner_only_umask():
        np.save(tmp_path / "x.npy", np.zeros(3))
        sqlite3.connect(tmp_path / "x.db").execute("CREATE TABLE t (x)").connection.close()
        (tmp_path / "folder").mkdir()
        subprocess.run(["touch", str(tmp_path / "child")], check=True)
    after = os.umask(0o022)
    subprocess.run(["touch", str(tmp_path / "later")], check=True, umask=OWNER_ONLY_UMASK)
    # Assert: all owner-only; the umask back to 022 afterwards; Popen's umask= does the same for a child
    assert shared_paths(tmp_path) == []
    assert after == 0o022


# ------------------------------------------------------------------------------ a site, end to end
def _small_breastmnist() -> MedMNIST:
    data = load("breastmnist")
    return MedMNIST(info=data.info, train=data.train.subset(np.arange(64)), val=data.val.subset(np.arange(16)),
                    test=data.test)


def _simulated_sites(site_dir: Path) -> None:
    """Two simulated hospitals as ``simulate --dicom`` writes them, except that site 1 keeps its ``.npz``."""
    data = _small_breastmnist()
    parts = make_sites(data, 2, PartitionSpec("iid"), seed=0)
    write_sites(data, parts, scanner_profiles(2, strength=0.5, seed=0), site_dir, seed=0)
    write_archives(site_dir, 1, data.info, seed=0)  # site 0: a DICOM archive (its .npz removed)


def _audit_reply(state: Path, metrics: dict[str, Any]) -> None:
    """What ``client.app.audit_mod`` appends after a fit, in the node's ClientApp process.

    That process runs under the SuperNode's umask 077 (``client/node.py`` starts it so; the simulation runs
    its sites under :func:`owner_only_umask`): ``common.audit`` opens the log without a mode of its own.
    """
    with owner_only_umask():
        audit.append(state / "audit.jsonl", {"side": "site", "site": "alpha", "run": 1, "round": 1,
                                             "message": "train", "epsilon": metrics.get("epsilon")})


@pytest.mark.parametrize("node", ["simulated", "deployed"])
def test_a_dicom_site_ingested_and_trained_with_dp_leaves_nothing_others_can_read(tmp_path: Path, node: str) -> None:
    # Prepare: simulated sites (one a DICOM archive); a deployed node's kit whose state folder an earlier
    # version left 0755 (the kit itself may stay readable: certificates, public key)
    site_dir = tmp_path / "sim" / "sites"
    _simulated_sites(site_dir)
    kit = tmp_path / "kit"
    (kit / "state").mkdir(parents=True, mode=0o755)
    (kit / "site-policy.toml").write_text(template(epsilon_per_run=8.0, epsilon_lifetime=24.0, delta=1e-5))
    if node == "simulated":
        node_config: dict[str, Any] = {"partition-id": 0, "num-partitions": 2}
        state = site_dir / "site-00-state"
    else:
        node_config = {"data-path": str(site_dir / "site-00"), "state-dir": str(kit / "state"),
                       "policy-path": str(kit / "site-policy.toml")}
        state = kit / "state"
    cfg = RunConfig(dataset="breastmnist", site_data_dir=str(site_dir), batch_size=16, rounds=2, dp=True,
                    epsilon=8.0, accountant="rdp", scaffold=True)
    params = [v.numpy() for v in build_model(cfg.model, _small_breastmnist().info, seed=0).state_dict().values()]
    zeros = cv.encode([np.zeros_like(p) for p in params], config=cfg)
    client = SiteClient(Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                                run_config=cfg.to_flower()))
    # Execute: the node ingests its archive and trains one DP round (ledger, replay, feature cache, c_i), then
    # its ClientApp appends the reply to the audit log
    _, n, metrics = client.fit(params + zeros, {"server-round": 1, "secure-aggregation": 1})
    _audit_reply(state, metrics)
    # Assert: the round trained and wrote every kind of file this test is about...
    assert metrics["refused"] is False and n > 0
    written = {p.relative_to(state).parts[0] for p in state.rglob("*") if p.is_file()}
    assert {"dicom-cache", CACHE_FOLDER, "scaffold", "audit.jsonl"} <= written, written
    assert any(name.startswith("ledger-") for name in written) and any(name.startswith("replay-") for name in written)
    assert list((state / "dicom-cache").glob("*/images.npy")) and list((state / "dicom-cache").glob("*/index.json"))
    # ...and none of it, nor the simulated hospitals' records, is accessible to anyone but the owner
    assert shared_paths(tmp_path / "sim") == []
    assert shared_paths(state) == []


def test_the_audit_log_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    # Execute: an append from a process with the usual umask 022
    audit.append(tmp_path / "state" / "audit.jsonl", {"side": "site", "run": 1})
    # Assert
    assert shared_paths(tmp_path / "state") == []


# ------------------------------------------------------------------------------ the PACS spool
class _FakeDICOMweb:
    """A DICOMweb service holding ``instances`` (SOP UID -> dataset), searched and retrieved as dicomweb-client does."""

    instances: ClassVar[dict[str, Any]] = {}

    def __init__(self, url: str, session: Any = None) -> None:
        del url, session

    def search_for_instances(self, *, study_instance_uid: str | None, offset: int, limit: int,
                             get_remaining: bool) -> list[dict[str, Any]]:
        del study_instance_uid, get_remaining
        found = [{"0020000D": {"Value": [ds.StudyInstanceUID]}, "0020000E": {"Value": [ds.SeriesInstanceUID]},
                  "00080018": {"Value": [sop]}} for sop, ds in self.instances.items()]
        return found[offset : offset + limit]

    def retrieve_instance(self, study: str, series: str, sop: str, media_types: Any = None) -> Any:
        del study, series, media_types
        return self.instances[sop]


def test_the_pacs_spool_and_the_cache_built_from_it_are_owner_only(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a PACS with three images; a spool an earlier version left 0755 with one instance 0644 in it
    import dicomweb_client.api

    equipment = Equipment(manufacturer="ACME", model="X1", station="S1", modality="US")
    identity = Identity(patient_name="Doe^Jane", patient_id="MRN123", birth_date="19800101", sex="F",
                        accession="ACC1", study_uid=new_uid(), series_uid=new_uid(), study_date="20240101",
                        institution="Test Hospital")
    rng = np.random.default_rng(0)
    instances = {}
    for k in range(3):
        sop = new_uid()
        instances[sop] = image_dataset(rng.random((32, 32)), identity=identity, equipment=equipment,
                                       instance_number=k + 1, sop_uid=sop)
    monkeypatch.setattr(_FakeDICOMweb, "instances", instances)
    monkeypatch.setattr(dicomweb_client.api, "DICOMwebClient", _FakeDICOMweb)
    state = tmp_path / "state"
    spool = state / "pacs-spool"
    spool.mkdir(parents=True, mode=0o755)
    first = sync("https://pacs.example/dicom-web", spool)
    old = sorted(spool.glob("*.dcm"))[0]
    os.chmod(old, 0o644)
    os.chmod(spool, 0o755)
    os.chmod(state, 0o700)
    # Execute: the next sync, then the node ingests the spool into its cache
    again = sync("https://pacs.example/dicom-web", spool)
    settings = Preprocessing.for_dataset("breastmnist", size=28, channels=1, spatial_dims=2)
    result = ingest(spool, settings, cache_dir=state / "dicom-cache", workers=1)
    # Assert: all three retrieved once and ingested; spool, instances and cache accessible to the owner only
    assert (first.fetched, again.fetched, first.failed) == (3, 0, [])
    assert len(result.units) == 3
    assert shared_paths(state) == []


# ------------------------------------------------------------------------------ the coordinator
def test_the_superlink_starts_under_umask_077_with_its_state_folder_private(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a coordinator kit whose state folder and database an earlier version left readable by all
    from server import superlink

    kit = superlink.CoordinatorKit(root=tmp_path / "coordinator", federation="demo", hosts=("localhost",),
                                   port=19443, bind="0.0.0.0")
    kit.database.parent.mkdir(parents=True, mode=0o755)
    kit.database.write_bytes(b"")
    os.chmod(kit.database, 0o644)
    started: list[dict[str, Any]] = []

    class Process:
        stdout = io.StringIO("")  # the SuperLink's output, read through a pipe

        def poll(self) -> int | None:
            return None

    monkeypatch.setattr(superlink.subprocess, "Popen", lambda cmd, **kw: started.append(kw) or Process())
    monkeypatch.setattr(superlink, "wait_ready", lambda *a, **k: 0.0)
    # Execute
    link = superlink.SuperLink(kit, log_file=tmp_path / "coordinator" / "superlink.log").start()
    link._log_handle.close()  # type: ignore[union-attr]
    # Assert: the SuperLink process (and what it starts) creates files 0600; state, database, connection, log private
    assert started and started[0]["umask"] == OWNER_ONLY_UMASK
    assert shared_paths(kit.database.parent) == [] and shared_paths(kit.flwr_home) == []
    assert _mode(tmp_path / "coordinator" / "superlink.log") == 0o600
