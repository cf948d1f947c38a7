"""Offline behaviour: with HF_HUB_OFFLINE=1 a run touches no network, and a hub
id that is not cached gets a message saying how to provide the model."""

import socket

import pytest

from gadiag_core.commands.main import main
from test_cli import TINY_CONFIG


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_run_touches_no_network(no_network, tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "harness.toml"
    config.write_text(TINY_CONFIG)
    code = main(["--config", str(config), "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file()


def test_offline_uncached_hub_id_says_how_to_provide_it(no_network, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(["--model", "some-org/not-cached-model", "--output-dir", str(tmp_path), "--questions", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "some-org/not-cached-model" in err and "offline" in err and "download" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
