"""Remote pulls: sources, HTTP with resume (Range), sha256 verification, shared downloads.

This module knows nothing of manifests or names: it turns a source reference into a list of remote
files and fetches them into resumable part files, verifying each (`Downloads.fetch_model`). The store
(`runnerd.store.store`) commits the verified parts as blobs and registers the model.

Resumption: each URL gets a part file `<partial>/<sha256(url)>.part` and a small JSON sidecar with
the validator (ETag / Last-Modified) the bytes came with. A later attempt sends `Range` and
`If-Range`, so a server whose file changed answers 200 and we start over instead of splicing two
versions. The part file is the only thing a failed or cancelled download leaves behind; a part
whose content fails verification is deleted (resuming it could never succeed); a part untouched for
STALE_PART_SECONDS is swept (`remove_stale_parts`).

Limits: a file over `store.max_download_size` is refused (by its announced size, else when the bytes
pass it); a download averaging under `store.min_download_rate` over `store.min_rate_window` is cut,
which frees its slot. For callers over TCP the hosts reachable are limited (runnerd.store.targets).

Errors say what failed without quoting the source: no upstream status text, headers or bytes, no
size or digest of what arrived, no connection-failure detail (the daemon's log has it) and no local
path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from pydantic import BaseModel
from yarl import URL

from backends.formats.names import SplitNameError, gguf_stem, is_model_directory, is_model_repo_file, split_names
from runnerd.config import HuggingFaceSettings, StoreSettings
from runnerd.store.errors import StoreError
from runnerd.store.targets import REFUSED_MESSAGE, PublicResolver, PullPolicy, TargetRefused, refused_cause

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A hub path segment (org, repo, file name part, revision): no traversal, no separators, no controls.
_HF_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_MAX_REDIRECTS = 5
_CHUNK = 1 << 20
_MAX_SHARDS = 256
log = logging.getLogger("runnerd.store")


class PullError(Exception):
    """A pull failed; ``status`` is the HTTP status that fits (400 bad source, 404 upstream not
    found, 502 upstream failure, 507 disk full)."""

    def __init__(self, message: str, status: int = 502, code: str = "pull_failed") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PullProgress(BaseModel):
    """One progress report of a pull. `total`/`completed` are bytes over all files of the pull."""

    phase: str  # "download", "verify", "commit", "success"
    total: int | None = None
    completed: int | None = None
    file: str | None = None


PullProgressCallback = Callable[[PullProgress], None]


def valid_sha256(value: str) -> str:
    digest = value.lower().removeprefix("sha256:")
    if not _HEX64.match(digest):
        raise PullError(f"sha256 must be 64 hexadecimal digits, got {value[:80]!r}", 400, "invalid_sha256")
    return digest


# --- sources -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    url: str
    name: str  # the file name (or relative path inside a repo directory) it is stored under
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Source:
    """What a `from` reference means: a local path, or remote files (one, a split set, a repo)."""

    kind: str  # "path", "url", "hf"
    path: Path | None = None
    files: tuple[RemoteFile, ...] = ()
    hf_repo: str | None = None  # org/repo for a whole-repository pull (files listed later)
    hf_revision: str = "main"
    default_name: str = "model"


def _name_part(text: str) -> str:
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", text))[:120].strip("-._")
    return cleaned or "model"


def _shard_names(file_name: str) -> list[str]:
    """All shard names of a split GGUF given any shard's name; [file_name] for other names."""
    try:
        return split_names(file_name, max_count=_MAX_SHARDS)
    except SplitNameError as exc:
        raise PullError(str(exc), 400, "invalid_source") from exc


def _check_url(url: str) -> str:
    # Printable ASCII only: anything else must be percent-encoded (no spaces, controls or look-alikes).
    if len(url) > 4096 or any(not 0x21 <= ord(c) <= 0x7e for c in url):
        raise PullError("URL is too long or contains spaces, control or non-ASCII characters (percent-encode "
                        "them)", 400, "invalid_source")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PullError(f"only http(s):// URLs can be pulled, got {url[:200]!r}", 400, "invalid_source")
    if parts.username or parts.password:
        raise PullError("URLs with credentials are refused (use [huggingface] token_file)", 400, "invalid_source")
    return url


