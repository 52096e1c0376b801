"""Scheduling limits with the real engine: queue deadlines, answers that never wait, max_runners,
min_residency, readiness timeout, the [memory] table, and runners of one model that overlap."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from runnerd.admission import Amount, Budget, HostMemory
from runnerd.config import MemorySettings, load_settings
from tests.tinymodels import write_alien_model, write_tiny_llama

MiB = 1 << 20


@pytest.fixture(scope="module")
def two_models(models_dir: Path) -> dict[str, Path]:
    return {name: write_tiny_llama(models_dir / f"limits-{name}.gguf", seed=10 + i) for i, name in enumerate("ab")}


def ask(d, model, **extra):
    return d.post("/engines/v1/completions", {"model": model, "prompt": "the", "max_tokens": 2,
                                              "ignore_eos": True, **extra})


def loaded(d):
    return sorted(r["model"].split(":")[0] for r in d.ps())


def timed(d, model: str) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    resp = ask(d, model)
    return resp, time.monotonic() - t0


ONE_RUNNER = {"RUNNERD_MAX_RUNNERS": "1", "RUNNERD_DEFAULT_CONTEXT_SIZE": "4096"}


@pytest.mark.engine
def test_queue_timeout_counts_from_when_a_request_arrives(make_daemon, two_models, tiny_model):
    # Two loads queue behind a busy runner: the second one's wait includes its time behind the first.
    d = make_daemon({**two_models, "c": tiny_model}, env={**ONE_RUNNER, "RUNNERD_QUEUE_TIMEOUT": "1.5"})
    with d.busy("a"), ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda m: timed(d, m), ["b", "c"]))
    for resp, waited in results:
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert 1.2 < waited < 2.6, waited  # one queue timeout, not two


@pytest.mark.engine
def test_never_fitting_and_held_back_models_are_answered_without_queueing(make_daemon, two_models, tmp_path):
    big = write_tiny_llama(tmp_path / "big.gguf", n_embd=256, n_ff=2048)  # ~36 MiB estimated; tiny ~22
    alien = write_alien_model(tmp_path / "alien.gguf")
    d = make_daemon({**two_models, "big": big, "alien": alien},
                    env={**ONE_RUNNER, "RUNNERD_QUEUE_TIMEOUT": "20", "RUNNERD_CRASH_BACKOFF": "30",
                         "RUNNERD_MEMORY__RAM_LIMIT": str(29 * MiB), "RUNNERD_MEMORY__RAM_RESERVE": "0"})
    for _ in range(3):
        assert ask(d, "alien").status_code == 500
    with ThreadPoolExecutor(1) as pool:
        with d.busy("a"):
            waiting = pool.submit(ask, d, "b")  # queues for the one runner slot, holding the admission turn
            time.sleep(0.5)
            assert not waiting.done()
            resp, took = timed(d, "big")
            assert resp.status_code == 507 and took < 1.5, (resp.text, took)
            resp, took = timed(d, "alien")
            assert resp.status_code == 503 and took < 1.5, (resp.text, took)
            assert "held back" in resp.json()["error"]["message"]
            assert not waiting.done()
        assert waiting.result().status_code == 200


@pytest.mark.engine
def test_507_comes_before_a_full_queue(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_QUEUE_SIZE": "0", "RUNNERD_MEMORY__RAM_LIMIT": str(MiB)})
    assert ask(d, "tiny").status_code == 507


@pytest.mark.engine
def test_max_runners_evicts_the_least_recently_used(make_daemon, two_models, tiny_model):
    d = make_daemon({**two_models, "c": tiny_model}, env={"RUNNERD_MAX_RUNNERS": "2"})
    for model in ("a", "b", "a", "c"):
        assert ask(d, model).status_code == 200
    assert loaded(d) == ["a", "c"]
    assert "evicting model=b:latest" in d.output()


@pytest.mark.engine
def test_min_residency_keeps_a_runner_until_it_has_served_its_time(make_daemon, two_models):
    d = make_daemon(two_models, env={"RUNNERD_MAX_RUNNERS": "1", "RUNNERD_MIN_RESIDENCY": "2",
                                     "RUNNERD_QUEUE_TIMEOUT": "10"})
    assert ask(d, "a").status_code == 200
    a_done = time.monotonic()
    resp, _ = timed(d, "b")
    assert resp.status_code == 200
    assert time.monotonic() - a_done >= 1.5  # a became ready before its answer: b waited out the rest
    assert loaded(d) == ["b"]


@pytest.mark.engine
def test_readiness_timeout_fails_the_load_with_a_clear_error(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model}, env={"RUNNERD_READINESS_TIMEOUT": "0.001"})
    resp = ask(d, "tiny")
    assert resp.status_code == 500, resp.text
    message = resp.json()["error"]["message"]
    assert "did not become ready within 0.001 s" in message and "readiness_timeout" in message
    d.wait_for(lambda: d.ps() == [] and not d.engine_pids(), timeout=10, what="timed-out load stopped")


def test_memory_table_takes_size_strings(tmp_path, monkeypatch):
    for name in ("RUNNERD_MEMORY__RAM_LIMIT", "RUNNERD_MEMORY__VRAM_LIMIT", "RUNNERD_MEMORY__RAM_RESERVE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "runnerd.toml"
    config.write_text('[memory]\nram_limit = "64MiB"\nvram_limit = "8GiB"\nram_reserve = "512MiB"\n')
    memory = load_settings(config).memory
    assert (memory.ram_limit, memory.vram_limit, memory.ram_reserve) == (64 * MiB, 8 << 30, 512 * MiB)


@pytest.mark.engine
def test_memory_table_from_the_config_file_applies(make_daemon, tiny_model, tmp_path):
    config = tmp_path / "runnerd.toml"
    config.write_text('[memory]\nram_limit = "1MiB"\nram_reserve = "0"\n')
    d = make_daemon({"tiny": tiny_model}, args=["--config", str(config)])
    resp = ask(d, "tiny")
    assert resp.status_code == 507, resp.text
    message = resp.json()["error"]["message"]
    assert "this host has" in message and "total" in message
    assert "at most 1 MiB RAM" in message and "memory.ram_limit = 1 MiB" in message


def test_507_message_names_required_total_and_the_cap():
    host = HostMemory(ram_total=16 << 30, ram_available=8 << 30)
    unlimited = Budget(MemorySettings(ram_reserve=1 << 30), probe=lambda: host)
    text = unlimited.explain_capacity(Amount(ram=20 << 30))
    assert text == ("needs 20480 MiB RAM; this host has 16384 MiB RAM total, runnerd may use at most 15360 MiB RAM "
                    "(host RAM minus memory.ram_reserve = 1024 MiB)")
    capped = Budget(MemorySettings(ram_limit=4 << 30), probe=lambda: host)
    assert "at most 4096 MiB RAM (memory.ram_limit = 4096 MiB)" in capped.explain_capacity(Amount(ram=5 << 30))


@pytest.mark.engine
def test_crash_back_off_grows_between_holds(make_daemon, tmp_path):
    alien = write_alien_model(tmp_path / "alien.gguf")
    d = make_daemon({"alien": alien}, env={"RUNNERD_CRASH_BACKOFF": "2"})
    for _ in range(3):
        assert ask(d, "alien").status_code == 500
    first = ask(d, "alien")
    assert first.status_code == 503 and int(first.headers["Retry-After"]) == 2, first.text
    time.sleep(2.1)
    assert ask(d, "alien").status_code == 500  # the hold ended: it is tried (and fails) again
    second = ask(d, "alien")
    assert second.status_code == 503 and int(second.headers["Retry-After"]) == 4, second.text
    assert d.output().count("runner starting model=alien:latest") == 4


@pytest.mark.engine
def test_model_asked_for_while_its_runner_stops_gets_files_of_its_own(make_daemon, tiny_model):
    d = make_daemon({"tiny": tiny_model})
    runners = d.root / "run" / "runners"
    # The overlap depends on how fast the engine exits: try until it has happened (and at least 4 times).
    for attempt in range(20):
        if attempt >= 4 and "still stopping" in d.output():
            break
        assert ask(d, "tiny", keep_alive=0).status_code == 200  # its runner stops right after this answer
        assert ask(d, "tiny").status_code == 200  # at once: the previous runner may still be stopping
        d.wait_for(lambda: [r["state"] for r in d.ps()] == ["idle"], what="only the new runner left")
        (live,) = d.ps()
        (pid_file,) = runners.glob("*.pid")
        assert json.loads(pid_file.read_text())["pid"] == live["pid"]
        assert Path(live["socket"]).is_socket()
        assert ask(d, "tiny").status_code == 200
    assert "still stopping" in d.output()  # the overlap this test is about did happen
