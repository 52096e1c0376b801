"""The CLI without a daemon: the `ps` table's columns, and what `inspect` / `estimate` of a file import."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runnerd.cli.commands import ps_table
from runnerd.cli.parser import build_parser
from runnerd.estimate_params import ESTIMATE_PARAMS
from tests.tinymodels import write_tiny_llama

MiB = 1 << 20
GiB = 1 << 30


def runner(**changes: Any) -> dict[str, Any]:
    """One entry of GET /engines/ps, as the daemon writes it (RunnerInfo.model_dump(mode="json"))."""
    now = time.time()
    entry: dict[str, Any] = {
        "backend": "llama.cpp", "model": "tiny:latest", "mode": "completion", "state": "idle", "pid": 4242,
        "socket": "/run/x.sock", "log_path": None, "started_at": now - 125, "last_used": now - 30,
        "active_requests": 0, "keep_alive": 300.0, "expires_at": now + 270,
        "memory": {"known": True, "ram_bytes": 357 * MiB, "vram_bytes": 0, "devices": [], "notes": []},
        "measured_ram_bytes": 301 * MiB, "measured_vram_bytes": 0,
    }
    entry.update(changes)
    return entry


def as_dict(runners: list[dict[str, Any]]) -> list[dict[str, str]]:
    header, rows = ps_table(runners)
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_ps_shows_idle_time_expiry_and_ram_estimated_and_measured():
    [row] = as_dict([runner()])
    assert row["UP"] in ("2m05s", "2m06s")
    assert row["IDLE"] in ("30s", "31s")
    assert row["EXPIRES"] in ("4m29s", "4m30s")
    assert row["RAM EST/MEAS"] == "357Mi/301Mi"
    assert "VRAM EST/MEAS" not in row  # no runner has GPU memory: no column of dashes


def test_ps_vram_column_when_some_runner_has_gpu_memory():
    gpu = runner(model="big:latest", memory={"known": True, "ram_bytes": 512 * MiB, "vram_bytes": 5 * GiB // 2,
                                             "devices": [], "notes": []}, measured_vram_bytes=12 * GiB)
    cpu, big = as_dict([runner(), gpu])
    assert cpu["VRAM EST/MEAS"] == "0/-"  # estimated at none, not measured
    assert big["VRAM EST/MEAS"] == "2.5Gi/12Gi"


def test_ps_busy_loading_and_unknown_states():
    busy, loading, forever, each_request, unknown = as_dict([
        runner(active_requests=2, expires_at=None),
        runner(state="loading", pid=None, started_at=None, expires_at=None, measured_ram_bytes=0),
        runner(keep_alive=None, expires_at=None),
        runner(keep_alive=0.0, expires_at=None),
        runner(memory={"known": False, "ram_bytes": 0, "vram_bytes": 0, "devices": [], "notes": ["why"]}),
    ])
    assert (busy["IDLE"], busy["EXPIRES"]) == ("-", "-")  # in use: no keep-alive timer runs
    assert (loading["PID"], loading["UP"], loading["IDLE"], loading["RAM EST/MEAS"]) == ("-", "-", "-", "357Mi/-")
    assert forever["EXPIRES"] == "never"
    assert each_request["EXPIRES"] == "now"
    assert unknown["RAM EST/MEAS"] == "-/301Mi"


def test_ps_long_durations_stay_narrow():
    [row] = as_dict([runner(started_at=time.time() - 3 * 86400 - 4 * 3600 - 5, last_used=time.time() - 7500)])
    assert row["UP"] == "3d04h" and row["IDLE"] == "2h05m"


def test_cli_estimate_options_are_the_daemons_query_parameters():
    from backends.llamacpp import LlamaCppBackend
    from runnerd.api.estimate import ESTIMATE_PARAMS as daemon_params

    assert ESTIMATE_PARAMS is daemon_params  # one table for both
    args = build_parser().parse_args(["estimate", "m"])
    assert set(ESTIMATE_PARAMS) <= set(vars(args))
    # The GGUF engine understands every one of them.
    assert set(ESTIMATE_PARAMS) <= set(LlamaCppBackend.estimate_parameters)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf")


def run_cli(*args: str) -> tuple[dict[str, Any], list[str]]:
    """Run the CLI in a fresh interpreter; returns its --json output and the modules it imported."""
    code = ("import json, sys\nfrom runnerd.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *args, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), json.loads(out.stderr.strip().splitlines()[-1])


def test_inspect_file_imports_neither_the_daemon_nor_aiohttp(tiny: Path):
    summary, modules = run_cli("inspect", str(tiny))
    assert summary["architecture"] == "llama" and summary["parameter_count"] > 0
    heavy = [m for m in modules if m.split(".")[0] in ("aiohttp", "pydantic_settings", "psutil")
             or m in ("runnerd.config", "runnerd.server", "runnerd.scheduler", "backends.vllm")]
    assert heavy == []


def test_estimate_file_does_not_import_the_http_api(tiny: Path):
    result, modules = run_cli("estimate", str(tiny), "--ctx", "256", "--parallel", "2")
    assert result["context_size"] == 256 and result["runtime_flags"] == ["--parallel", "2"]
    assert not [m for m in modules if m.startswith(("runnerd.api", "aiohttp.web"))]
