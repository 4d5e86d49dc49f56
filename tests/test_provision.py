"""Provisioning: the federation file, the CA and certificates, kits, add / revoke, bad input."""

from __future__ import annotations

import datetime as dt
import os
import stat
import tomllib

import pytest

from common import crypto
from common.cli import main
from common.errors import ConfigError
from server.federation import load_federation, parse_federation
from server.provision import ProvisionError, add_site, provision, renew_server_certificate, revoke_site

FEDERATION = """
[federation]
name = "test-fed"

[coordinator]
hosts = ["localhost", "127.0.0.1", "::1"]
port = 19443

[[sites]]
name = "alpha"
epsilon = 4.0

[[sites]]
name = "beta"
"""


@pytest.fixture
def kits(tmp_path):
    spec_file = tmp_path / "federation.toml"
    spec_file.write_text(FEDERATION)
    return provision(load_federation(spec_file), tmp_path / "kits").root


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_provision_writes_verifiable_kits_with_private_keys_0600(kits) -> None:
    coord = kits / "coordinator"
    # The server certificate chains to the CA, names every host, matches its key, and is valid now.
    crypto.check_issued_by(coord / "server.crt", coord / "ca.crt")
    crypto.check_valid_now(coord / "server.crt")
    crypto.check_key_matches_certificate(coord / "server.key", coord / "server.crt")
    assert set(crypto.certificate_hosts(coord / "server.crt")) == {"localhost", "127.0.0.1", "::1"}
    for site in ("alpha", "beta"):
        kit = kits / site
        crypto.check_node_private_key(kit / "node.key", kit / "node.pub")
        assert (coord / "nodes" / f"{site}.pub").read_bytes() == (kit / "node.pub").read_bytes()
        assert (kit / "ca.crt").read_bytes() == (coord / "ca.crt").read_bytes()
        settings = tomllib.loads((kit / "kit.toml").read_text())["kit"]
        assert settings["superlink"] == "localhost:19443" and settings["site"] == site
        policy = tomllib.loads((kit / "site-policy.toml").read_text())["privacy"]
        assert policy["require-secure-aggregation"] is True
        assert "medsilo client start" in (kit / "COMMANDS.md").read_text()
        assert _mode(kit / "node.key") == 0o600
    alpha = tomllib.loads((kits / "alpha" / "site-policy.toml").read_text())["privacy"]
    assert alpha["epsilon-per-run"] == 4.0 and alpha["epsilon-lifetime"] == 12.0
    assert _mode(coord / "server.key") == 0o600 and _mode(kits / "ca" / "ca.key") == 0o600
    # No private key in a hospital kit other than its own node key.
    for site in ("alpha", "beta"):
        assert sorted(p.name for p in (kits / site).iterdir()) == [
            "COMMANDS.md", "ca.crt", "kit.toml", "medsilo-node.service", "node.key", "node.pub", "site-policy.toml"]


def test_provision_never_overwrites(kits, tmp_path) -> None:
    before = (kits / "coordinator" / "server.key").read_bytes()
    with pytest.raises(ProvisionError, match="never overwrites"):
        provision(load_federation(tmp_path / "federation.toml"), kits)
    assert (kits / "coordinator" / "server.key").read_bytes() == before


def test_add_and_revoke_site_change_only_that_site(kits) -> None:
    # Execute
    folder = add_site(kits, parse_federation({"federation": {"name": "x"}, "coordinator": {"hosts": ["a.b"]},
                                              "sites": [{"name": "gamma"}]}).sites[0])
    revoke_site(kits, "alpha")
    # Assert
    assert (kits / "coordinator" / "nodes" / "gamma.pub").read_bytes() == (folder / "node.pub").read_bytes()
    assert not (kits / "coordinator" / "nodes" / "alpha.pub").exists()
    assert (kits / "coordinator" / "revoked" / "alpha.pub").exists()
    with pytest.raises(ConfigError, match="already revoked"):
        revoke_site(kits, "alpha")
    with pytest.raises(ConfigError, match="already in the federation"):
        add_site(kits, parse_federation({"federation": {"name": "x"}, "coordinator": {"hosts": ["a.b"]},
                                         "sites": [{"name": "alpha"}]}).sites[0])


