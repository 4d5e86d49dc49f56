"""Hospital node and coordinator kits: checks and messages that need no running process."""

from __future__ import annotations

import os
import tomllib

import pytest

from client.node import explain_exit, load_kit, node_config
from common.errors import ConfigError
from server.federation import parse_federation
from server.provision import provision
from server.superlink import load_kit as load_coordinator_kit
from server.superlink import superlink_command


@pytest.fixture
def kits(tmp_path):
    spec = parse_federation({"federation": {"name": "unit"}, "coordinator": {"hosts": ["127.0.0.1"], "port": 19555},
                             "sites": [{"name": "alpha", "epsilon": 3.0}]})
    return provision(spec, tmp_path / "kits").root


def test_node_config_carries_site_data_policy_and_state(kits, tmp_path) -> None:
    kit = load_kit(kits / "alpha")
    text = node_config(kit, tmp_path / "site.npz")
    parsed = tomllib.loads("\n".join(text.split(" ")).replace("=", " = "))
    assert parsed["site-name"] == "alpha" and parsed["data-path"].endswith("site.npz")
    assert parsed["policy-path"].endswith("alpha/site-policy.toml") and parsed["state-dir"].endswith("alpha/state")
    assert parsed["allow-unmasked-updates"] is False
    assert kit.policy.epsilon_per_run == 3.0
    assert "allow-unmasked-updates=true" in node_config(kit, tmp_path / "x.npz", allow_unmasked=True)


def test_site_kit_problems_are_reported_together(kits) -> None:
    os.chmod(kits / "alpha" / "node.key", 0o644)
    (kits / "alpha" / "site-policy.toml").write_text("[privacy]\nepsilon-per-run = -2\ndelta = 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_kit(kits / "alpha")
    assert len(err.value.problems) == 3
    assert "chmod 600" in str(err.value) and "epsilon-per-run (-2.0)" in str(err.value)
    assert "delta = 0.5" in str(err.value)


def test_coordinator_kit_is_checked_and_commands_are_secure_by_default(kits) -> None:
    kit = load_coordinator_kit(kits / "coordinator")
    cmd = superlink_command(kit)
    assert "--enable-supernode-auth" in cmd and "--ssl-certfile" in cmd and "--insecure" not in cmd
    assert "--insecure" in superlink_command(kit, insecure=True)
    (kits / "coordinator" / "server.crt").write_bytes((kits / "ca" / "ca.crt").read_bytes())
    with pytest.raises(ConfigError, match="not the private key"):
        load_coordinator_kit(kits / "coordinator")


def test_exit_explanations_name_the_fix(kits) -> None:
    kit = load_kit(kits / "alpha")
    assert "medsilo server sync" in explain_exit("[code: 2004] Failed to activate SuperNode.", 1, kit)
    assert "same federation" in explain_exit("CERTIFICATE_VERIFY_FAILED", 1, kit)
    assert "revoked" in explain_exit("SuperNode terminated gracefully.", 0, kit)


def test_cli_client_start_reports_a_loose_key_without_traceback(kits, tmp_path, capsys) -> None:
    from common.cli import main

    # Prepare
    os.chmod(kits / "alpha" / "node.key", 0o640)
    data = tmp_path / "site.npz"
    data.write_bytes(b"")
    # Execute
    code = main(["client", "start", "--kit", str(kits / "alpha"), "--data", str(data)])
    # Assert: one message naming the file and the fix; the key file is untouched.
    err = capsys.readouterr().err
    assert code == 2 and "node.key" in err and "chmod 600" in err and "Traceback" not in err
    assert oct(os.stat(kits / "alpha" / "node.key").st_mode & 0o777) == "0o640"


def test_cli_server_start_rejects_a_site_kit(kits, capsys) -> None:
    from common.cli import main

    code = main(["server", "start", "--kit", str(kits / "alpha")])
    assert code == 2 and "not the coordinator's" in capsys.readouterr().err


def test_coordinator_kit_whose_certificate_lacks_a_host_is_refused(kits) -> None:
    # Prepare: the kit names a host its certificate was not issued for.
    kit_file = kits / "coordinator" / "kit.toml"
    text = kit_file.read_text()
    kit_file.write_text(text.replace('hosts = ["127.0.0.1"]', 'hosts = ["127.0.0.1", "new.example.org"]'))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"not for 'new\.example\.org'"):
        load_coordinator_kit(kits / "coordinator")


