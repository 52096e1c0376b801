"""Install a catalog pip plan into a private virtual environment under the cache, staged aside and moved
into place whole, so a failed or cancelled install never looks installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from backends.base import InstallError, Progress, ProgressCallback
from backends.catalog.model import PipPlan
from backends.process import run_step

MARKER = "INSTALLED"
_PIP_LINE = re.compile(r"^(Collecting|Downloading|Installing|Successfully)\b")


def env_root(cache_dir: Path, engine: str, version: str, variant: str) -> Path:
    return cache_dir / "catalog" / engine / f"{version}-{variant}"


def env_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def installed_envs(cache_dir: Path) -> list[tuple[str, str, str, Path]]:
    """Blocking: (engine, version, variant, python) of every finished private environment."""
    found = []
    for marker in sorted((cache_dir / "catalog").glob(f"*/*/{MARKER}")):
        root = marker.parent
        version, _, variant = root.name.rpartition("-")
        if version and env_python(root).exists():
            found.append((root.parent.name, version, variant, env_python(root)))
    return found


def _report(cb: ProgressCallback | None, phase: str, percent: float | None, message: str = "") -> None:
    if cb is not None:
        cb(Progress(phase=phase, percent=percent, message=message))


async def install_env(root: Path, plan: PipPlan, progress: ProgressCallback | None = None) -> Path:
    """Create the environment at `root` (if missing) with the plan's pins; returns its python."""
    if (root / MARKER).is_file() and env_python(root).exists():
        return env_python(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{root.name}-", dir=root.parent))
    try:
        python = env_python(stage)
        _report(progress, "venv", 0, str(stage / "venv"))
        base = getattr(sys, "_base_executable", None) or sys.executable
        await run_step([base, "-m", "venv", str(stage / "venv")])
        seen = 0

        def on_pip(line: str) -> None:
            nonlocal seen
            if _PIP_LINE.match(line):
                seen += 1
                _report(progress, "pip", min(95.0, seen * 5.0), line[:200])

        env: dict[str, str] = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        env.update((str(k), v) for k, v in plan.build_environment.items())
        _report(progress, "pip", 0, " ".join(plan.packages))
        # `--` ends pip's options: a pin can never be read as one (the model refuses them anyway).
        await run_step([str(python), "-m", "pip", "install", "--progress-bar", "off", "--", *plan.packages],
                       on_line=on_pip, env=env)
        if plan.check_module:
            _report(progress, "verify", 97, f"import {plan.check_module}")
            await run_step([str(python), "-c", f"import importlib; importlib.import_module({plan.check_module!r})"],
                           env=env)
        (stage / MARKER).write_text("\n".join(plan.packages) + "\n")
        with contextlib.suppress(OSError):  # another install finished first: its result is as good
            stage.rename(root)
    finally:
        if stage.exists():
            await asyncio.to_thread(shutil.rmtree, stage, True)
    if not (root / MARKER).is_file():
        raise InstallError(f"install finished but {root} is missing")
    _report(progress, "done", 100, str(env_python(root)))
    return env_python(root)


def remove_env(root: Path) -> None:
    """Blocking: renamed aside first, so a half-removed environment never looks installed."""
    if not root.exists():
        return
    doomed = root.with_name(f".removing-{root.name}-{os.getpid()}")
    root.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
