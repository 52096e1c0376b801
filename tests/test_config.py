from __future__ import annotations

from pathlib import Path

import pytest

from runnerd.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RUNNERD_CONFIG", "RUNNERD_KEEP_ALIVE", "RUNNERD_LLAMA_SERVER", "RUNNERD_LLAMACPP__SERVER",
                 "RUNNERD_LLAMACPP__THREADS", "RUNNERD_SOCKET", "RUNNERD_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_follow_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    s = load_settings()
    assert s.socket_path == tmp_path / "rt" / "runnerd" / "runnerd.sock"
    assert s.data_dir == tmp_path / "data" / "runnerd"
    assert s.keep_alive == "5m"


def test_systemd_directories_win(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    s = load_settings()
    assert s.runtime_dir == tmp_path / "run" and s.data_dir == tmp_path / "state"


def test_file_then_env_then_flags(monkeypatch, tmp_path):
    cfg = tmp_path / "runnerd.toml"
    cfg.write_text('keep_alive = "10m"\nstop_grace = 2\n[llamacpp]\nthreads = 3\n')
    s = load_settings(cfg)
    assert (s.keep_alive, s.stop_grace, s.llamacpp.threads) == ("10m", 2.0, 3)
    monkeypatch.setenv("RUNNERD_KEEP_ALIVE", "0")
    monkeypatch.setenv("RUNNERD_LLAMACPP__THREADS", "1")
    s = load_settings(cfg)
    assert (s.keep_alive, s.llamacpp.threads) == ("0", 1)
    assert load_settings(cfg, socket=tmp_path / "x.sock").socket_path == tmp_path / "x.sock"


def test_short_llama_server_variable(monkeypatch):
    monkeypatch.setenv("RUNNERD_LLAMA_SERVER", "/opt/llama/llama-server")
    assert load_settings().llamacpp.server == Path("/opt/llama/llama-server")


@pytest.mark.parametrize(("text", "fragment"), [
    ("keep_alive = ", "not valid TOML"),
    ('keep_alive = "whenever"', "keep_alive"),
    ("stop_grace = -1", "stop_grace"),
    ("no_such_setting = 1", "no_such_setting"),
    ("[llamacpp]\ncuda = 'maybe'", "llamacpp.cuda"),
])
def test_bad_config_is_named(tmp_path, text, fragment):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_short_variable_merges_with_the_file_and_leaves_the_environment_alone(monkeypatch, tmp_path):
    cfg = tmp_path / "runnerd.toml"
    cfg.write_text('[llamacpp]\nthreads = 3\nserver = "/from/file"\n')
    monkeypatch.setenv("RUNNERD_LLAMA_SERVER", "/from/env")
    s = load_settings(cfg)
    assert (s.llamacpp.server, s.llamacpp.threads) == (Path("/from/env"), 3)
    import os

    assert "RUNNERD_LLAMACPP__SERVER" not in os.environ
