"""Find or build llama-server.

Order: an explicitly named binary, else a cached build, else a build of the `llama-server` target
from the llama.cpp tree that the pinned `llama-cpp-python` source distribution vendors. The build
lands in the cache directory under a key made of the source version and the build options, and is
moved into place atomically so a cancelled or failed build never looks installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from backends.base import InstallError, Progress, ProgressCallback
from backends.process import run_step

SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
VENDOR_PREFIX = "vendor/llama.cpp/"
BASE_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
_CMAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def cmake_options(cuda: bool) -> tuple[str, ...]:
    return (*BASE_CMAKE_OPTIONS, "-DGGML_CUDA=ON" if cuda else "-DGGML_CUDA=OFF")


def build_key(source_version: str, options: Sequence[str]) -> str:
    """Name of the cache entry: changes whenever the source or any build option changes."""
    digest = hashlib.sha256("\0".join(options).encode()).hexdigest()[:10]
    flavour = "cuda" if "-DGGML_CUDA=ON" in options else "cpu"
    return f"{source_version}-{flavour}-{digest}"


def cached_binary(cache_dir: Path, key: str) -> Path:
    return cache_dir / "llama.cpp" / key / "bin" / "llama-server"


# A llama-cpp-python release number. It ends up in `pip download NAME==VERSION` and in a directory
# name, so nothing but digits and dots gets through (no specifiers, options or path parts).
_SOURCE_VERSION = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,4}){1,3}$")


def valid_source_version(version: str) -> bool:
    return _SOURCE_VERSION.fullmatch(version) is not None


def check_source_version(version: str) -> str:
    if not valid_source_version(version):
        raise InstallError(f"{version!r} is not a {SOURCE_PACKAGE} release number (digits and dots, e.g. "
                           f"{SOURCE_VERSION})")
    return version


def installed_builds(cache_dir: Path, options: Sequence[str]) -> dict[str, Path]:
    """Blocking: the cached builds made with `options`, by source version (a directory scan; a build
    still under way lives in a hidden temporary directory and is not listed)."""
    suffix = build_key("", options)
    root = cache_dir / "llama.cpp"
    found: dict[str, Path] = {}
    try:
        entries = list(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        version = entry.name.removesuffix(suffix)
        if version != entry.name and valid_source_version(version):
            binary = entry / "bin" / "llama-server"
            if binary.is_file():
                found[version] = binary
    return dict(sorted(found.items(), key=lambda item: _version_order(item[0])))


def _version_order(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def remove_build(cache_dir: Path, source_version: str, options: Sequence[str]) -> None:
    """Blocking: delete one cached build. Renamed aside first, so a half-removed tree never looks installed."""
    entry = cache_dir / "llama.cpp" / build_key(check_source_version(source_version), options)
    if not entry.exists():
        return
    doomed = entry.with_name(f".removing-{entry.name}-{os.getpid()}")
    entry.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _progress(cb: ProgressCallback | None, phase: str, percent: float | None = None, message: str = "") -> None:
    if cb is not None:
        cb(Progress(phase=phase, percent=percent, message=message))


async def download_source(dest: Path, source_version: str) -> Path:
    """Fetch the pinned source distribution with pip (download only, never installed)."""
    await run_step([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     "--disable-pip-version-check", f"{SOURCE_PACKAGE}=={source_version}", "-d", str(dest)])
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise InstallError(f"pip downloaded no source distribution of {SOURCE_PACKAGE}=={source_version}")
    return found[0]


def extract_vendored_tree(sdist: Path, dest: Path) -> Path:
    """Extract only vendor/llama.cpp from the sdist; the 'data' filter refuses unsafe members."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if VENDOR_PREFIX in m.name]
        if not members:
            raise InstallError(f"{sdist.name} carries no {VENDOR_PREFIX} tree")
        tar.extractall(dest, members=members, filter="data")
    roots = list(dest.glob(f"*/{VENDOR_PREFIX.rstrip('/')}"))
    if not roots:
        raise InstallError(f"{VENDOR_PREFIX} not found after extracting {sdist.name}")
    return roots[0]


async def build_llama_server(
    cache_dir: Path, *, cuda: bool, source_version: str = SOURCE_VERSION,
    progress: ProgressCallback | None = None, jobs: int | None = None,
    fetch_source: Callable[[Path, str], Awaitable[Path]] = download_source,
) -> Path:
    """Build llama-server into the cache and return its path (the cached one if already built)."""
    options = cmake_options(cuda)
    key = build_key(check_source_version(source_version), options)
    target = cached_binary(cache_dir, key)
    if target.exists():
        return target
    install_root = target.parent.parent
    install_root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=install_root.parent) as tmp:
        work = Path(tmp)
        _progress(progress, "download", 0, f"{SOURCE_PACKAGE}=={source_version}")
        sdist = await fetch_source(work / "sdist", source_version)
        _progress(progress, "extract", 0, sdist.name)
        source = await asyncio.to_thread(extract_vendored_tree, sdist, work / "src")
        build_dir = work / "build"
        _progress(progress, "configure", 0, " ".join(options))
        await run_step(["cmake", "-S", str(source), "-B", str(build_dir), *options])

        def on_build_line(line: str) -> None:
            if m := _CMAKE_PERCENT.match(line):
                _progress(progress, "build", float(m.group(1)), line.strip())

        await run_step(["cmake", "--build", str(build_dir), "--target", "llama-server",
                         "-j", str(jobs or os.cpu_count() or 2)], on_line=on_build_line)
        staged = work / "install"
        shutil.copytree(build_dir / "bin", staged / "bin", symlinks=True)
        (staged / "BUILD-OPTIONS").write_text("\n".join([f"source {SOURCE_PACKAGE}=={source_version}",
                                                          *options]) + "\n")
        # Another build may have finished first; its result is as good as ours.
        with contextlib.suppress(OSError):
            staged.rename(install_root)
    if not target.exists():
        raise InstallError(f"build finished but {target} is missing")
    _progress(progress, "done", 100, str(target))
    return target


def cuda_available(gpu_count: int) -> bool:
    """Build with CUDA only when both a compiler and a GPU are there: nvcc alone (a CUDA toolkit on
    a GPU-less host) would cost an hour-long build for a binary that runs on the CPU anyway."""
    return gpu_count > 0 and shutil.which("nvcc") is not None