def parse_source(text: str, hf_base_url: str) -> Source:
    """A `from` reference -> Source; PullError(400) for anything we will not fetch."""
    if not isinstance(text, str) or not text or "\0" in text or len(text) > 4096:
        raise PullError("'from' must be a non-empty path, http(s):// URL or hf://org/repo[/file][@revision]",
                        400, "invalid_source")
    if text.startswith("/"):
        return Source(kind="path", path=Path(text), default_name=_name_part(gguf_stem(Path(text).name)))
    if text.startswith("hf://"):
        return _parse_hf(text[5:], hf_base_url)
    if text.startswith(("http://", "https://")):
        url = _check_url(text)
        file_name = PurePosixPath(urlsplit(url).path).name or "model.gguf"
        if not _HF_SEGMENT.match(file_name) or ".." in file_name:
            file_name = "model.gguf"
        base = url[: len(url) - len(urlsplit(url).path)] + str(PurePosixPath(urlsplit(url).path).parent).rstrip("/")
        names = _shard_names(file_name)
        files = tuple(RemoteFile(url=url if n == file_name else f"{base}/{quote(n)}", name=n) for n in names)
        return Source(kind="url", files=files, default_name=_name_part(gguf_stem(file_name)))
    scheme = text.split(":", 1)[0] if ":" in text else ""
    raise PullError(f"unsupported source {text[:200]!r}" + (f" (scheme {scheme!r})" if scheme else "") +
                    ": use an absolute path, an http(s):// URL or hf://org/repo[/file][@revision]",
                    400, "invalid_source")


def _parse_hf(ref: str, base_url: str) -> Source:
    ref, _, revision = ref.partition("@")
    revision = revision or "main"
    if not _HF_REVISION.match(revision) or ".." in revision or "//" in revision:
        raise PullError(f"invalid revision {revision[:100]!r} in hf:// reference", 400, "invalid_source")
    parts = ref.split("/")
    if len(parts) < 2 or not all(_HF_SEGMENT.match(p) and ".." not in p for p in parts):
        raise PullError(f"invalid hf:// reference {ref[:200]!r}: expected hf://org/repo[/path/file.gguf]"
                        "[@revision] with letters, digits, '.', '_' and '-'", 400, "invalid_source")
    org, repo, path = parts[0], parts[1], parts[2:]
    rev = quote(revision, safe="")
    if not path:
        return Source(kind="hf", hf_repo=f"{org}/{repo}", hf_revision=revision,
                      default_name=f"{_name_part(org)}/{_name_part(repo)}:{_name_part(revision.replace('/', '-'))}"
                      if revision != "main" else f"{_name_part(org)}/{_name_part(repo)}")
    directory, file_name = "/".join(path[:-1]), path[-1]
    prefix = f"{base_url}/{org}/{repo}/resolve/{rev}/" + (f"{directory}/" if directory else "")
    files = tuple(RemoteFile(url=prefix + quote(n), name=n) for n in _shard_names(file_name))
    return Source(kind="hf", files=files, hf_revision=revision,
                  default_name=f"{_name_part(org)}/{_name_part(repo)}:{_name_part(gguf_stem(file_name))}")


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return 0 < len(path) <= 512 and all(_HF_SEGMENT.match(p) and ".." not in p for p in parts)


def download_session(opts: FetchOptions) -> aiohttp.ClientSession:
    """A session for pulls: no total deadline (a model may take hours), a bounded connect, and at most
    `read_timeout` seconds without a byte; connections only to addresses the policy allows."""
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=opts.read_timeout)
    connector = aiohttp.TCPConnector(resolver=PublicResolver(opts.policy)) if opts.policy.public_only else None
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def _connect_error(exc: BaseException, what: str) -> PullError:
    """A failed connection as the caller sees it: refused by policy (403), or one message for every
    network failure (which of refused, unreachable or timed out is a port scanner's answer: logged only)."""
    if refused_cause(exc):
        return PullError(REFUSED_MESSAGE, 403, "pull_target_refused")
    log.warning("%s: %s", what, exc or type(exc).__name__)
    return PullError("could not connect to the pull source, or it did not answer in time", 502, "unreachable")


