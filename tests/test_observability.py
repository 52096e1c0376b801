"""GET /metrics (parsed with prometheus-client's own parsers) and GET /logs, on a real daemon and engine."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "hello world"}]
EXACT = {"ignore_eos": True}
RUNNER = {"backend": "llama.cpp", "model": "tiny:latest", "mode": "completion"}


def scrape(daemon) -> list:
    resp = daemon.http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return list(text_string_to_metric_families(resp.text))


def value(families, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(s.value for f in families for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_request_load_and_engine_metrics(daemon):
    client = daemon.openai()
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, extra_body=EXACT)
    streamed = daemon.openai("/v1")  # its own route label: the stream's numbers stand alone
    list(streamed.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, stream=True, extra_body=EXACT))
    daemon.http.get("/engines/v1/no-such-route")
    chat = {"route": "/engines/v1/chat/completions", "model": "tiny:latest"}
    stream = {"route": "/v1/chat/completions", "model": "tiny:latest"}
    families: list = []

    def settled() -> bool:
        # A stream is counted as its handler ends, which may be just after the client read its last byte;
        # a runner's memory is measured by the next host sample.
        families[:] = scrape(daemon)
        return (value(families, "runnerd_requests_total", status="200", **stream) >= 1
                and value(families, "runnerd_memory_reserved_bytes", kind="ram", source="measured") > 0)
    daemon.wait_for(settled, what="the stream counted and the runner's memory measured")

    for labels in (chat, stream):
        assert value(families, "runnerd_requests_total", status="200", **labels) >= 1
        assert value(families, "runnerd_request_duration_seconds_count", **labels) >= 1
        assert value(families, "runnerd_time_to_first_byte_seconds_count", **labels) >= 1
    assert value(families, "runnerd_requests_total", route="unmatched", model="", status="404") >= 1
    # A stream's headers go out before its end: its time to first byte is shorter than the request.
    assert 0 < value(families, "runnerd_time_to_first_byte_seconds_sum", **stream) < value(
        families, "runnerd_request_duration_seconds_sum", **stream)
    assert value(families, "runnerd_runner_loads_total", outcome="ready", **RUNNER) >= 1
    assert value(families, "runnerd_runner_load_duration_seconds_count", **RUNNER) >= 1
    assert value(families, "runnerd_queue_depth") == 0
    assert value(families, "runnerd_runners", state="idle") == 1
    assert {s.labels["source"] for f in families if f.name == "runnerd_memory_reserved_bytes" for s in f.samples} \
        == {"estimate", "measured"}
    assert value(families, "runnerd_memory_reserved_bytes", kind="ram", source="measured") > 0

    # The engine's own metrics, scraped over its socket and labelled with the runner they came from.
    assert value(families, "runnerd_runner_metrics_up", **RUNNER) == 1
    assert value(families, "llamacpp:prompt_tokens_total", **RUNNER) > 0
    assert value(families, "llamacpp:tokens_predicted_total", **RUNNER) >= 6


def test_openmetrics_when_asked_for(daemon):
    resp = daemon.http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    names = {f.name for f in parse_openmetrics(resp.text)}
    assert {"runnerd_requests", "runnerd_runner_loads"} <= names


def test_evictions_and_crashes_are_counted(daemon):
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    before = scrape(daemon)
    assert daemon.post("/engines/unload", {"models": ["tiny"]}).json()["unloaded"] >= 1
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    [pid] = daemon.engine_pids()
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for(lambda: daemon.ps() == [], what="the killed engine to be forgotten")
    after = scrape(daemon)
    evicted = "runnerd_runner_evictions_total"
    assert value(after, evicted, reason="unload", **RUNNER) == value(before, evicted, reason="unload", **RUNNER) + 1
    crashes = "runnerd_runner_crashes_total"
    assert value(after, crashes, reason="killed", **RUNNER) == value(before, crashes, reason="killed", **RUNNER) + 1


def test_daemon_and_runner_logs(daemon):
    daemon_log = daemon.http.get("/logs", params={"tail": 1000})
    assert daemon_log.status_code == 200 and daemon_log.headers["Content-Type"].startswith("text/plain")
    assert f"listening on unix:{daemon.socket}" in daemon_log.text
    assert len(daemon.http.get("/logs", params={"tail": 1}).text.splitlines()) == 1

    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    runner_log = daemon.http.get("/logs", params={"runner": "tiny", "mode": "completion"})
    assert runner_log.status_code == 200 and "llama_server: model loaded" in runner_log.text

    errors = [daemon.http.get("/logs", params=p) for p in
              ({"runner": "ghost"}, {"tail": "-1"}, {"bogus": "1"}, {"runner": "../etc"})]
    assert [e.status_code for e in errors] == [404, 400, 400, 400]


def test_following_a_runner_log(daemon):
    daemon.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    with ThreadPoolExecutor(1) as pool, daemon.http.stream(
            "GET", "/logs", params={"runner": "tiny:latest", "follow": "true", "tail": "0"}) as resp:
        assert resp.status_code == 200
        time.sleep(0.3)  # the follower is polling now
        pool.submit(daemon.openai().completions.create, model="tiny", prompt="follow me", max_tokens=1)
        lines = resp.iter_lines()
        deadline = time.monotonic() + 20
        seen: list[str] = []
        while time.monotonic() < deadline and not any("print_timing" in line for line in seen):
            seen.append(next(lines))
    assert any("print_timing" in line for line in seen), seen
