"""Hostile input against the model store: a source swapped for a FIFO between the checks and the
read, imports that hang on a disk, directory trees that are no model, error messages that would
quote a file's bytes, names too long for a file name, tags that would replace a model, oversized and
trickling downloads, and what crashes leave behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from runnerd.config import HuggingFaceSettings, StoreSettings
from runnerd.configs import ConfigStore
from runnerd.store import ModelStore, StoreError, importer
from tests.fileserver import FileServer
from tests.test_vllm_unit import write_model_dir

# A file the daemon can read and the caller must learn nothing of.
SECRET = b"zorblax:$6$s3cr3tSALT$qwertyqwertyqwerty:19000:0:99999:7:::\n" * 4


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.tinymodels import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("m") / "t.gguf").read_bytes()


def make_store(tmp_path: Path, server: FileServer | None = None, **settings: Any) -> ModelStore:
    hf = HuggingFaceSettings(base_url=server.base_url if server else "https://hub.example")
    return ModelStore(tmp_path / "data", StoreSettings(**{"read_timeout": 2.0, **settings}), hf)


@contextlib.asynccontextmanager
async def daemon_app(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The daemon's app in this process on a unix socket (hang-ups cancel handlers, as in `serve`),
    with a client and the app's parts."""
    from aiohttp import web

    from runnerd.api.context import DAEMON
    from runnerd.config import load_settings
    from runnerd.server import bind_unix_socket, create_app

    sock = Path("/tmp") / f"rd-hs-{os.getpid()}-{time.monotonic_ns()}.sock"
    app = create_app(load_settings(runtime_dir=tmp_path / "run", data_dir=tmp_path / "data", socket=sock),
                     backends={})
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, bind_unix_socket(sock)).start()
    try:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://runnerd",
                                     timeout=httpx.Timeout(15)) as client:
            yield client, app[DAEMON]
    finally:
        await runner.cleanup()
        sock.unlink(missing_ok=True)


@contextlib.contextmanager
def small_default_pool(workers: int = 2) -> Iterator[None]:
    """The loop's default thread pool (asyncio.to_thread) cut to `workers` threads: what a few stuck
    threads would take from the routes that use it."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="test-default")
    loop.set_default_executor(pool)
    try:
        yield
    finally:
        loop.set_default_executor(ThreadPoolExecutor())
        pool.shutdown(wait=False)


def outcome(resp: httpx.Response) -> tuple[int, str]:
    """(status, error message) of a create: a plain error, or the last line of a stream that had begun."""
    if resp.headers.get("content-type", "").startswith("application/x-ndjson"):
        last = json.loads(resp.text.splitlines()[-1])
        return last.get("status", resp.status_code), last.get("error", "")
    body = resp.json()
    return resp.status_code, body["error"]["message"] if "error" in body else ""


def release_fifo(path: Path) -> None:
    """A reader blocked opening `path` (a FIFO) gets EOF: what ends a thread the race caught."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# --- the FIFO race and the thread pools -------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_a_source_swapped_for_a_fifo_after_the_checks_is_refused_and_never_read(
        tmp_path, tiny_model, monkeypatch, kind):
    if kind == "file":
        source = tmp_path / "model.gguf"
        source.write_bytes(tiny_model.read_bytes())
        victim = source
    else:
        source = write_model_dir(tmp_path / "hf-model")
        victim = source / "model-00002.safetensors"
    real = importer.local_sources

    def swap_after_the_checks(*args: Any, **kwargs: Any) -> Any:
        planned = real(*args, **kwargs)
        victim.rename(victim.with_name(victim.name + ".orig"))
        os.mkfifo(victim)
        return planned

    monkeypatch.setattr(importer, "local_sources", swap_after_the_checks)
    async with daemon_app(tmp_path) as (client, d):
        with small_default_pool():
            try:
                resp = await client.post("/models/create", json={"from": str(source), "name": "swapped"}, timeout=10)
            finally:
                release_fifo(victim)
            status, message = outcome(resp)
            assert status == 400 and "is not a regular file" in message, resp.text
            assert (await client.get("/models", timeout=10)).json() == []
            # Nothing of it was staged: no FIFO (nor anything else) linked into partial/.
            assert [p.name for p in d.store.partial.iterdir()] == []


