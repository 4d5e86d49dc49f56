"""Signed audit logs: a site's node key or the coordinator's key signs every line and the head (issue 24)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import audit, crypto
from common.cli import main as cli
from common.errors import MedsiloError
from server.federation import load_federation
from server.provision import provision

HAVE_SSH_KEYGEN = shutil.which("ssh-keygen") is not None


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path


def _node_keys(folder: Path, name: str = "hospital-a") -> KeyFiles:
    pair = crypto.create_node_keys(comment=name)
    folder.mkdir(parents=True, exist_ok=True)
    crypto.write_private(folder / "node.key", pair.private_openssh)
    crypto.write_public(folder / "node.pub", pair.public_openssh)
    return KeyFiles(folder / "node.key", folder / "node.pub")


def _coordinator_keys(folder: Path) -> KeyFiles:
    ca = crypto.create_ca(federation="test-fed")
    server = crypto.issue_server_certificate(ca=ca, hosts=["localhost", "127.0.0.1"], federation="test-fed")
    folder.mkdir(parents=True, exist_ok=True)
    crypto.write_public(folder / "ca.crt", ca.certificate_pem)
    crypto.write_private(folder / "server.key", server.private_key_pem)
    crypto.write_public(folder / "server.crt", server.certificate_pem)
    return KeyFiles(folder / "server.key", folder / "server.crt")


def _site_records(n: int) -> list[dict[str, object]]:
    return [
        {"side": "site", "run": 7, "round": str(i), "bytes": 1000 + i, "payload_sha256": f"{i:02x}" * 32,
         "epsilon": 0.5 * (i + 1), "delta": 1e-5}
        for i in range(n)
    ]


def _write_log(path: Path, signer: crypto.Signer | None, n: int = 5) -> Path:
    for record in _site_records(n):
        audit.append(path, record, signer=signer)
    return path


@pytest.fixture
def node(tmp_path) -> KeyFiles:
    return _node_keys(tmp_path / "kit-a")


@pytest.fixture
def signed_log(tmp_path, node) -> Path:
    return _write_log(tmp_path / "state" / "audit.jsonl", crypto.load_signer(node.private))


# ------------------------------------------------------------- the attacker's own recomputation (no module helpers)
def _canonical(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _rechain(lines: list[dict[str, object]], *, strip_signatures: bool = False) -> list[dict[str, object]]:
    """Recompute seq/prev/hash exactly as a careful attacker would: SHA-256 over canonical JSON without hash/sig."""
    prev = "0" * 64
    out = []
    for seq, line in enumerate(lines):
        entry = {k: v for k, v in line.items() if k not in ("hash", "sig", "key")} if strip_signatures else dict(line)
        entry["seq"], entry["prev"] = seq, prev
        entry["hash"] = hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "sig")}))\
            .hexdigest()
        prev = str(entry["hash"])
        out.append(entry)
    return out


def _write_forgery(path: Path, entries: list[dict[str, object]], head_extra: dict[str, object]) -> None:
    path.write_bytes(b"".join(_canonical(e) + b"\n" for e in entries))
    head = {"seq": entries[-1]["seq"], "hash": entries[-1]["hash"], **head_extra}
    path.with_name(path.name + ".head").write_text(json.dumps(head, indent=2) + "\n")


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ signing with the kits' keys
def test_a_log_signed_with_a_node_key_verifies_with_its_node_pub(node, signed_log) -> None:
    # Prepare
    verifier = crypto.load_verifier(node.public)
    kit_fingerprint = crypto.public_key_fingerprint(node.public.read_bytes())
    # Execute
    result = audit.verify(signed_log, key=verifier)
    # Assert
    assert result.ok, result.problems
    assert result.entries == 5 and result.unsigned == 0
    assert verifier.fingerprint == kit_fingerprint and result.signers == {kit_fingerprint: 5}
    assert all(e["key"] == kit_fingerprint and e["sig"] for e in _read(signed_log))
    head = json.loads(signed_log.with_name("audit.jsonl.head").read_text())
    assert head["key"] == kit_fingerprint and head["sig"] and head["seq"] == 4


def test_a_log_signed_with_the_coordinator_key_verifies_with_server_crt(tmp_path) -> None:
    # Prepare
    coordinator = _coordinator_keys(tmp_path / "coordinator")
    log = _write_log(tmp_path / "run" / "audit.jsonl", crypto.load_signer(coordinator.private), n=3)
    # Execute
    result = audit.verify(log, key=crypto.load_verifier(coordinator.public))
    # Assert
    assert result.ok, result.problems
    assert result.signed == 3 and result.signing_summary().startswith("every entry signed by SHA256:")


def test_provisioned_kits_sign_and_verify_with_their_own_files(tmp_path) -> None:
    # Prepare: the files exactly as `medsilo provision` writes them.
    spec = tmp_path / "federation.toml"
    spec.write_text('[federation]\nname = "f"\n[coordinator]\nhosts = ["localhost"]\nport = 19443\n'
                    '[[sites]]\nname = "alpha"\n')
    kits = provision(load_federation(spec), tmp_path / "kits").root
    site_log, coord_log = tmp_path / "site.jsonl", tmp_path / "coord.jsonl"
    # Execute
    _write_log(site_log, crypto.load_signer(kits / "alpha" / "node.key"), n=2)
    _write_log(coord_log, crypto.load_signer(kits / "coordinator" / "server.key"), n=2)
    # Assert: the coordinator's copy of the site's public key works too.
    assert audit.verify(site_log, key=crypto.load_verifier(kits / "alpha" / "node.pub")).ok
    assert audit.verify(site_log, key=crypto.load_verifier(kits / "coordinator" / "nodes" / "alpha.pub")).ok
    assert audit.verify(coord_log, key=crypto.load_verifier(kits / "coordinator" / "server.crt")).ok
    assert not audit.verify(coord_log, key=crypto.load_verifier(kits / "alpha" / "node.pub")).ok


def test_the_verifier_accepts_the_node_pub_line_the_kit_writes(node) -> None:
    # Prepare
    line = node.public.read_bytes()
    signer = crypto.load_signer(node.private)
    signature = signer.sign(b"round 3")
    # Execute
    verifier = crypto.verifier_from_public_bytes(line, source=str(node.public))
    # Assert
    assert line.startswith(b"ecdsa-sha2-nistp") and line.rstrip().endswith(b"hospital-a")
    assert verifier.fingerprint == signer.fingerprint == crypto.public_key_fingerprint(line)
    assert verifier.verify(b"round 3", signature) is None
    with pytest.raises(crypto.SignatureProblem, match=re.escape(verifier.fingerprint)):
        verifier.verify(b"round 4", signature)


@pytest.mark.skipif(not HAVE_SSH_KEYGEN, reason="needs OpenSSH's ssh-keygen")
def test_fingerprints_match_openssh_and_a_pem_export_of_the_same_key_verifies(tmp_path, node, signed_log) -> None:
    # Prepare: OpenSSH's own fingerprint, and node.pub converted to a PEM public key by OpenSSH.
    printed = subprocess.run(["ssh-keygen", "-lf", str(node.public)], capture_output=True, text=True, check=True)
    pem = subprocess.run(["ssh-keygen", "-e", "-m", "PKCS8", "-f", str(node.public)], capture_output=True,
                         check=True).stdout
    (tmp_path / "node.pem").write_bytes(pem)
    # Execute
    pem_verifier = crypto.load_verifier(tmp_path / "node.pem")
    result = audit.verify(signed_log, key=pem_verifier)
    # Assert: the PEM form is named by its SubjectPublicKeyInfo digest yet recognises the OpenSSH-named lines.
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert printed.stdout.split()[1] == crypto.load_signer(node.private).fingerprint
    assert pem_verifier.fingerprint != crypto.load_verifier(node.public).fingerprint
    assert result.ok, result.problems


def test_a_signature_over_other_data_or_garbage_raises_a_medsilo_error(node) -> None:
    # Prepare
    verifier = crypto.load_verifier(node.public)
    signature = crypto.load_signer(node.private).sign(b"data")
    # Execute / Assert
    for data, sig in ((b"other", signature), (b"data", "not base64!"), (b"data", signature[:-8] + "AAAAAAA=")):
        with pytest.raises(MedsiloError, match="SHA256:"):
            verifier.verify(data, sig)


# ------------------------------------------------------------------------------ the issue's attack
@pytest.mark.parametrize("variant", ["keep-signatures", "strip-signatures", "re-sign-with-another-key"])
def test_an_edited_epsilon_with_every_hash_and_the_head_recomputed_fails_only_with_the_key(tmp_path, node,
                                                                                          signed_log, variant) -> None:
    # Prepare: lower round 2's ε, then recompute every hash, prev and the head as common/audit.py does.
    entries = _read(signed_log)
    entries[2]["epsilon"] = 0.01
    head_extra: dict[str, object] = {}
    if variant == "keep-signatures":
        forged = _rechain(entries)
    elif variant == "strip-signatures":
        forged = _rechain(entries, strip_signatures=True)
    else:
        attacker = crypto.load_signer(_node_keys(tmp_path / "attacker", "attacker").private)
        forged = _rechain([{**e, "key": attacker.fingerprint} for e in entries])
        for e in forged:
            e["sig"] = attacker.sign(audit.ENTRY_CONTEXT + str(e["hash"]).encode("ascii"))
        last = forged[-1]
        head_extra = {"key": attacker.fingerprint,
                      "sig": attacker.sign(audit.HEAD_CONTEXT + _canonical({"hash": last["hash"], "seq": last["seq"]}))}
    _write_forgery(signed_log, forged, head_extra)
    verifier = crypto.load_verifier(node.public)
    # Execute
    unkeyed = audit.verify(signed_log)
    keyed = audit.verify(signed_log, key=verifier)
    # Assert: the chain alone is fooled (the documented reason for --key); the signatures are not.
    assert unkeyed.ok, unkeyed.problems
    assert not keyed.ok
    assert any(p.startswith("line 3:") for p in keyed.problems), keyed.problems
    assert any("audit.jsonl.head" in p for p in keyed.problems), keyed.problems
    if variant == "keep-signatures":
        assert {p.split(":")[0] for p in keyed.problems if "does not verify" in p} == {"line 3", "line 4", "line 5"}


def test_a_line_signed_by_another_key_fails_under_the_key(tmp_path, node, signed_log) -> None:
    # Prepare: a chain-valid line appended with someone else's key.
    other = crypto.load_signer(_node_keys(tmp_path / "kit-b", "hospital-b").private)
    audit.append(signed_log, {"side": "site", "round": "5", "epsilon": 9.0}, signer=other)
    # Execute
    keyed = audit.verify(signed_log, key=crypto.load_verifier(node.public))
    unkeyed = audit.verify(signed_log)
    # Assert
    assert not keyed.ok
    assert any(p.startswith("line 6: signed by " + other.fingerprint) for p in keyed.problems), keyed.problems
    assert unkeyed.ok and len(unkeyed.signers) == 2 and unkeyed.signers[other.fingerprint] == 1


def test_an_unsigned_line_appended_to_a_signed_log_fails_under_the_key(node, signed_log) -> None:
    # Prepare: a writer without the key appends through the public API.
    audit.append(signed_log, {"side": "site", "round": "5", "epsilon": 0.1})
    # Execute
    keyed = audit.verify(signed_log, key=crypto.load_verifier(node.public))
    unkeyed = audit.verify(signed_log)
    # Assert
    assert not keyed.ok
    assert any(p.startswith("line 6: unsigned") for p in keyed.problems), keyed.problems
    assert any("head is unsigned" in p for p in keyed.problems), keyed.problems
    assert unkeyed.ok and unkeyed.unsigned == 1 and any("unsigned after signed" in n for n in unkeyed.notes)


def test_a_damaged_signature_fails_under_the_key_though_the_chain_holds(node, signed_log) -> None:
    # Prepare: `sig` is outside the hash, so only the signature check can see this.
    entries = _read(signed_log)
    sig = str(entries[1]["sig"])
    entries[1]["sig"] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    signed_log.write_bytes(b"".join(_canonical(e) + b"\n" for e in entries))
    # Execute
    keyed = audit.verify(signed_log, key=crypto.load_verifier(node.public))
    # Assert
    assert audit.verify(signed_log).ok
    assert keyed.problems == [f"line 2: signature does not verify with {keyed.key} (the line or an earlier one was "
                              "edited and re-hashed, or the signature was forged)"]


def test_cutting_the_last_line_and_rewriting_the_head_fails_on_the_heads_signature(node, signed_log) -> None:
    # Prepare: drop line 5 and point the head at line 4, keeping the head's key and (now stale) signature.
    head_path = signed_log.with_name("audit.jsonl.head")
    head = json.loads(head_path.read_text())
    entries = _read(signed_log)[:-1]
    signed_log.write_bytes(b"".join(_canonical(e) + b"\n" for e in entries))
    head_path.write_text(json.dumps({**head, "seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}))
    # Execute
    keyed = audit.verify(signed_log, key=crypto.load_verifier(node.public))
    # Assert
    assert audit.verify(signed_log).ok
    assert keyed.problems == [f"audit.jsonl.head: signature does not verify with {keyed.key} (edited, or rewritten "
                              "without the key)"]


def test_a_rollback_to_an_older_signed_copy_is_the_documented_limit(tmp_path, node) -> None:
    # Prepare: keep a copy of the log and head after 3 entries, append 2 more, then put the old copy back.
    signer = crypto.load_signer(node.private)
    log = _write_log(tmp_path / "audit.jsonl", signer, n=3)
    head = log.with_name("audit.jsonl.head")
    old_log, old_head = log.read_bytes(), head.read_bytes()
    for record in _site_records(2):
        audit.append(log, record, signer=signer)
    log.write_bytes(old_log)
    head.write_bytes(old_head)
    # Execute
    result = audit.verify(log, key=crypto.load_verifier(node.public))
    # Assert: it verifies; only the note (compare with a copy of the head kept elsewhere) points at the gap.
    assert result.ok and result.entries == 3
    assert any("rollback" in n and "entry 2" in n for n in result.notes)


def test_the_key_id_is_covered_by_the_hash(tmp_path, signed_log) -> None:
    # Prepare: relabel a line with another fingerprint without recomputing its hash.
    other = crypto.load_signer(_node_keys(tmp_path / "kit-b", "hospital-b").private)
    entries = _read(signed_log)
    entries[0]["key"] = other.fingerprint
    signed_log.write_bytes(b"".join(_canonical(e) + b"\n" for e in entries))
    # Execute
    result = audit.verify(signed_log)
    # Assert
    assert "line 1: content does not match its hash (edited)" in result.problems


def test_an_old_unsigned_log_still_verifies_without_a_key_and_fails_with_one(tmp_path, node) -> None:
    # Prepare
    log = _write_log(tmp_path / "audit.jsonl", None, n=3)
    # Execute
    unkeyed = audit.verify(log)
    keyed = audit.verify(log, key=crypto.load_verifier(node.public))
    # Assert
    assert unkeyed.ok and unkeyed.unsigned == 3 and unkeyed.signing_summary() == "unsigned"
    assert any("unsigned" in n for n in unkeyed.notes)
    assert all("key" not in e and "sig" not in e for e in _read(log))
    assert not keyed.ok and sum(p.endswith(f"must be signed by {keyed.key}") for p in keyed.problems) == 4


def test_a_record_may_not_carry_the_reserved_signature_fields(tmp_path) -> None:
    # Prepare
    log = tmp_path / "audit.jsonl"
    # Execute / Assert
    with pytest.raises(audit.AuditError, match="reserved key"):
        audit.append(log, {"side": "site", "key": "mine"})
    assert not log.exists()


# ------------------------------------------------------------------------------ loading keys
def test_load_signer_refuses_bad_files_with_the_fix_and_no_key_material(tmp_path, node) -> None:
    # Prepare
    loose = tmp_path / "loose.key"
    loose.write_bytes(node.private.read_bytes())
    loose.chmod(0o644)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    public_as_private = tmp_path / "node.pub.copy"
    public_as_private.write_bytes(node.public.read_bytes())
    public_as_private.chmod(0o600)
    cases = {tmp_path / "missing.key": "missing", loose: "chmod 600", garbage: "could not be parsed",
             public_as_private: "not a private key"}
    for path, expected in cases.items():
        # Execute
        with pytest.raises(crypto.KeyFileProblem) as caught:
            crypto.load_signer(path)
        # Assert
        assert str(path) in str(caught.value) and expected in str(caught.value)
        assert node.public.read_text().split()[1][:20] not in str(caught.value)


# ------------------------------------------------------------------------------ the CLI
def test_cli_exits_0_with_the_matching_key_and_names_its_fingerprint(node, signed_log, capsys) -> None:
    # Prepare
    fingerprint = crypto.load_verifier(node.public).fingerprint
    # Execute
    code = cli(["audit", "verify", str(signed_log), "--key", str(node.public)])
    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert f"OK, 5 entries, chain and head intact, every entry signed by {fingerprint}" in out


def test_cli_without_key_passes_a_signed_log_and_says_signatures_were_not_checked(signed_log, capsys) -> None:
    # Execute
    code = cli(["audit", "verify", str(signed_log)])
    # Assert
    assert code == 0 and "NOT checked" in capsys.readouterr().out


def test_cli_exits_1_and_lists_each_problem_when_a_signature_fails(tmp_path, node, signed_log, capsys) -> None:
    # Prepare: the issue's attack.
    entries = _read(signed_log)
    entries[0]["epsilon"] = 0.01
    _write_forgery(signed_log, _rechain(entries, strip_signatures=True), {})
    # Execute
    code = cli(["audit", "verify", str(signed_log), "--key", str(node.public)])
    # Assert
    out = capsys.readouterr().out
    assert code == 1 and "TAMPERED" in out
    assert all(f"  - line {n}: unsigned" in out for n in range(1, 6)) and "head is unsigned" in out


def test_cli_exits_2_with_one_clear_error_for_an_unusable_key_file(tmp_path, node, signed_log, capsys) -> None:
    # Prepare
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("this is not a key\n")
    cases = {tmp_path / "absent.pub": "missing", garbage: "not a public key medsilo can read",
             node.private: "is a private key"}
    for path, expected in cases.items():
        # Execute
        code = cli(["audit", "verify", str(signed_log), "--key", str(path)])
        # Assert
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        assert captured.err.startswith("medsilo: error: ") and str(path) in captured.err and expected in captured.err
        assert "BEGIN OPENSSH" not in captured.err and "node.pub" in captured.err