async def list_hf_repo(session: aiohttp.ClientSession, source: Source, base_url: str,
                       headers: dict[str, str], policy: PullPolicy) -> tuple[RemoteFile, ...]:
    """The files of a whole hub repository that make a model directory (safetensors, config, tokenizer)."""
    assert source.hf_repo is not None
    rev = quote(source.hf_revision, safe="")
    url = f"{base_url}/api/models/{source.hf_repo}/tree/{rev}?recursive=true"
    try:
        policy.check_literal(urlsplit(url).hostname or "")
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status == 404:
                raise PullError(f"{source.hf_repo}@{source.hf_revision} was not found upstream", 404, "not_found")
            if resp.status != 200:
                raise PullError(f"listing {source.hf_repo} failed: the hub refused the request (HTTP {resp.status})",
                                502, "upstream_error")
            raw = await resp.content.read(8 << 20)
    except (aiohttp.ClientError, TimeoutError, TargetRefused) as exc:
        raise _connect_error(exc, f"listing {source.hf_repo}") from exc
    try:
        entries = json.loads(raw)
        assert isinstance(entries, list)
    except (ValueError, AssertionError) as exc:
        raise PullError(f"listing {source.hf_repo} failed: the hub's answer is not a JSON list", 502) from exc
    files: list[RemoteFile] = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("type") != "file" or not isinstance(entry.get("path"), str):
            continue
        path = entry["path"]
        if not is_model_repo_file(path):
            continue
        if not _safe_relative(path):
            raise PullError(f"the repository lists an unsafe file path {path[:200]!r}", 502, "unsafe_path")
        lfs: dict[str, Any] = entry["lfs"] if isinstance(entry.get("lfs"), dict) else {}
        oid = lfs.get("oid") if isinstance(lfs.get("oid"), str) and _HEX64.match(lfs["oid"]) else None
        size = entry.get("size") if isinstance(entry.get("size"), int) else None
        files.append(RemoteFile(url=f"{base_url}/{source.hf_repo}/resolve/{rev}/{quote(path)}", name=path,
                                sha256=oid, size=size))
    if not is_model_directory(f.name for f in files):
        raise PullError(f"{source.hf_repo} is not a Hugging Face-format model directory (config.json and "
                        "*.safetensors); name a GGUF file instead: hf://org/repo/file.gguf", 400, "invalid_source")
    return tuple(sorted(files, key=lambda f: f.name))


# --- download ------------------------------------------------------------------------------------

@dataclass
class Downloaded:
    part: Path  # the verified file, ready to be moved into the blob store
    meta: Path  # its sidecar, removed when the store commits the part
    sha256: str
    size: int


@dataclass
class FetchOptions:
    read_timeout: float = 60.0
    retries: int = 3
    token: str | None = None
    token_host: str | None = None  # the hub's host: the token is sent there and nowhere else
    policy: PullPolicy = field(default_factory=PullPolicy)
    max_size: int = 512 << 30
    min_rate: int = 0  # bytes per second over `rate_window`; 0: no minimum
    rate_window: float = 60.0

    def key(self, url: str) -> str:
        """What a download is shared and resumed under: a restricted caller never joins, nor resumes, a
        download an unrestricted one started (its redirects may have led anywhere)."""
        return f"public-only\0{url}" if self.policy.public_only else url


def disk_full(exc: OSError) -> PullError:
    return PullError("disk full while writing the model", 507, "disk_full")


def _part_paths(partial_dir: Path, key: str) -> tuple[Path, Path]:
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return partial_dir / f"{digest}.part", partial_dir / f"{digest}.part.json"


# A part file untouched this long belongs to a pull nobody resumed (cancelled, crashed, given up).
STALE_PART_SECONDS = 3 * 24 * 3600
_PART_NAME = re.compile(r"^[0-9a-f]{40}\.part(?:\.json)?$")


def remove_stale_parts(partial_dir: Path, keep: set[Path], max_age: float = STALE_PART_SECONDS) -> None:
    """Delete part files (and sidecars) not modified for `max_age` seconds, except those in `keep`
    (downloads in progress); a sidecar whose part is gone goes too."""
    if not partial_dir.is_dir():
        return
    cutoff = time.time() - max_age
    for path in partial_dir.iterdir():
        if not _PART_NAME.match(path.name) or path in keep:
            continue
        with contextlib.suppress(OSError):
            orphan = path.name.endswith(".json") and not path.with_name(path.name.removesuffix(".json")).exists()
            if orphan or path.lstat().st_mtime < cutoff:
                path.unlink()
                log.info("removed %s: a pull left it and none resumed it", path.name)


def _hash_file(path: Path, limit: int) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        remaining = limit
        while remaining > 0:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h


def _upstream_sha(headers: Any, from_hub: bool) -> str | None:
    """The hub's sha256 of an LFS file: X-Linked-Etag, or from the hub itself an ETag of 64 hex digits
    (other servers' ETags are opaque; one that happened to look like a sha256 must not fail a pull)."""
    for key in ("X-Linked-Etag", "ETag") if from_hub else ("X-Linked-Etag",):
        value = headers.get(key, "").strip().removeprefix("W/").strip('"').lower()
        if _HEX64.match(value):
            return str(value)
    return None


