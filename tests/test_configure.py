"""Per-model configuration through POST /engines/_configure, reaching the real llama-server."""

from __future__ import annotations

import json
import threading

import httpx2 as httpx
import psutil
import pytest

from backends.base import BackendConfiguration, Mode
from backends.llamacpp import LlamaCppBackend, LlamaCppOptions
from runnerd.configs import ConfigStore, StoredConfiguration, effective_configuration

CHAT = [{"role": "user", "content": "hello"}]


def engine(runner):
    return httpx.Client(transport=httpx.HTTPTransport(uds=runner["socket"]), base_url="http://engine")


def last_value(argv, flag):
    return argv[max(i for i, a in enumerate(argv) if a == flag) + 1]


@pytest.mark.engine
def test_configured_context_and_threads_reach_the_engine(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_LLAMACPP__THREADS": "2"})
    resp = d.post("/engines/_configure", {"model": "tiny", "context_size": 1024,
                                          "raw_runtime_flags": "--threads 1 --temp=0.25"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["config"] == {"context_size": 1024, "runtime_flags": ["--threads", "1", "--temp", "0.25"]}
    d.wait_for(lambda: [r["state"] for r in d.ps()] == ["idle"], what="background preload")
    (runner,) = d.ps()
    props = engine(runner).get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert abs(props["default_generation_settings"]["params"]["temperature"] - 0.25) < 1e-6
    argv = psutil.Process(runner["pid"]).cmdline()
    assert last_value(argv, "--threads") == "1"
    assert last_value(argv, "--model") == str(tiny_model)

    # A different configuration restarts the idle runner; the new context reaches the new engine.
    resp = d.post("/engines/llama.cpp/_configure", {"model": "tiny", "context_size": 2048})
    assert resp.status_code == 202 and resp.json()["restarted"] is True
    d.wait_for(lambda: [(r["state"], r["pid"] != runner["pid"]) for r in d.ps()] == [("idle", True)],
               what="restarted runner")
    assert engine(d.ps()[0]).get("/props").json()["default_generation_settings"]["n_ctx"] == 2048
    listed = d.http.get("/engines/_configure", params={"model": "tiny"}).json()
    assert [c["config"] for c in listed["configurations"]] == [{"context_size": 2048}]


@pytest.mark.engine
def test_refused_input_stores_nothing(daemon):
    cases = [
        ({"runtime_flags": ["--model", "/etc/passwd"]}, "runtime_flags", "--model"),
        ({"runtime_flags": ["--host", "0.0.0.0"]}, "runtime_flags", "--host"),
        ({"runtime_flags": ["--temp", "0.5", "--chat-template-file", "x"]}, "runtime_flags",
         "--chat-template-file"),
        ({"raw_runtime_flags": "--temp '0.5"}, "raw_runtime_flags", "closing quotation"),
        ({"runtime_flags": ["--threads", "1"], "raw_runtime_flags": "--threads 1"}, "runtime_flags", "either"),
        ({"keep_alive": "eventually"}, "keep_alive", "eventually"),
        ({"context_size": 0}, "context_size", "greater than 0"),
        ({"mode": "dreaming"}, "mode", "mode"),
        ({"vllm": {"gpu_memory_utilization": 0.5}}, "vllm", "vllm options do not apply"),
        ({"llamacpp": {"reasoning_budget": -2}}, "llamacpp.reasoning_budget", "greater than or equal to -1"),
        ({"options": {"reasoning_budget": -2}}, "llamacpp.reasoning_budget", "greater than or equal to -1"),
        ({"llamacpp": {"reasoning_budgte": 1}}, "llamacpp.reasoning_budgte", "Extra inputs"),
        ({"llamacpp": 3}, "llamacpp", "must be an object"),
        ({"speculative": {"draft_model": "ghost"}}, "speculative.draft_model", "'ghost' is not in the store"),
        # The daemon resolves the draft's path itself: a caller cannot hand the engine a file.
        ({"speculative": {"draft_model": "tiny", "draft": {"name": "x", "path": "/etc/passwd"}}},
         "speculative.draft", "Extra inputs"),
        ({"speculative": {"draft_model": "tiny", "num_tokens": 0}}, "speculative.num_tokens", "greater than"),
        ({"unknown_field": 1}, "unknown_field", "Extra inputs"),
    ]
    for body, param, fragment in cases:
        resp = daemon.post("/engines/_configure", {"model": "tiny", **body})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and fragment in error["message"], (body, error)
    assert daemon.http.get("/engines/_configure").json()["configurations"] == []
    assert daemon.post("/engines/_configure", {"model": "ghost"}).status_code == 404
    assert daemon.post("/engines/nope/_configure", {"model": "tiny"}).status_code == 404


@pytest.mark.engine
def test_busy_runner_is_not_reconfigured(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"})
    d.openai().chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    started = threading.Event()

    def long_request():
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with d.http.stream("POST", "/engines/v1/chat/completions", json=body) as resp:
            for _ in resp.iter_lines():
                started.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        assert started.wait(30)
        resp = d.post("/engines/_configure", {"model": "tiny", "context_size": 512})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "runner_busy"
        assert d.http.get("/engines/_configure").json()["configurations"] == []
    finally:
        d.post("/engines/unload", {"all": True})
        worker.join(60)


@pytest.mark.engine
def test_delete_and_the_cli(daemon):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "runnerd.cli", *args, "--socket", str(daemon.socket)],
                              capture_output=True, text=True, timeout=60)

    out = cli("configure", "tiny", "--mode", "embedding", "--ctx", "256", "--flags", "--threads 1",
              "--keep-alive", "10m")
    assert out.returncode == 0 and "configured tiny:latest (embedding)" in out.stdout, out.stderr
    shown = json.loads(cli("configure", "--show", "--json").stdout)["configurations"]
    assert shown[0]["config"] == {"context_size": 256, "runtime_flags": ["--threads", "1"], "keep_alive": "10m"}
    out = cli("configure", "tiny", "--flags", "--model /etc/passwd")
    assert out.returncode == 1 and "--model" in out.stderr and "HTTP 400" in out.stderr
    assert cli("configure", "tiny", "--mode", "embedding", "--reset").returncode == 0
    resp = daemon.http.delete("/engines/_configure", params={"model": "tiny", "mode": "embedding"})
    assert resp.status_code == 404
    daemon.post("/engines/unload", {"all": True})


def test_configurations_survive_a_restart_and_merge_over_defaults(tmp_path):
    store = ConfigStore(tmp_path)
    item = StoredConfiguration(model="m:latest", mode=Mode.COMPLETION, backend="llama.cpp",
                               config=BackendConfiguration(context_size=1024), updated_at=1.0)
    store.put(item)
    again = ConfigStore(tmp_path)
    assert again.get("m:latest", Mode.COMPLETION) == item
    defaults = BackendConfiguration(context_size=4096, keep_alive="1m", llamacpp=LlamaCppOptions(reasoning_budget=0))
    merged = effective_configuration(defaults, again.get("m:latest", Mode.COMPLETION))
    assert (merged.context_size, merged.keep_alive) == (1024, "1m")
    assert LlamaCppBackend(cache_dir=tmp_path).options(merged).reasoning_budget == 0


def test_a_configuration_stored_meanwhile_is_not_overwritten(tmp_path):
    store = ConfigStore(tmp_path)
    first = StoredConfiguration(model="m:latest", mode=Mode.COMPLETION, backend="llama.cpp",
                                config=BackendConfiguration(context_size=1024), updated_at=1.0)
    assert store.put_unless_changed(first, None)
    seen = store.get("m:latest", Mode.COMPLETION)
    meanwhile = first.model_copy(update={"config": BackendConfiguration(context_size=2048), "updated_at": 2.0})
    store.put(meanwhile)
    late = first.model_copy(update={"config": BackendConfiguration(context_size=8192), "updated_at": 3.0})
    assert not store.put_unless_changed(late, seen)
    assert ConfigStore(tmp_path).get("m:latest", Mode.COMPLETION) == meanwhile  # the file too
    assert store.put_unless_changed(late, meanwhile)
    assert ConfigStore(tmp_path).get("m:latest", Mode.COMPLETION) == late


def test_a_corrupt_file_is_set_aside_and_reported(tmp_path):
    (tmp_path / "configurations.json").write_text('{"configurations": [{"model": 3}]}')
    store = ConfigStore(tmp_path)
    assert store.list() == [] and len(store.problems) == 1 and "could not be read" in store.problems[0]
    kept = list(tmp_path.glob("configurations.json.corrupt-*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["configurations"][0]["model"] == 3


# --- Docker Model Runner's spelling ------------------------------------------------------------------------


def stored_configurations(daemon):
    return [{k: v for k, v in c.items() if k != "updated_at"}
            for c in daemon.http.get("/engines/_configure").json()["configurations"]]


@pytest.mark.engine
def test_docker_model_runners_kebab_case_stores_what_snake_case_does(daemon):
    common = {"model": "tiny", "keep_alive": "10m"}  # keep_alive is snake_case in DMR's body too
    snake = {**common, "context_size": 1024, "runtime_flags": ["--temp", "0.5"], "llamacpp": {"reasoning_budget": 0},
             "speculative": {"draft_model": "tiny", "num_tokens": 4}}
    kebab = {**common, "context-size": 1024, "runtime-flags": ["--temp", "0.5"], "llamacpp": {"reasoning-budget": 0},
             "speculative": {"draft-model": "tiny", "num-tokens": 4}}
    # DMR's speculative object is snake_case (draft_model, num_tokens), beside its kebab-case top level.
    dmr = {**common, "context-size": 1024, "raw-runtime-flags": "--temp 0.5", "llamacpp": {"reasoning-budget": 0},
           "speculative": {"draft_model": "tiny", "num_tokens": 4}}
    raw_snake = {**snake, "raw_runtime_flags": "--temp 0.5"}
    del raw_snake["runtime_flags"]
    stored = []
    try:
        for body in (snake, kebab, dmr, raw_snake):
            resp = daemon.post("/engines/_configure", body)
            assert resp.status_code == 202, (body, resp.text)
            stored.append(stored_configurations(daemon))
            assert daemon.http.delete("/engines/_configure", params={"model": "tiny"}).status_code == 200
    finally:
        daemon.post("/engines/unload", {"all": True})
    assert stored[0] == [{"model": "tiny:latest", "mode": "completion", "backend": "llama.cpp", "orphaned": False,
                          "config": {
        "context_size": 1024, "runtime_flags": ["--temp", "0.5"], "keep_alive": "10m",
        "speculative": {"draft_model": "tiny:latest", "num_tokens": 4}, "llamacpp": {"reasoning_budget": 0}}}]
    assert stored[1] == stored[0] and stored[2] == stored[0] and stored[3] == stored[0]


@pytest.mark.engine
def test_a_kebab_case_misspelling_is_still_refused_by_name(daemon):
    cases = [
        ({"context-sise": 1024}, "context-sise", "Extra inputs"),
        ({"context-size": 0}, "context-size", "greater than 0"),
        ({"runtime-flags": ["--model", "/etc/passwd"]}, "runtime_flags", "--model"),
        ({"llamacpp": {"reasoning-budgte": 1}}, "llamacpp.reasoning-budgte", "Extra inputs"),
        ({"llamacpp": {"reasoning-budget": -2}}, "llamacpp.reasoning-budget", "greater than or equal to -1"),
        ({"speculative": {"draft-model": "tiny", "num-token": 2}}, "speculative.num-token", "Extra inputs"),
    ]
    for body, param, fragment in cases:
        resp = daemon.post("/engines/_configure", {"model": "tiny", **body})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and fragment in error["message"], (body, error)
    assert daemon.http.get("/engines/_configure").json()["configurations"] == []


def test_vllm_options_in_docker_model_runners_spelling(tmp_path):
    from pydantic import ValidationError

    from backends.vllm import VllmBackend

    backend = VllmBackend(cache_dir=tmp_path)
    snake = backend.validate_options({"gpu_memory_utilization": 0.5, "hf_overrides": {"rope_theta": 1000}})
    kebab = backend.validate_options({"gpu-memory-utilization": 0.5, "hf-overrides": {"rope_theta": 1000}})
    assert kebab == snake == {"gpu_memory_utilization": 0.5, "hf_overrides": {"rope_theta": 1000}}
    for table, loc in [({"gpu-memory-utilisation": 0.5}, ("gpu-memory-utilisation",)),
                       ({"hf-overrides": {"rope-theta": 1}}, ("hf-overrides",))]:  # keys inside stay identifiers
        with pytest.raises(ValidationError) as err:
            backend.validate_options(table)
        assert err.value.errors()[0]["loc"] == loc