@pytest.mark.anyio
async def test_imports_held_up_on_disk_leave_the_default_pool_to_other_routes(tmp_path, tiny_model):
    async with daemon_app(tmp_path) as (client, d):
        d.store.add("listed", tiny_model)
        loop, holding, release = asyncio.get_running_loop(), asyncio.Event(), threading.Event()
        held = 0
        stage = d.store._stage_local

        def stuck_on_disk(*args: Any) -> Any:
            nonlocal held
            held += 1
            if held == 2:
                loop.call_soon_threadsafe(holding.set)
            assert release.wait(30)
            return stage(*args)

        d.store._stage_local = stuck_on_disk
        with small_default_pool(workers=2):
            imports = [asyncio.create_task(client.post(
                "/models/create", json={"from": str(tiny_model), "name": f"i{i}"}, timeout=60)) for i in range(3)]
            try:
                await asyncio.wait_for(holding.wait(), 10)  # two imports hold their threads
                tags = await client.get("/api/tags", timeout=10)  # reads headers in the default pool
                assert tags.status_code == 200 and [m["name"] for m in tags.json()["models"]] == ["listed:latest"]
                shown = await client.post("/api/show", json={"model": "listed"}, timeout=10)  # so does show
                assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"
            finally:
                release.set()
            done = await asyncio.gather(*imports)
        assert [r.status_code for r in done] == [200, 200, 200], [r.text for r in done]
        assert {m.name for m in d.store.list()} == {"listed:latest", "i0:latest", "i1:latest", "i2:latest"}


# --- directory imports: markers first, a bounded walk, cancellation ---------------------------------

def counting_scandir(monkeypatch: pytest.MonkeyPatch, hold_first: threading.Event | None = None,
                     ) -> tuple[list[Any], threading.Event]:
    calls: list[Any] = []
    first = threading.Event()
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        calls.append(path)
        if len(calls) == 1:
            first.set()
            if hold_first is not None:
                assert hold_first.wait(10)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return calls, first


def deep_tree(root: Path, folders: int = 30) -> Path:
    for i in range(folders):
        (root / f"d{i}" / "inner").mkdir(parents=True)
        (root / f"d{i}" / "inner" / "file.txt").write_text("x")
    return root


@pytest.mark.anyio
async def test_a_directory_without_config_json_is_refused_before_its_tree_is_walked(tmp_path, monkeypatch):
    tree = deep_tree(tmp_path / "usr")
    calls, _ = counting_scandir(monkeypatch)
    with pytest.raises(StoreError) as err:
        await make_store(tmp_path).pull(str(tree), "usr", None, lambda p: None)
    assert err.value.status == 400 and "config.json" in str(err.value)
    assert calls == []


@pytest.mark.anyio
@pytest.mark.parametrize(("shape", "fragment"), [("wide", "more than 20 files and folders"),
                                                 ("deep", "deeper than 8 levels")])
async def test_a_directory_walk_is_bounded(tmp_path, monkeypatch, shape, fragment):
    model = write_model_dir(tmp_path / "model")
    monkeypatch.setattr(importer, "MAX_DIRECTORY_ENTRIES", 20, raising=False)
    if shape == "wide":
        for i in range(25):
            (model / f"extra-{i}.json").write_text("{}")
    else:
        nested = model.joinpath(*[f"level{i}" for i in range(10)])
        nested.mkdir(parents=True)
        (nested / "deep.json").write_text("{}")
    store = make_store(tmp_path)
    with pytest.raises(StoreError) as err:
        await store.pull(str(model), "m", None, lambda p: None)
    assert err.value.status == 400 and fragment in str(err.value)
    assert store.list() == []


@pytest.mark.anyio
async def test_a_cancelled_directory_import_stops_walking(tmp_path, monkeypatch):
    model = deep_tree(write_model_dir(tmp_path / "model"), folders=40)
    gate = threading.Event()
    calls, first = counting_scandir(monkeypatch, hold_first=gate)
    store = make_store(tmp_path)
    finished = threading.Event()
    work = store._import_local

    def import_then_signal(*args: Any) -> Any:
        try:
            return work(*args)
        finally:
            finished.set()

    store._import_local = import_then_signal  # type: ignore[method-assign]
    task = asyncio.create_task(store.pull(str(model), "m", None, lambda p: None))
    assert await asyncio.to_thread(first.wait, 10)
    task.cancel()  # the client hung up while the walk had begun
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await asyncio.to_thread(finished.wait, 10)
    assert len(calls) <= 2, f"the walk went on after the cancellation: {len(calls)} folders listed"
    assert store.list() == []


