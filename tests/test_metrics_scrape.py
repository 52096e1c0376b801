"""Where /metrics is encoded: a small scrape on the event loop (handing it to a thread cost more than the
encoding), a large one in a thread so that no scrape holds the loop for long. Either way the text is the
same and parses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import runnerd.api.metrics as metrics_route
from tests.conftest import app_on_socket


async def _scrape_twice(tmp_path: Path) -> list[str]:
    async with app_on_socket(tmp_path, {}) as client:
        for path in ("/health", "/engines/ps", "/v1/models", "/api/tags"):
            assert (await client.get(path)).status_code == 200
        # The scrape counts itself only once it has answered: two in a row show the same series.
        return [(await client.get("/metrics")).text for _ in range(2)]


@pytest.mark.anyio
@pytest.mark.parametrize("inline_series", [16, 0])
async def test_a_scrape_is_encoded_on_the_loop_only_while_it_is_small(tmp_path: Path, monkeypatch,
                                                                     inline_series: int) -> None:
    threaded: list[Any] = []
    to_thread = asyncio.to_thread

    async def recorded(func: Any, *args: Any) -> Any:
        threaded.append(func)
        return await to_thread(func, *args)

    monkeypatch.setattr(metrics_route, "_INLINE_TIMED_SERIES", inline_series)
    monkeypatch.setattr(asyncio, "to_thread", recorded)
    texts = await _scrape_twice(tmp_path)
    encoded_in_threads = [f for f in threaded if f is metrics_route._exposition]
    assert len(encoded_in_threads) == (0 if inline_series else 2)
    families = {f.name: f for f in text_string_to_metric_families(texts[1])}
    routes = {s.labels["route"] for s in families["runnerd_requests"].samples if s.name == "runnerd_requests_total"}
    assert {"/health", "/engines/ps", "/v1/models", "/api/tags", "/metrics"} <= routes
