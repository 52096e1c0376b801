"""Settings for running as a service: the [http] table, the systemd config directory, the system socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from runnerd import config
from runnerd.cli.parser import build_parser
from runnerd.cli.serve import _http_overrides as http_overrides
from runnerd.config import ConfigError, load_settings, parse_listen


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RUNNERD_CONFIG", "RUNNERD_HTTP__LISTEN", "RUNNERD_HTTP__TOKEN_FILE", "RUNNERD_SOCKET",
                 "RUNNERD_RUNTIME_DIR", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:8434", ("127.0.0.1", 8434)),
    ("[::1]:80", ("::1", 80)),
    ("node-7.example:0", ("node-7.example", 0)),
])
def test_listen_addresses(text, parsed):
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["8434", ":8434", "host:", "host:http", "::1:80", "host:70000", "[]:1"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_http_table_env_and_flags_merge(tmp_path, monkeypatch):
    cfg = tmp_path / "runnerd.toml"
    cfg.write_text('[http]\nlisten = "0.0.0.0:8434"\ntoken_file = "/etc/runnerd/token"\n')
    s = load_settings(cfg)
    assert (s.http.listen, s.http.token_file) == ("0.0.0.0:8434", Path("/etc/runnerd/token"))
    monkeypatch.setenv("RUNNERD_HTTP__LISTEN", "127.0.0.1:9000")
    assert load_settings(cfg).http.listen == "127.0.0.1:9000"
    args = build_parser().parse_args(["serve", "--listen", "[::1]:9001"])
    s = load_settings(cfg, http=http_overrides(args))
    assert (s.http.listen, s.http.token_file) == ("[::1]:9001", Path("/etc/runnerd/token"))
    monkeypatch.delenv("RUNNERD_HTTP__LISTEN")
    assert load_settings().http.listen is None, "off by default"


@pytest.mark.parametrize(("text", "fragment"), [
    ('[http]\nlisten = "nope"', "http.listen"),
    ('[http]\ntoken = "s3cret"', "http.token"),  # a token belongs in a file, and typos are not ignored
])
def test_bad_http_table(tmp_path, text, fragment):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(cfg)


def test_no_token_flag_on_the_command_line():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--token", "s3cret"])


def test_systemd_configuration_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))
    assert load_settings().keep_alive == "5m", "no runnerd.toml there: defaults"
    (tmp_path / "runnerd.toml").write_text('keep_alive = "1h"\n')
    assert load_settings().keep_alive == "1h"


def test_clients_find_the_system_socket(tmp_path, monkeypatch):
    system = tmp_path / "system.sock"
    monkeypatch.setattr(config, "SYSTEM_SOCKET", system)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "user"))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    own = tmp_path / "user" / "runnerd" / "runnerd.sock"
    assert config.default_socket() == own, "nothing running anywhere: the user's own"
    system.touch()
    assert config.default_socket() == system
    own.parent.mkdir(parents=True)
    own.touch()
    assert config.default_socket() == own, "a daemon of one's own wins"
