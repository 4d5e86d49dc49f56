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
from server.provision import ProvisionError, add_site, provision, revoke_site

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
            "COMMANDS.md", "ca.crt", "kit.toml", "node.key", "node.pub", "site-policy.toml"]


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
    with pytest.raises(crypto.CertificateProblem, match="expired"):
        crypto.check_valid_now(kits / "coordinator" / "server.crt", now=later)
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