# --- error messages ----------------------------------------------------------------------------------

def quoted_anything_of(message: str, data: bytes) -> list[str]:
    """Fragments of `data` (text, repr, the first 8 bytes as a number) that `message` contains."""
    found = [w for w in ("zorblax", "s3cr3t", "b'", "qwerty") if w in message]
    number = str(struct.unpack("<Q", data[:8])[0])
    return found + ([number] if number in message else [])


def test_errors_never_quote_the_bytes_of_the_file_read(daemon, tmp_path, tiny_model):
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_model.read_bytes())
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(SECRET)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_bytes(b"\xff" + SECRET)
    (bad_config / "model.safetensors").write_bytes(SECRET)
    attempts = [("/models", {"name": "leak", "path": str(secret)}),
                ("/models/create", {"from": str(secret), "name": "leak"}),
                ("/models", {"name": "leak", "path": str(folder)}),
                ("/models", {"name": "leak", "path": str(bad_config)}),
                ("/models/create", {"from": str(bad_config), "name": "leak"}),
                ("/models/create", {"from": str(model), "mmproj": str(secret), "name": "leak"})]
    for path, body in attempts:
        resp = daemon.post(path, body)
        status, message = outcome(resp)
        assert status == 400, (path, body, resp.text)
        assert not quoted_anything_of(message, SECRET), (path, body, message)
    assert outcome(daemon.post("/models/create", {"from": str(secret), "name": "leak"})) == (
        400, f"{secret} is not a GGUF file")
    assert all(m["name"] != "leak:latest" for m in daemon.http.get("/models").json())


# --- names ---------------------------------------------------------------------------------------------

LONG = "a" * 128 + "/" + "b" * 128  # valid parts, but no file name can hold it with its tag


def test_names_too_long_for_a_file_name_are_400_naming_the_limit(daemon, tiny_model, tmp_path):
    copy = tmp_path / "tiny.gguf"
    copy.write_bytes(tiny_model.read_bytes())
    answers = [
        daemon.post("/models/tiny/tag", {"name": LONG}),
        daemon.post("/models", {"name": LONG, "path": str(tiny_model)}),
        daemon.post("/api/copy", {"source": "tiny", "destination": LONG}),
        daemon.post("/models/create", {"from": str(copy), "name": LONG}),
        daemon.post("/models/tiny/tag", {"name": "t:" + "v" * 129}),
    ]
    for resp in answers:
        assert resp.status_code == 400, resp.text
        body = resp.json()
        message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
        assert "at most" in message and ("240" in message or "128" in message), message
    assert not [m for m in daemon.http.get("/models").json() if m["name"].startswith("a" * 10)]


# --- tags do not replace models silently --------------------------------------------------------------

