"""The files in systemd/: the units pass `systemd-analyze verify`, the service's sandbox stays tight,
and the sysusers/tmpfiles snippets create what they say (in a scratch root, never on this host).

`make test` installs Debian's systemd package when systemd-analyze is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNITS = ROOT / "systemd"
INSTALLED_AT = "/usr/local/bin/runnerd"
# `systemd-analyze security` exposure, 0 (locked down) to 10; a regression guard on the hardening.
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: run the tests with `make test`, which installs Debian's systemd package"
    return path


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> Path:
    """The units, with ExecStart pointing at this checkout's runnerd so that verify can resolve it."""
    runnerd = Path(sys.executable).parent / "runnerd"
    assert runnerd.is_file(), runnerd
    where = tmp_path_factory.mktemp("units")
    for unit in ("runnerd.service", "runnerd.socket"):
        (where / unit).write_text((UNITS / unit).read_text().replace(INSTALLED_AT, str(runnerd)))
    return where


def test_service_starts_the_installed_runnerd():
    assert f"ExecStart={INSTALLED_AT} serve" in (UNITS / "runnerd.service").read_text()


def test_units_verify(units):
    out = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(units / "runnerd.service"),
                          str(units / "runnerd.socket")], capture_output=True, text=True, timeout=60)
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "runnerd" in line]
    assert out.returncode == 0 and ours == [], out.stdout + out.stderr


def test_service_exposure(units):
    out = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                          str(units / "runnerd.service")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    match = re.search(r"Overall exposure level for runnerd\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, out.stdout


def test_service_hardening_and_integration():
    text = (UNITS / "runnerd.service").read_text()
    for directive in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "StateDirectory=runnerd", "CacheDirectory=runnerd", "RuntimeDirectory=runnerd",
                      "LogsDirectory=runnerd", "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw",
                      "SupplementaryGroups=video render", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                      "User=runnerd"):
        assert re.search(rf"^{re.escape(directive)}", text, re.M), directive
    socket_unit = (UNITS / "runnerd.socket").read_text()
    assert "ListenStream=/run/runnerd/runnerd.sock" in socket_unit and "SocketMode=0660" in socket_unit


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}", str(UNITS / "runnerd.sysusers")], check=True,
                   capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["runnerd"]
    assert user[5] == "/var/lib/runnerd" and user[6].endswith("nologin")
    assert "runnerd" in groups["video"][3].split(",") and "runnerd" in groups["render"][3].split(",")
    subprocess.run([tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(UNITS / "runnerd.tmpfiles")],
                   check=True, capture_output=True, timeout=60)
    config, state = (tmp_path / "etc/runnerd").stat(), (tmp_path / "var/lib/runnerd/models").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, int(groups["runnerd"][2]), 0o750)
    assert (state.st_uid, state.st_gid) == (int(user[2]), int(user[3]))
