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
    assert (s.keep_alive, s.stop_grace, s.engine("llama.cpp").threads) == ("10m", 2.0, 3)
    monkeypatch.setenv("RUNNERD_KEEP_ALIVE", "0")
    monkeypatch.setenv("RUNNERD_LLAMACPP__THREADS", "1")
    s = load_settings(cfg)
    assert (s.keep_alive, s.engine("llama.cpp").threads) == ("0", 1)
    assert load_settings(cfg, socket=tmp_path / "x.sock").socket_path == tmp_path / "x.sock"


def test_short_llama_server_variable(monkeypatch):
    monkeypatch.setenv("RUNNERD_LLAMA_SERVER", "/opt/llama/llama-server")
    assert load_settings().engine("llama.cpp").server == Path("/opt/llama/llama-server")


@pytest.mark.parametrize(("text", "fragment"), [
    ("keep_alive = ", "not valid TOML"),
    ('keep_alive = "whenever"', "keep_alive"),
    ("stop_grace = -1", "stop_grace"),
    ("no_such_setting = 1", "no_such_setting"),
    ("[llamacpp]\ncuda = 'maybe'", r"engines\.llama\.cpp\.cuda"),
    # A misspelt engine setting is refused by name, in the old table and in the new one.
    ("[llamacpp]\nthread = 4", r"engines\.llama\.cpp\.thread: Extra inputs"),
    ('[engines."llama.cpp"]\nthread = 4', r"engines\.llama\.cpp\.thread: Extra inputs"),
    ("[engines.vllm]\ndevice = 'tpu'", r"engines\.vllm\.device"),
    ("[engines.sglang]\nthreads = 1", "engines.sglang: no such engine"),
    ('catalog_url = "https://ops:secret@catalog.example/c.yaml"', "catalog_url: .*must not carry a user name"),
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
    assert (s.engine("llama.cpp").server, s.engine("llama.cpp").threads) == (Path("/from/env"), 3)
    import os

    assert "RUNNERD_LLAMACPP__SERVER" not in os.environ


def test_engine_tables_new_and_old_spellings_merge(monkeypatch, tmp_path):
    cfg = tmp_path / "runnerd.toml"
    cfg.write_text('[llamacpp]\nthreads = 3\n[engines."llama.cpp"]\ngpu_layers = 7\n[engines.vllm]\n'
                   'kv_cache_sequences = 2\n')
    s = load_settings(cfg)
    assert (s.engine("llama.cpp").threads, s.engine("llama.cpp").gpu_layers) == (3, 7)
    assert s.engine("vllm").kv_cache_sequences == 2
    # The environment beats the file, in either spelling of the table.
    monkeypatch.setenv("RUNNERD_VLLM__KV_CACHE_SEQUENCES", "5")
    assert load_settings(cfg).engine("vllm").kv_cache_sequences == 5