def _content_range_start(value: str) -> tuple[int, int | None] | None:
    m = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", value.strip())
    if m is None:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


class _Retryable(Exception):
    """The connection broke after some bytes arrived: resume with Range."""


async def _open(session: aiohttp.ClientSession, url: str, headers: dict[str, str], opts: FetchOptions,
                ) -> tuple[aiohttp.ClientResponse, str | None]:
    """GET following at most 5 redirects by hand, to http(s) only, each hop's host checked by the
    policy; the token goes to the hub only."""
    hub_sha: str | None = None
    for _ in range(_MAX_REDIRECTS + 1):
        host = urlsplit(url).hostname
        opts.policy.check_literal(host or "")
        sent = dict(headers)
        if opts.token and host == opts.token_host:
            sent["Authorization"] = f"Bearer {opts.token}"
        resp = await session.get(url, headers=sent, allow_redirects=False, auto_decompress=False)
        hub_sha = hub_sha or _upstream_sha(resp.headers, host == opts.token_host)
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.headers.get("Location", "")
            resp.release()
            try:
                target = _check_url(str(resp.url.join(URL(location))))
            except (PullError, ValueError) as exc:
                raise PullError("the pull source redirected to a location that is not an http(s) URL", 502,
                                "bad_redirect") from exc
            if url.startswith("https://") and target.startswith("http://"):
                raise PullError("the pull source redirected from https to plain http", 502, "bad_redirect")
            url = target
            continue
        return resp, hub_sha
    raise PullError(f"the pull source redirected more than {_MAX_REDIRECTS} times", 502, "bad_redirect")


async def fetch(session: aiohttp.ClientSession, file: RemoteFile, partial_dir: Path, opts: FetchOptions,
                on_bytes: Callable[[int, int | None], None]) -> Downloaded:
    """Download one file into its part file (resuming one left by an earlier attempt), verify it.

    `on_bytes(completed, total)` is called as bytes arrive. Raises PullError; the part file stays
    unless its content is known to be wrong.
    """
    partial_dir.mkdir(parents=True, exist_ok=True)
    part, meta = _part_paths(partial_dir, opts.key(file.url))
    attempts = 0
    expected = file.sha256
    while True:
        try:
            total, expected = await _fetch_once(session, file, part, meta, opts, on_bytes, expected)
            break
        except _Retryable as exc:
            attempts += 1
            if attempts > opts.retries:
                log.warning("download of %s kept failing: %s", file.url[:200], exc)
                raise PullError(f"the download of {file.name} kept breaking off; pull again to resume", 502,
                                "download_interrupted") from None
            await asyncio.sleep(min(2.0, 0.1 * 2 ** attempts))
    digest = (await asyncio.to_thread(_hash_file, part, total)).hexdigest()
    if expected is not None and digest != expected:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        with contextlib.suppress(FileNotFoundError):
            meta.unlink()
        raise PullError(f"sha256 mismatch for {file.name}: the content is not the expected {expected}", 502,
                        "digest_mismatch")
    # The sidecar stays until the store commits the part: a verified part left by a failed pull of a
    # several-file model is then taken as it is by the next attempt (a 416 for its full length).
    return Downloaded(part=part, meta=meta, sha256=digest, size=total)


def _read_meta(meta: Path, url: str) -> dict[str, Any]:
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("url") == url else {}