def test_node_config_names_a_dicom_folder_or_dicomweb_source(kits, tmp_path) -> None:
    # Prepare
    kit = load_kit(kits / "alpha")
    # Execute
    folder = node_config(kit, tmp_path / "dicom")
    web = node_config(kit, "https://pacs.example.org/dicom-web", labels=tmp_path / "labels.csv")
    # Assert: a folder is made absolute, a URL kept as is, the manifest passed as labels-path
    assert f'data-path="{(tmp_path / "dicom").absolute()}"' in folder and "labels-path" not in folder
    assert 'data-path="https://pacs.example.org/dicom-web"' in web
    assert f'labels-path="{(tmp_path / "labels.csv").absolute()}"' in web


def test_a_malformed_approval_list_policy_and_public_key_are_one_error_before_anything_starts(kits, tmp_path,
                                                                                                capsys) -> None:
    from common.cli import main

    # Prepare: a policy whose approval list holds a file name, a cohort floor of 1, and a node.pub of another key
    policy = kits / "alpha" / "site-policy.toml"
    text = policy.read_text().replace("approved = []", 'approved = ["app.fab"]').replace("min-cohort = 3",
                                                                                       "min-cohort = 1")
    policy.write_text(text)
    from common import crypto

    (kits / "alpha" / "node.pub").write_bytes(crypto.create_node_keys(comment="someone-else").public_openssh)
    data = tmp_path / "site.npz"
    data.write_bytes(b"")
    # Execute
    code = main(["client", "start", "--kit", str(kits / "alpha"), "--data", str(data)])
    # Assert: exit 2, every problem in one message, no traceback, no node state created
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'app.fab', which is not an app digest" in err and "min-cohort = 1" in err
    assert "node.pub" in err
    assert not (kits / "alpha" / "state").exists()


def test_the_node_caps_only_flowers_idle_poll() -> None:
    import inspect
    import time

    import flwr.supernode.start_client_internal as loop

    from client.supernode import IDLE_POLL_S, IdleClock

    # Flower's SuperNode loop still has the one fixed idle sleep the setting replaces (an upgrade may change it)
    source = inspect.getsource(loop)
    assert source.count("time.sleep(3)") == 1 and "import time" in source
    # Execute: the capped clock
    clock = IdleClock(0.01)
    t0 = time.monotonic()
    clock.sleep(3)
    # Assert: the sleep is capped, everything else is time's
    assert time.monotonic() - t0 < 1.0
    assert clock.monotonic is time.monotonic and 0 < IDLE_POLL_S < 3


def test_the_nodes_path_starts_only_medsilos_clientapp_and_flowers_superexec(tmp_path) -> None:
    import subprocess

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    from client.node import node_environment, write_launcher

    # Prepare: the node's PATH as `medsilo client start` gives it to flower-supernode
    launcher = write_launcher(tmp_path / "bin")
    env = node_environment(launcher.parent, tmp_path / "flwr", environ={"PATH": "/usr/bin:/bin", "SECRET": "x"})
    # Execute / Assert: an agent app (it would unpack and import the coordinator's bundle) and every other task
    # command Flower knows are refused; flwr-clientapp is medsilo's runner; nothing else is on PATH
    assert env["PATH"] == str(tmp_path / "bin") and "SECRET" not in env
    for command in set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}:
        result = subprocess.run([command], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and "refused" in result.stderr, command
    assert "client.runner" in launcher.read_text() and " -I" in launcher.read_text().splitlines()[0]
    superexec = subprocess.run(["flower-superexec", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert superexec.returncode == 0 and "runtime-api-address" in superexec.stdout


def test_a_worker_process_the_clientapp_spawns_does_not_run_a_second_clientapp(tmp_path, monkeypatch) -> None:
    # Prepare: multiprocessing's spawn makes each worker import the parent's main script as __mp_main__ (the
    # ClientApp decodes DICOM and may train in such workers); count the ClientApps the launcher would start
    import runpy

    import client.runner
    from client.node import write_launcher

    started: list[str] = []
    monkeypatch.setattr(client.runner, "main", lambda: started.append("clientapp"))
    launcher = write_launcher(tmp_path / "bin")
    # Execute: the launcher as a spawned worker imports it, then as the SuperExec runs it
    runpy.run_path(str(launcher), run_name="__mp_main__")
    as_worker = list(started)
    runpy.run_path(str(launcher), run_name="__main__")
    # Assert
    assert as_worker == [] and started == ["clientapp"]
