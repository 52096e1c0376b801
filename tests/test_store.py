"""The model store in process: pulls over HTTP from a local file server (resume, verify, faults),
imports, tags, removal and reference counts, hostile sources and names, the old registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import ModelFormat
from runnerd.config import HuggingFaceSettings, StoreSettings
from runnerd.store import ModelInUse, ModelNotFound, ModelStore, StoreError, canonical_name
from runnerd.store import blobs as store_module
from runnerd.store import pull as pull_module
from runnerd.store.pull import PullError, PullProgress, parse_source
from tests.fileserver import FileServer

BASE = "https://hub.example"


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.tinymodels import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("m") / "t.gguf").read_bytes()


def make_store(tmp_path: Path, server: FileServer | None = None, **settings: Any) -> ModelStore:
    opts = {"read_timeout": 2.0, "retries": 3, **settings}
    hf = HuggingFaceSettings(base_url=server.base_url if server else BASE)
    return ModelStore(tmp_path / "data", StoreSettings(**opts), hf)


async def pull(store: ModelStore, source: str, name: str | None = None, sha256: str | None = None,
               reports: list[PullProgress] | None = None) -> Any:
    return await store.pull(source, name, sha256, (reports if reports is not None else []).append)


def leftovers(store: ModelStore) -> tuple[list[str], list[str]]:
    blobs = sorted(p.name for p in store.blobs.iterdir()) if store.blobs.exists() else []
    parts = sorted(p.name for p in store.partial.iterdir()) if store.partial.exists() else []
    return blobs, parts


@pytest.mark.anyio
async def test_pull_resumes_with_range_after_a_dropped_connection(tmp_path, server, gguf):
    url = server.add("/files/tiny.gguf", gguf)
    server.drop_after["/files/tiny.gguf"] = [200_000]
    reports: list[PullProgress] = []
    store = make_store(tmp_path, server)
    entry = await pull(store, url, "tiny", reports=reports)
    assert entry.name == "tiny:latest" and entry.stored and entry.size == len(gguf)
    assert entry.digest == hashlib.sha256(gguf).hexdigest()
    assert entry.path == store.blobs / f"sha256-{entry.digest}" and entry.path.read_bytes() == gguf
    assert entry.architecture == "llama" and entry.parameter_count and entry.quantization == "F32"
    ranges = server.gets("/files/tiny.gguf")
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert 0 < int(ranges[1][6:-1]) <= 200_000  # it resumed, it did not start over
    phases = [r.phase for r in reports]
    assert phases[0] == "download" and phases[-1] == "success"
    assert all(r.total == len(gguf) for r in reports if r.phase == "download")
    assert leftovers(store)[1] == []  # no part file once committed
    # Instant listing from the manifest; a new store instance reads the same.
    again = make_store(tmp_path, server).get("tiny")
    assert again == entry


@pytest.mark.anyio
async def test_failed_pull_leaves_only_the_part_and_the_next_pull_resumes(tmp_path, server, gguf):
    url = server.add("/tiny.gguf", gguf)
    server.drop_after["/tiny.gguf"] = [300_000]
    store = make_store(tmp_path, server, retries=0)
    with pytest.raises(StoreError) as err:
        await pull(store, url, "tiny")
    assert err.value.status == 502 and "pull again to resume" in str(err.value)
    assert store.list() == []
    blobs, parts = leftovers(store)
    assert blobs == [] and len([p for p in parts if p.endswith(".part")]) == 1
    part_size = next(store.partial.glob("*.part")).stat().st_size
    assert 0 < part_size <= 300_000
    entry = await pull(store, url, "tiny")
    assert entry.path.read_bytes() == gguf
    assert server.gets("/tiny.gguf")[-1] == f"bytes={part_size}-"
    assert leftovers(store)[1] == []


@pytest.mark.anyio
async def test_sha256_mismatch_registers_nothing_and_keeps_no_part(tmp_path, server, gguf):
    url = server.add("/tiny.gguf", gguf)
    store = make_store(tmp_path, server)
    with pytest.raises(StoreError) as err:
        await pull(store, url, "tiny", sha256="0" * 64)
    assert err.value.status == 502 and err.value.code == "digest_mismatch"
    assert store.list() == [] and leftovers(store) == ([], [])
    good = await pull(store, url, "tiny", sha256="sha256:" + hashlib.sha256(gguf).hexdigest().upper())
    assert good.size == len(gguf)
    with pytest.raises(StoreError) as bad:
        await pull(store, url, "tiny", sha256="xyz")
    assert bad.value.status == 400


@pytest.mark.anyio
async def test_hub_sha256_is_verified(tmp_path, server, gguf):
    ref = server.add_hf("org", "repo", "tiny-Q8_0.gguf", gguf)
    store = make_store(tmp_path, server)
    entry = await pull(store, ref)
    assert entry.name == "org/repo:tiny-Q8_0" and entry.source == ref
    server.files["/org/repo/resolve/main/tiny-Q8_0.gguf"].linked_etag = "1" * 64
    with pytest.raises(StoreError) as err:
        await pull(store, ref, "other")
    assert err.value.code == "digest_mismatch" and "1111" in str(err.value)
    with pytest.raises(StoreError) as err:
        await pull(store, ref + "@v2", "other")
    assert err.value.status == 404


@pytest.mark.parametrize(("status", "expected"), [(404, 404), (500, 502), (403, 502)])
@pytest.mark.anyio
async def test_upstream_errors(tmp_path, server, status, expected):
    server.status["/x.gguf"] = status
    store = make_store(tmp_path, server)
    with pytest.raises(StoreError) as err:
        await pull(store, server.url("/x.gguf"), "x")
    assert err.value.status == expected
    assert store.list() == [] and leftovers(store)[0] == []


@pytest.mark.anyio
async def test_slow_server_times_out(tmp_path, server, gguf):
    url = server.add("/slow.gguf", gguf)
    server.delay = 1.0
    store = make_store(tmp_path, server, read_timeout=0.3, retries=1)
    with pytest.raises(StoreError) as err:
        await pull(store, url, "slow")
    assert err.value.status == 502 and store.list() == []


@pytest.mark.anyio
async def test_content_length_lie_is_caught(tmp_path, server, gguf):
    url = server.add("/lie.gguf", gguf)
    server.short_by["/lie.gguf"] = 1000  # announces 1000 bytes more than it sends, then closes
    store = make_store(tmp_path, server, retries=0)
    with pytest.raises(StoreError) as err:
        await pull(store, url, "lie")
    assert err.value.status == 502 and store.list() == []
    # Resuming asks for the rest; the server says (416) the file ends where our part does: done, and right.
    entry = make_store(tmp_path, server, retries=2).pull
    got = await entry(url, "lie", hashlib.sha256(gguf).hexdigest(), lambda p: None)
    assert got.path.read_bytes() == gguf


@pytest.mark.anyio
async def test_concurrent_pulls_of_one_url_download_once(tmp_path, server, gguf):
    url = server.add("/tiny.gguf", gguf)
    server.delay = 0.02
    store = make_store(tmp_path, server)

    a, b, c = await asyncio.gather(*(store.pull(url, n, None, lambda p: None) for n in ("a", "b", "c")))
    assert len(server.gets("/tiny.gguf")) == 1
    assert a.path == b.path == c.path and {m.name for m in store.list()} == {"a:latest", "b:latest", "c:latest"}
    assert leftovers(store) == ([f"sha256-{a.digest}"], [])


@pytest.mark.anyio
async def test_at_most_two_downloads_at_once(tmp_path, server, gguf):
    urls = [server.add(f"/m{i}.gguf", gguf) for i in range(4)]
    server.delay = 0.02
    store = make_store(tmp_path, server)

    await asyncio.gather(*(store.pull(u, f"m{i}", None, lambda p: None) for i, u in enumerate(urls)))
    assert server.max_active == 2 and len(store.list()) == 4


@pytest.mark.anyio
async def test_cancelled_pull_registers_nothing(tmp_path, server, gguf):
    url = server.add("/tiny.gguf", gguf)
    server.delay = 0.1  # about 1 s for the whole file
    store = make_store(tmp_path, server)

    task = asyncio.create_task(store.pull(url, "t", None, lambda p: None))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.list() == []
    blobs, parts = leftovers(store)
    assert blobs == [] and any(p.endswith(".part") for p in parts)


def test_cancelled_local_import_registers_nothing(tmp_path, tiny_model):
    # The import runs in a thread, which a cancelled await does not stop: hold the thread after it
    # hashed the file until the pull is cancelled, then check that it gave up before registering.
    store = make_store(tmp_path)
    stage, cancelled, staged = store._stage_local, threading.Event(), threading.Event()

    def stage_then_wait(src, on_bytes):
        result = stage(src, on_bytes)
        staged.set()
        assert cancelled.wait(10)
        return result

    store._stage_local = stage_then_wait  # type: ignore[method-assign]

    async def cancel_midway() -> None:
        task = asyncio.create_task(store.pull(str(tiny_model), "t", None, lambda p: None))
        assert await asyncio.to_thread(staged.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()

    asyncio.run(cancel_midway())
    store.close()  # waits for the import thread, which stops once it sees the cancellation
    assert store.list() == [] and make_store(tmp_path).list() == []
    assert leftovers(store) == ([], [])


@pytest.mark.anyio
async def test_disk_full_is_507(tmp_path, server, gguf, monkeypatch):
    url = server.add("/tiny.gguf", gguf)
    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=10))
    with pytest.raises(StoreError) as err:
        await pull(make_store(tmp_path, server), url, "t")
    assert err.value.status == 507 and err.value.code == "disk_full"


@pytest.mark.anyio
async def test_redirects_only_to_http(tmp_path, server, gguf):
    server.add("/real.gguf", gguf)
    server.redirects["/moved.gguf"] = "/real.gguf"
    server.redirects["/evil.gguf"] = "file:///etc/passwd"
    store = make_store(tmp_path, server)
    assert (await pull(store, server.url("/moved.gguf"), "m")).size == len(gguf)
    with pytest.raises(StoreError) as err:
        await pull(store, server.url("/evil.gguf"), "e")
    assert err.value.status == 502 and err.value.code == "bad_redirect"


@pytest.mark.anyio
async def test_not_a_model_is_refused_and_its_blob_removed(tmp_path, server):
    url = server.add("/notes.gguf", b"hello, not a gguf" * 100)
    store = make_store(tmp_path, server)
    with pytest.raises(StoreError) as err:
        await pull(store, url, "n")
    assert err.value.status == 400 and "not a usable GGUF" in str(err.value)
    assert store.list() == [] and leftovers(store) == ([], [])


@pytest.mark.anyio
async def test_tag_remove_and_reference_counts(tmp_path, server, gguf):
    url = server.add("/tiny.gguf", gguf)
    in_use: set[str] = set()
    store = make_store(tmp_path, server)
    store.in_use = in_use.__contains__
    a = await pull(store, url, "a")
    b = store.tag("a", "team/b:v1")
    assert b.name == "team/b:v1" and b.path == a.path and b.digest == a.digest
    in_use.add("a:latest")
    with pytest.raises(ModelInUse) as err:
        store.remove("a")
    assert err.value.status == 409
    store.remove("a", force=True)
    assert a.path.exists()  # team/b:v1 still refers to the blob
    assert store.disk_usage() == len(gguf)
    store.remove("team/b:v1")
    assert not a.path.exists() and store.disk_usage() == 0 and store.list() == []
    with pytest.raises(ModelNotFound):
        store.remove("a")
    with pytest.raises(ModelNotFound):
        store.tag("a", "c")


@pytest.mark.anyio
async def test_local_import_links_and_never_deletes_the_users_file(tmp_path, tiny_model):
    store = make_store(tmp_path)
    reports: list[PullProgress] = []
    entry = await pull(store, str(tiny_model), None, reports=reports)
    assert entry.name == "tiny:latest" and entry.stored and entry.source == str(tiny_model)
    assert entry.path.read_bytes() == tiny_model.read_bytes()
    assert reports[-1].phase == "success" and any(r.phase == "import" for r in reports)
    store.remove("tiny")
    assert tiny_model.exists() and not entry.path.exists()
    with pytest.raises(StoreError) as err:
        await pull(store, str(tmp_path / "missing.gguf"), "m")
    assert err.value.status == 400


def test_add_registers_in_place(tmp_path, tiny_model):
    store = make_store(tmp_path)
    entry = store.add("tiny", tiny_model)
    assert entry.path == tiny_model and not entry.stored and entry.parameter_count
    store.remove("tiny")
    assert tiny_model.exists()


@pytest.mark.anyio
async def test_split_gguf_pull_materialises_shard_names(tmp_path, server):
    from tests.tinymodels import write_tiny_llama

    (tmp_path / "src").mkdir()
    write_tiny_llama(tmp_path / "src" / "m.gguf", split_max_tensors=12)
    shards = sorted((tmp_path / "src").glob("m-*-of-*.gguf"))
    assert len(shards) == 2
    for shard in shards:
        server.add(f"/split/{shard.name}", shard.read_bytes())
    store = make_store(tmp_path, server)
    entry = await pull(store, server.url(f"/split/{shards[1].name}"), "split")  # any shard names the set
    assert entry.path.name == shards[0].name and len(entry.files) == len(shards)
    assert sorted(p.name for p in entry.path.parent.iterdir()) == [s.name for s in shards]
    assert entry.architecture == "llama" and entry.size == sum(s.stat().st_size for s in shards)
    links = entry.path.parent
    store.remove("split")
    assert not links.exists() and leftovers(store) == ([], [])


@pytest.mark.anyio
async def test_hf_repository_directory_pull(tmp_path, server):
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}).encode()
    server.add_hf("org", "llm", "config.json", config, lfs=False)
    server.add_hf("org", "llm", "model.safetensors", b"\0" * 5000)
    server.add_hf("org", "llm", "tokenizer.json", b"{}", lfs=False)
    server.add_hf("org", "llm", "README.md", b"# ignored", lfs=False)
    store = make_store(tmp_path, server)
    entry = await pull(store, "hf://org/llm")
    assert entry.name == "org/llm:latest" and entry.format is ModelFormat.SAFETENSORS
    assert entry.path.is_dir() and sorted(p.name for p in entry.path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert entry.architecture == "LlamaForCausalLM" and entry.context_length == 2048
    with pytest.raises(StoreError) as err:
        await pull(store, "hf://org/missing")
    assert err.value.status == 404


@pytest.mark.parametrize("source", [
    "file:///etc/passwd", "ftp://host/x.gguf", "relative/path.gguf", "", "hf://", "hf://org",
    "hf://org/../x.gguf", "hf://org/repo/../../etc/passwd", "hf://org/repo/.hidden", "hf://org/repo/a b.gguf",
    "hf://org/repo/x.gguf@../main", "hf://org/repo/x.gguf@a//b", "http://user:pw@host/x.gguf", "http:///x.gguf",
    "http://host/x y.gguf", "http://host/\x00", "javascript:alert(1)", "hf://org/repo/x-00009-of-00002.gguf",
])
def test_hostile_sources_are_refused(source):
    with pytest.raises(PullError) as err:
        parse_source(source, BASE)
    assert err.value.status == 400


def test_sources_are_understood():
    src = parse_source("hf://org/repo/sub/m-Q4_K_M.gguf@v1.0", BASE)
    assert [f.url for f in src.files] == [f"{BASE}/org/repo/resolve/v1.0/sub/m-Q4_K_M.gguf"]
    assert src.default_name == "org/repo:m-Q4_K_M"
    split = parse_source("https://h/x/m-00002-of-00003.gguf", BASE)
    assert [f.name for f in split.files] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split.files[1].url == "https://h/x/m-00002-of-00003.gguf"
    assert split.default_name == "m"
    for name in ("../x", "a/../b", ".x", "a:b:c", "a" * 400, "a//b", "a\0b"):
        with pytest.raises(StoreError):
            canonical_name(name)


def test_old_registry_is_migrated(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "models.json").write_text(json.dumps({"models": {"old:latest": {
        "name": "old:latest", "path": str(tiny_model), "format": "gguf", "size": 1, "architecture": "llama",
        "added_at": 1.0, "config": {"context_size": 256}}}}))
    store = make_store(tmp_path)
    entry = store.get("old")
    assert entry.path == tiny_model and not entry.stored and entry.config.context_size == 256
    assert not (data / "models.json").exists() and (data / "models.json.migrated").exists()
    assert make_store(tmp_path).get("old") == entry


def test_a_corrupt_manifest_is_set_aside(tmp_path, tiny_model):
    store = make_store(tmp_path)
    store.add("good", tiny_model)
    (store.manifests / "bad%3Alatest.json").write_text("{not json")
    (store.manifests / "evil%3Alatest.json").write_text(store.get("good").model_copy(
        update={"name": "../evil:latest"}).model_dump_json())
    again = make_store(tmp_path)
    assert [m.name for m in again.list()] == ["good:latest"]
    assert sorted(p.name for p in again.manifests.glob("*.corrupt")) == ["bad%3Alatest.json.corrupt",
                                                                        "evil%3Alatest.json.corrupt"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.builds(lambda s: "hf://" + s, st.text(max_size=120)),
                 st.builds(lambda s: "http://h/" + s, st.text(max_size=120))))
def test_fuzzed_sources_either_refused_or_safe(text):
    try:
        src = parse_source(text, BASE)
    except PullError as exc:
        assert exc.status == 400
        return
    canonical_name(src.default_name)  # a derived name is always a valid one
    if src.kind == "path":
        assert src.path is not None and src.path.is_absolute()
    for f in src.files:
        assert f.url.startswith(("http://", "https://")) and "/" not in f.name and ".." not in f.name, f
        assert not any(c.isspace() or ord(c) < 32 for c in f.url)


@pytest.mark.anyio
async def test_multimodal_projector_is_stored_with_the_model(tmp_path, server, gguf, tiny_model):
    from tests.tinymodels import write_tiny_llama

    projector = write_tiny_llama(tmp_path / "proj.gguf", seed=7).read_bytes()
    url = server.add("/vlm/model.gguf", gguf)
    proj_url = server.add("/vlm/mmproj-f16.gguf", projector)
    store = make_store(tmp_path, server)
    entry = await store.pull(url, "vlm", None, lambda p: None, mmproj=proj_url)
    assert entry.mmproj is not None and entry.mmproj.read_bytes() == projector
    assert entry.path.read_bytes() == gguf and entry.size == len(gguf)
    assert [f.role for f in entry.files] == ["model", "mmproj"]
    plain = await pull(store, url, "plain")
    assert plain.mmproj is None and plain.path == entry.path and plain.digest != entry.digest
    store.remove("vlm")
    assert not entry.mmproj.exists() and plain.path.exists()
    with pytest.raises(StoreError) as err:  # mixed kinds of source
        await store.pull(url, "x", None, lambda p: None, mmproj=str(tiny_model))
    assert err.value.status == 400
    server.add("/vlm/bad.gguf", b"not a projector" * 10)
    with pytest.raises(StoreError) as err:
        await store.pull(url, "x", None, lambda p: None, mmproj=server.url("/vlm/bad.gguf"))
    assert err.value.status == 400 and "projector" in str(err.value)
    assert {m.name for m in store.list()} == {"plain:latest"}
    local = await store.pull(str(tiny_model), "loc", None, lambda p: None, mmproj=str(tmp_path / "proj.gguf"))
    assert local.mmproj is not None and local.mmproj.read_bytes() == projector


@pytest.mark.anyio
async def test_hub_token_goes_to_the_hub_only(tmp_path, server, gguf):
    token = tmp_path / "hf-token"
    token.write_text("hf_secret\n")
    server.add("/cdn/x.gguf", gguf)
    # The hub (127.0.0.1) redirects to a CDN on another host name (localhost): no token there.
    server.redirects["/org/repo/resolve/main/x.gguf"] = f"http://localhost:{server.port}/cdn/x.gguf"
    store = ModelStore(tmp_path / "data", StoreSettings(read_timeout=2.0),
                       HuggingFaceSettings(base_url=server.base_url, token_file=token))
    await pull(store, "hf://org/repo/x.gguf")
    sent = {path: (auth, host) for path, auth, host in server.authorization}
    assert sent["/org/repo/resolve/main/x.gguf"][0] == "Bearer hf_secret"
    assert sent["/cdn/x.gguf"] == (None, f"localhost:{server.port}")


# --- failed commits leave no orphan; the start-up sweep ------------------------------------------

def blob_names(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir()) if store.blobs.exists() else []


def link_names(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.links.iterdir()) if store.links.exists() else []


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file (zeroed data) with these (dtype, shape) tensors."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype] * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * offset)


def hf_dir(root: Path, config: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    write_safetensors(root / "model-00001-of-00002.safetensors", {"a.weight": ("BF16", [64, 32]),
                                                                   "a.bias": ("BF16", [64])})
    write_safetensors(root / "model-00002-of-00002.safetensors", {"b.weight": ("BF16", [16, 8])})
    return root


@pytest.mark.anyio
async def test_manifest_write_failure_leaves_no_orphan_blob(tmp_path, tiny_model, monkeypatch):
    store = make_store(tmp_path)

    def broken(entry: Any) -> None:
        raise OSError(5, "Input/output error", str(store.manifests / "x.json"))

    monkeypatch.setattr(store, "_write_manifest", broken)
    with pytest.raises(StoreError) as err:
        await pull(store, str(tiny_model), "t")
    assert err.value.status == 500 and err.value.code == "store_io"
    assert store.list() == [] and leftovers(store) == ([], []) and tiny_model.exists()


@pytest.mark.anyio
async def test_links_failure_leaves_no_orphan_blobs(tmp_path, monkeypatch):
    source = hf_dir(tmp_path / "llm", {"torch_dtype": "bfloat16"})
    store = make_store(tmp_path)

    def broken(digest: str, files: Any) -> Path:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "_materialise", broken)
    with pytest.raises(StoreError):
        await pull(store, str(source), "llm")
    assert store.list() == [] and blob_names(store) == [] and link_names(store) == []


@pytest.mark.anyio
async def test_a_commit_failing_half_way_collects_the_blobs_already_committed(tmp_path, tiny_model, monkeypatch):
    from tests.tinymodels import write_tiny_llama

    projector = write_tiny_llama(tmp_path / "proj.gguf", seed=7)
    store = make_store(tmp_path)
    keep = await pull(store, str(projector), "keep")  # shares the projector's blob: it must survive
    commit, calls = store._commit_blob, []

    def second_fails(src: Path, digest: str, **kw: Any) -> Path:
        calls.append(digest)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return commit(src, digest, **kw)

    monkeypatch.setattr(store, "_commit_blob", second_fails)
    with pytest.raises(StoreError):
        await store.pull(str(tiny_model), "vlm", None, lambda p: None, mmproj=str(projector))
    assert [m.name for m in store.list()] == ["keep:latest"] and keep.path.exists()
    assert blob_names(store) == [keep.path.name] and leftovers(store)[1] == []


@pytest.mark.anyio
async def test_start_up_sweep_removes_only_unreferenced_blobs(tmp_path, tiny_model, monkeypatch):
    store = make_store(tmp_path)
    stored = await pull(store, str(tiny_model), "stored")
    split = tmp_path / "src"
    split.mkdir()
    from tests.tinymodels import write_tiny_llama

    write_tiny_llama(split / "m.gguf", split_max_tensors=12)
    shards = await pull(store, str(next(split.glob("m-00001-of-*.gguf"))), "split")
    orphan = store.blobs / f"sha256-{'a' * 64}"
    orphan.write_bytes(b"left by a failed commit")
    in_place = store.blobs / f"sha256-{'b' * 64}"  # odd, but a user may register any file in place
    in_place.write_bytes(tiny_model.read_bytes())
    store.add("odd", in_place)
    recoverable = store.blobs / f"sha256-{'c' * 64}"
    recoverable.write_bytes(b"named by a manifest set aside as corrupt")
    (store.manifests / "broken%3Alatest.json.corrupt").write_text(f'{{"files": [{{"digest": "{"c" * 64}"')
    others = [store.blobs / "sha256-XYZ", store.blobs / "notes.txt", store.blobs / f"sha256-{'d' * 64}.tmp"]
    for other in others:
        other.write_bytes(b"not a blob name")
    orphan_links = store.links / ("e" * 64)
    orphan_links.mkdir()
    (orphan_links / "m.gguf").write_bytes(b"x")
    old_import, new_import = store.partial / ".import-old", store.partial / ".import-new"
    store.partial.mkdir(exist_ok=True)
    old_import.write_bytes(b"x")
    new_import.write_bytes(b"x")
    os.utime(old_import, (time.time() - 2 * 86400,) * 2)

    assert make_store(tmp_path) and orphan.exists()  # younger than the grace period: another process's?
    assert not old_import.exists() and new_import.exists()
    monkeypatch.setattr(store_module, "SWEEP_GRACE_SECONDS", -5)
    again = make_store(tmp_path)
    assert {m.name for m in again.list()} == {"stored:latest", "split:latest", "odd:latest"}
    assert not orphan.exists() and not orphan_links.exists()
    assert in_place.exists() and recoverable.exists() and all(o.exists() for o in others)
    assert stored.path.exists() and all(f.exists() for f in shards.path.parent.iterdir())
    assert link_names(again) == [shards.digest]
    assert again.get("split").path.read_bytes()[:4] == b"GGUF"


@pytest.mark.anyio
async def test_hf_directory_gets_parameter_count_and_quantization(tmp_path):
    store = make_store(tmp_path)
    plain = await pull(store, str(hf_dir(tmp_path / "plain", {"torch_dtype": "bfloat16"})), "plain")
    assert plain.format is ModelFormat.SAFETENSORS
    assert plain.parameter_count == 64 * 32 + 64 + 16 * 8 and plain.quantization == "bfloat16"
    gptq_config = {"torch_dtype": "float16", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    gptq = await pull(store, str(hf_dir(tmp_path / "gptq", gptq_config)))
    assert gptq.quantization == "gptq"
    newer = await pull(store, str(hf_dir(tmp_path / "newer", {"dtype": "float32"})), "newer")
    assert newer.quantization == "float32"
    bad = hf_dir(tmp_path / "bad", {})
    (bad / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 16)  # header length beyond the file
    entry = await pull(store, str(bad), "bad")
    assert entry.parameter_count is None and entry.quantization is None