def test_federation_file_problems_are_reported_together(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("""
[federation]
name = "Bad Name"
[coordinator]
hosts = ["https://x.org:443", "ok.example.org"]
port = 70000
[[sites]]
name = "dup"
[[sites]]
name = "dup"
epsilon = -1
""")
    with pytest.raises(ConfigError) as err:
        load_federation(bad)
    text = str(err.value)
    for expected in ("'Bad Name'", "https://x.org:443", "port = 70000", "dup", "epsilon = -1"):
        assert expected in text
    assert len(err.value.problems) == 5


def test_loose_key_permissions_expired_and_foreign_certificates_are_named(kits, tmp_path) -> None:
    key = kits / "alpha" / "node.key"
    os.chmod(key, 0o644)
    with pytest.raises(crypto.KeyFileProblem, match=r"chmod 600 .*node.key"):
        crypto.check_node_private_key(key)
    other = crypto.create_ca(federation="other")
    (tmp_path / "other.crt").write_bytes(other.certificate_pem)
    with pytest.raises(crypto.CertificateProblem, match="not issued by the CA"):
        crypto.check_issued_by(kits / "coordinator" / "server.crt", tmp_path / "other.crt")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(crypto.CertificateProblem, match="expired") as expired:
        crypto.check_valid_now(kits / "coordinator" / "server.crt", now=later)
    assert "`medsilo provision FEDERATION.toml --out KITS --renew`" in str(expired.value)
    with pytest.raises(crypto.CertificateProblem, match="expired") as expired:
        crypto.check_valid_now(kits / "ca" / "ca.crt", now=later + dt.timedelta(days=3650))
    assert "--renew" not in str(expired.value) and "new federation" in str(expired.value)
    with pytest.raises(crypto.CertificateProblem, match="not the private key"):
        crypto.check_key_matches_certificate(kits / "coordinator" / "server.key", tmp_path / "other.crt")
    with pytest.raises(crypto.CertificateProblem, match=r"not for 'evil\.example\.org'"):
        crypto.check_certificate_names(kits / "coordinator" / "server.crt", "evil.example.org")


def test_cli_provision_reports_errors_without_traceback(tmp_path, capsys) -> None:
    # Prepare
    spec = tmp_path / "federation.toml"
    spec.write_text(FEDERATION.replace('name = "beta"', 'name = "alpha"'))
    # Execute
    code = main(["provision", str(spec), "--out", str(tmp_path / "kits")])
    # Assert: one clear message, nothing written.
    err = capsys.readouterr().err
    assert code == 2 and "alpha" in err and "more than once" in err and "Traceback" not in err
    assert not (tmp_path / "kits").exists()


def test_a_node_key_fingerprint_is_the_one_ssh_keygen_prints(tmp_path) -> None:
    # Prepare: a node key as a kit holds it
    import shutil
    import subprocess

    keys = crypto.create_node_keys(comment="alpha@test-fed")
    pub = tmp_path / "node.pub"
    pub.write_bytes(keys.public_openssh)
    # Execute
    ours = crypto.public_key_fingerprint(keys.public_openssh)
    # Assert: OpenSSH's own tool shows the same (an out-of-band check by phone or letter can match)
    assert ours.startswith("SHA256:") and "=" not in ours
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) is not installed")
    theirs = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert theirs.split()[1] == ours


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_renewal_reissues_only_the_server_certificate_from_the_same_ca(kits, tmp_path) -> None:
    # Prepare: the SuperLink's site registry as `medsilo server start` keeps it, and every file as it is now
    coord = kits / "coordinator"
    (coord / "state").mkdir()
    (coord / "state" / "registry.json").write_text('{"alpha": {"node_id": 7, "status": "registered"}}')
    before = _tree(kits)
    (tmp_path / "old.crt").write_bytes(before["coordinator/server.crt"])
    old_expiry = crypto.certificate_not_after(coord / "server.crt")
    # Execute
    renewed = renew_server_certificate(kits, days=730, spec=load_federation(tmp_path / "federation.toml"))
    # Assert: a new certificate, from the same CA, for the same hosts and key, valid for longer
    assert renewed == coord / "server.crt" and renewed.read_bytes() != before["coordinator/server.crt"]
    crypto.check_issued_by(renewed, kits / "ca" / "ca.crt")
    crypto.check_issued_by(renewed, kits / "alpha" / "ca.crt")  # what a hospital checks: its kit is unchanged
    crypto.check_valid_now(renewed)
    crypto.check_key_matches_certificate(coord / "server.key", renewed)
    assert crypto.certificate_hosts(renewed) == crypto.certificate_hosts(tmp_path / "old.crt")
    assert set(crypto.certificate_hosts(renewed)) == {"localhost", "127.0.0.1", "::1"}
    assert crypto.certificate_not_after(renewed) - old_expiry > dt.timedelta(days=300)
    assert _mode(renewed) == 0o644
    # Assert: nothing else changed, byte for byte (node keys, server.key, the federation record, the registry)
    after = _tree(kits)
    del before["coordinator/server.crt"], after["coordinator/server.crt"]
    assert after == before


