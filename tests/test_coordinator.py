"""The coordinator needs no patient data: its central test set is optional and never fetched at run time."""

from __future__ import annotations

import urllib.request

import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from common.config import RunConfig
from common.errors import ConfigError
from server.app import main
from simulations.loopback import LoopbackGrid


def test_server_eval_without_a_local_test_split_is_one_clear_error_and_nothing_is_downloaded(tmp_path, monkeypatch
                                                                                            ) -> None:
    # Prepare: a coordinator with no dataset anywhere it looks, and no network (a download attempt fails the test)
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSILO_DATA", str(empty))

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("the coordinator tried to download a dataset")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cfg = RunConfig(dataset="breastmnist", rounds=1, server_eval=True, out_dir=str(tmp_path / "run"))
    grid = LoopbackGrid(client_app, {}, cfg.to_flower())
    # Execute
    with pytest.raises(ConfigError) as caught:
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: one problem, naming the setting, the missing file and both fixes; no site was asked anything
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert "server-eval=true" in problem and "breastmnist.npz not found" in problem
    assert "MEDSILO_DATA" in problem and "-c 'server-eval=false'" in problem
    assert grid.received == []


def test_an_out_dir_holding_an_earlier_run_is_refused_unless_resumed_and_nothing_is_overwritten(tmp_path) -> None:
    # Prepare: the out-dir of an earlier run
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text('{"dataset": "pneumoniamnist"}')
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    cfg = RunConfig(dataset="breastmnist", rounds=1, server_eval=False, out_dir=str(out))
    grid = LoopbackGrid(client_app, {}, cfg.to_flower())
    # Execute
    with pytest.raises(ConfigError) as caught:
        main(grid, Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_flower()))
    # Assert: one problem with both fixes; the earlier run's files are as they were; no site was asked anything
    assert len(caught.value.problems) == 1
    assert "holds an earlier run" in caught.value.problems[0] and "resume=true" in caught.value.problems[0]
    assert (out / "run_config.json").read_text() == '{"dataset": "pneumoniamnist"}'
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert grid.received == []