def test_tag_and_copy_onto_an_existing_name_are_409_unless_forced(daemon, tiny_model, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    assert daemon.post("/models", {"name": "keep", "path": str(tiny_model)}).status_code == 201
    assert daemon.post("/models", {"name": "src", "path": str(other)}).status_code == 201

    def path_of(name: str) -> str:
        return str(daemon.http.get(f"/models/{name}").json()["path"])

    tagged = daemon.post("/models/src/tag", {"name": "keep"})
    assert tagged.status_code == 409 and tagged.json()["error"]["code"] == "model_exists", tagged.text
    copied = daemon.post("/api/copy", {"source": "src", "destination": "keep"})
    assert copied.status_code == 409 and "already exists" in copied.json()["error"], copied.text
    assert path_of("keep") == str(tiny_model)  # untouched
    assert daemon.post("/models/src/tag", {"name": "keep", "force": True}).status_code == 201
    assert path_of("keep") == str(other)
    assert daemon.post("/api/copy", {"source": "tiny", "destination": "keep", "force": True}).status_code == 200
    assert path_of("keep") == str(tiny_model)
    assert daemon.post("/models/src/tag", {"name": "src"}).status_code == 201  # its own name: nothing replaced
    for name in ("keep", "src"):
        assert daemon.http.delete(f"/models/{name}").status_code == 200


# --- downloads: size cap, minimum rate, stale part files ------------------------------------------------

@pytest.mark.anyio
async def test_a_download_over_the_size_cap_is_refused_and_leaves_nothing(tmp_path, server, gguf_bytes):
    url = server.add("/big.gguf", gguf_bytes)
    store = make_store(tmp_path, server, max_download_size=len(gguf_bytes) - 1)
    with pytest.raises(StoreError) as err:
        await store.pull(url, "big", None, lambda p: None)
    assert (err.value.status, err.value.code) == (413, "too_large")
    assert f"({len(gguf_bytes) - 1} bytes)" in str(err.value)
    assert store.list() == [] and list(store.partial.glob("*.part")) == []


@pytest.mark.anyio
async def test_a_trickling_download_is_cut_and_frees_its_slot(tmp_path, gguf_bytes):
    slow, fast = FileServer(chunk=512, delay=0.05).start(), FileServer().start()
    try:
        trickle = slow.add("/slow.gguf", gguf_bytes)
        quick = fast.add("/fast.gguf", gguf_bytes)
        store = make_store(tmp_path, max_concurrent_downloads=1, min_download_rate=1 << 20, min_rate_window=0.3)
        with pytest.raises(StoreError) as err:
            await asyncio.wait_for(store.pull(trickle, "slow", None, lambda p: None), 30)
        assert (err.value.status, err.value.code) == (504, "too_slow")
        assert "min_download_rate" in str(err.value)
        entry = await asyncio.wait_for(store.pull(quick, "fast", None, lambda p: None), 30)  # the one slot is free
        assert entry.size == len(gguf_bytes)
    finally:
        slow.stop()
        fast.stop()


def test_part_files_nobody_resumed_are_swept(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    store.partial.mkdir(parents=True, exist_ok=True)
    old, fresh = store.partial / ("a" * 40 + ".part"), store.partial / ("b" * 40 + ".part")
    sidecar, orphan = old.with_name(old.name + ".json"), store.partial / ("c" * 40 + ".part.json")
    unrelated = store.partial / "notes.txt"
    for path in (old, fresh, sidecar, orphan, unrelated):
        path.write_bytes(b"x")
    week_ago = time.time() - 7 * 24 * 3600
    for path in (old, sidecar, unrelated):
        os.utime(path, (week_ago, week_ago))
    make_store(tmp_path)  # a restart
    assert sorted(p.name for p in store.partial.iterdir()) == sorted([fresh.name, unrelated.name])


# --- what crashes leave behind --------------------------------------------------------------------------

def test_temporary_files_of_cut_writes_are_swept_at_start(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    left = data / ".configurations.json-k3x_9abc"
    left.write_text('{"configurations": [')
    kept = [data / "configurations.json.corrupt-1700000000", data / ".configurations.json-notours!"]
    for path in kept:
        path.write_text("{}")
    ConfigStore(data)
    assert not left.exists() and all(p.exists() for p in kept)

    store = ModelStore(data)
    store.add("tiny", tiny_model)
    manifest_tmp = store.manifests / ".tiny%3Alatest.json-ab12cd34"
    manifest_tmp.write_text("{")
    restarted = ModelStore(data)
    assert not manifest_tmp.exists() and [m.name for m in restarted.list()] == ["tiny:latest"]


async def downloads_over(store: ModelStore) -> None:
    while store._downloads._fetches:  # the download tasks unregister themselves as they end
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_a_pull_whose_client_hangs_up_leaves_no_task_behind(tmp_path, gguf_bytes):
    slow = FileServer(chunk=4096, delay=0.1).start()
    problems: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: problems.append(context))
    try:
        url = slow.add("/slow.gguf", gguf_bytes)
        async with daemon_app(tmp_path) as (client, d):
            for path, body in [("/models/create", {"from": url}), ("/api/pull", {"model": url})]:
                async with client.stream("POST", path, json=body) as resp:
                    async for _ in resp.aiter_lines():
                        break  # the client hangs up once the pull has begun
                # The request's pull ends with it: the download is cancelled (its part file stays).
                await asyncio.wait_for(downloads_over(d.store), 10)
            leftover = [t for t in asyncio.all_tasks() if "pull" in repr(t.get_coro()) or "fetch" in repr(t.get_coro())]
            assert leftover == []
            assert d.store.list() == [] and list(d.store.partial.glob("*.part"))
        gc.collect()
        assert [c for c in problems if "destroyed" in str(c.get("message"))] == []
    finally:
        loop.set_exception_handler(None)
        slow.stop()