def test_renewal_without_the_ca_key_says_how_and_changes_nothing(kits, tmp_path) -> None:
    # Prepare: the CA key taken offline, as the provisioning output advises
    offline = tmp_path / "offline-ca.key"
    os.replace(kits / "ca" / "ca.key", offline)
    before = _tree(kits)
    # Execute / Assert: the message names the missing file and the fix
    with pytest.raises(ProvisionError, match=r"ca\.key is missing.*Copy it back from its offline copy"):
        renew_server_certificate(kits)
    assert _tree(kits) == before
    # A CA key from another federation is refused too.
    (kits / "ca" / "ca.key").write_bytes(crypto.create_ca(federation="other").private_key_pem)
    os.chmod(kits / "ca" / "ca.key", 0o600)
    with pytest.raises(crypto.CertificateProblem, match="not the private key of the CA certificate"):
        renew_server_certificate(kits)
    # A federation file for other hosts, or out-of-range days, are refused before anything is read.
    os.replace(offline, kits / "ca" / "ca.key")
    moved = parse_federation({"federation": {"name": "test-fed"}, "coordinator": {"hosts": ["new.example.org"]},
                              "sites": [{"name": "alpha"}]})
    with pytest.raises(ProvisionError, match="renewal keeps the certificate's host names"):
        renew_server_certificate(kits, spec=moved)
    with pytest.raises(ConfigError, match=r"use 1\.\.825 days"):
        renew_server_certificate(kits, days=0)
    assert _tree(kits) == {**before, "ca/ca.key": (kits / "ca" / "ca.key").read_bytes()}


def test_cli_renew_reissues_the_server_certificate_for_the_days_asked(kits, tmp_path, capsys) -> None:
    # Prepare
    server_crt = kits / "coordinator" / "server.crt"
    node_key = (kits / "alpha" / "node.key").read_bytes()
    # Execute
    code = main(["provision", str(tmp_path / "federation.toml"), "--out", str(kits), "--renew", "--days", "30"])
    # Assert: valid for the 30 days asked, from now; the hospitals' keys are untouched
    out = capsys.readouterr().out
    assert code == 0 and "restart the SuperLink" in out
    left = crypto.certificate_not_after(server_crt) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < left <= dt.timedelta(days=30)
    assert (kits / "alpha" / "node.key").read_bytes() == node_key
    assert main(["provision", "--out", str(kits), "--renew"]) == 2  # which names? the federation file says