async def _fetch_once(session: aiohttp.ClientSession, file: RemoteFile, part: Path, meta: Path,
                      opts: FetchOptions, on_bytes: Callable[[int, int | None], None],
                      expected: str | None) -> tuple[int, str | None]:
    """One HTTP exchange; returns (total bytes, expected sha256). _Retryable when it broke midway."""
    offset = part.stat().st_size if part.exists() else 0
    saved = _read_meta(meta, file.url)
    validator = saved.get("validator") if isinstance(saved.get("validator"), str) else None
    headers = {"Accept-Encoding": "identity"}
    if offset > 0 and validator:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    elif offset > 0:
        offset = 0  # bytes of unknown provenance: never splice them onto a new response
    try:
        resp, hub_sha = await _open(session, file.url, headers, opts)
    except (aiohttp.ClientError, TimeoutError, TargetRefused) as exc:
        raise _connect_error(exc, f"fetching {file.url[:200]}") from exc
    async with resp:
        if hub_sha is not None:
            if expected is not None and hub_sha != expected:
                raise PullError(f"sha256 mismatch for {file.name}: the source announces another sha256 than the "
                                f"expected {expected}", 502, "digest_mismatch")
            expected = hub_sha
        if resp.status == 404:
            raise PullError(f"{file.name} was not found: the pull source refused the request (HTTP 404)", 404,
                            "not_found")
        if resp.status == 416 and offset > 0:
            whole = re.match(r"^bytes \*/(\d+)$", resp.headers.get("Content-Range", "").strip())
            if whole is not None and int(whole.group(1)) == offset:
                on_bytes(offset, offset)
                return offset, expected  # the part is already complete (an earlier pull got it all)
            part.unlink()  # our part does not fit the file as it is now: start over
            raise _Retryable("the server refused the resume range")
        if resp.status == 206 and offset > 0:
            cr = _content_range_start(resp.headers.get("Content-Range", ""))
            if cr is None or cr[0] != offset:
                raise PullError("the pull source answered a range that was not asked for", 502, "bad_range")
            total = cr[1]
        elif resp.status == 200:
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise PullError(f"fetching {file.name} failed: the pull source refused the request (HTTP {resp.status})",
                            502, "upstream_error")
        if total is None and file.size is not None:
            total = file.size
        if total is not None and total > opts.max_size:
            raise _too_large(file, opts)
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if new_validator and not new_validator.startswith("W/"):
            meta.write_text(json.dumps({"url": file.url, "validator": new_validator}))
        else:
            with contextlib.suppress(FileNotFoundError):
                meta.unlink()
        if total is not None and shutil.disk_usage(part.parent).free < total - offset:
            raise PullError(f"not enough disk space for {file.name}", 507, "disk_full")
        completed = offset
        on_bytes(completed, total)
        rate = _RateFloor(opts.min_rate, opts.rate_window, file.name)
        try:
            with part.open("r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                try:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        completed += len(chunk)
                        if total is not None and completed > total:
                            raise PullError(f"the pull source sent more than it announced for {file.name}", 502,
                                            "length_mismatch")
                        if completed > opts.max_size:
                            raise _too_large(file, opts)
                        rate.passed(len(chunk))
                        await asyncio.to_thread(f.write, chunk)
                        on_bytes(completed, total)
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                    raise _Retryable(str(exc) or type(exc).__name__) from exc
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(exc) from exc
            raise
        except PullError as exc:
            if exc.code == "too_large":  # never resumable
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
            raise
        if total is not None and completed < total:
            raise _Retryable(f"the connection closed after {completed} of {total} bytes")
        return completed, expected


def _too_large(file: RemoteFile, opts: FetchOptions) -> PullError:
    return PullError(f"{file.name} is larger than store.max_download_size ({opts.max_size} bytes)", 413, "too_large")


class _RateFloor:
    """PullError once the bytes of a window of `window` seconds average under `minimum` per second."""

    def __init__(self, minimum: int, window: float, name: str) -> None:
        self.minimum = minimum
        self.window = window
        self.name = name
        self.start = time.monotonic()
        self.bytes = 0

    def passed(self, n: int) -> None:
        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.window or self.minimum <= 0:
            return
        if self.bytes < self.minimum * elapsed:
            raise PullError(f"the download of {self.name} was slower than store.min_download_rate "
                            f"({self.minimum} bytes/s over {self.window:g} s) and was stopped; pull again to resume",
                            504, "too_slow")
        self.start, self.bytes = time.monotonic(), 0


class Throttle:
    """Calls through at most every `interval` seconds, and always for the last report."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._last = 0.0

    def ready(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self._last >= self.interval:
            self._last = now
            return True
        return False


# --- the store's downloads ---------------------------------------------------------------------

@dataclass
class _SharedFetch:
    """One download that several pulls of the same URL wait on."""

    task: asyncio.Task[Downloaded]
    listeners: list[Callable[[int, int | None], None]] = field(default_factory=list)
    waiters: int = 0


class Downloads:
    """The downloads of one store: the files of a remote model fetched side by side into `partial`,
    one download per URL however many pulls wait on it, at most `max_concurrent_downloads` at a time.
    Cancelling a pull cancels its downloads (unless another pull shares them); part files stay."""

    def __init__(self, partial: Path, settings: StoreSettings, huggingface: HuggingFaceSettings) -> None:
        self.partial = partial
        self.settings = settings
        self.huggingface = huggingface
        self._fetches: dict[str, _SharedFetch] = {}
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None

    def _token(self) -> str | None:
        path = self.huggingface.token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise StoreError(f"cannot read the Hugging Face token file {path}: {exc.strerror}", 500,
                             "token_unreadable") from exc

    def _options(self, public_only: bool) -> FetchOptions:
        hub = urlsplit(self.huggingface.base_url).hostname
        return FetchOptions(read_timeout=self.settings.read_timeout, retries=self.settings.retries,
                            token=self._token(), token_host=hub,
                            policy=PullPolicy.build(public_only, self.settings.pull_allowed_hosts, [hub]),
                            max_size=self.settings.max_download_size, min_rate=self.settings.min_download_rate,
                            rate_window=self.settings.min_rate_window)

    def busy_parts(self) -> set[Path]:
        """Part files (and sidecars) of the downloads running now."""
        return {p for key in self._fetches for p in _part_paths(self.partial, key)}

    async def fetch_model(self, parsed: Source, expected: str | None, progress: PullProgressCallback,
                          projector: RemoteFile | None = None, *, public_only: bool = False,
                          ) -> list[tuple[RemoteFile, Downloaded, str]]:
        """Download every file of a remote model (and its projector) into verified part files, reporting
        "download" progress over all of them; returns (file, download, role) for each. `public_only`:
        the caller came over TCP (runnerd.store.targets)."""
        opts = self._options(public_only)
        await asyncio.to_thread(remove_stale_parts, self.partial, self.busy_parts())
        files = parsed.files
        if parsed.hf_repo is not None:
            headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
            async with download_session(opts) as session:
                files = await list_hf_repo(session, parsed, self.huggingface.base_url, headers, opts.policy)
        for f in files:
            if f.size is not None and f.size > opts.max_size:
                raise _too_large(f, opts)
        if expected is not None:
            if len(files) != 1:
                raise PullError("sha256 can only be given for a single-file model", 400, "invalid_sha256")
            files = (RemoteFile(url=files[0].url, name=files[0].name, sha256=expected, size=files[0].size),)
        roles = ["model"] * len(files)
        if projector is not None:
            files, roles = (*files, projector), [*roles, "mmproj"]
        done: dict[str, tuple[int, int | None]] = {}
        throttle = Throttle()

        def report(file_name: str, final: bool = False) -> None:
            if not throttle.ready(final):
                return
            totals = [t for _, t in done.values()]
            total = sum(t for t in totals if t is not None) if totals and None not in totals else None
            progress(PullProgress(phase="download", total=total, completed=sum(c for c, _ in done.values()),
                                  file=file_name))

        tasks = [asyncio.create_task(self._join_fetch(f, opts, done, report)) for f in files]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One file failed (or the pull was cancelled): stop the others; their part files stay.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return list(zip(files, results, roles, strict=True))

    async def _join_fetch(self, file: RemoteFile, opts: FetchOptions, done: dict[str, tuple[int, int | None]],
                          report: Callable[[str, bool], None]) -> Downloaded:
        """Download `file`, or wait for the download of the same URL another pull started."""
        def on_bytes(completed: int, total: int | None) -> None:
            done[file.url] = (completed, total)
            report(file.name, False)

        key = opts.key(file.url)
        shared = self._fetches.get(key)
        if shared is None or shared.task.done():
            shared = _SharedFetch(task=asyncio.create_task(self._fetch(file, opts, key)))
            self._fetches[key] = shared
        shared.listeners.append(on_bytes)
        shared.waiters += 1
        try:
            result = await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            shared.listeners.remove(on_bytes)
            # The last pull waiting for it went away (cancelled): stop the download, keep its part file.
            if shared.waiters == 0 and not shared.task.done():
                shared.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await shared.task
        report(file.name, True)
        return result

    async def _fetch(self, file: RemoteFile, opts: FetchOptions, key: str) -> Downloaded:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.settings.max_concurrent_downloads), loop

        def fan_out(completed: int, total: int | None) -> None:
            shared = self._fetches.get(key)
            for listener in list(shared.listeners if shared else []):
                listener(completed, total)

        try:
            async with self._slots, download_session(opts) as session:
                return await fetch(session, file, self.partial, opts, fan_out)
        finally:
            shared = self._fetches.get(key)
            if shared is not None and shared.task is asyncio.current_task():
                del self._fetches[key]
