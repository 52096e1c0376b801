"""The daemon's own Prometheus metrics, and the scheduler instrumentation that feeds them.

Every app has its own registry (tests start several daemons in one process). Request metrics are
two observations per request and cost microseconds; runner events are counted by watching each
runner's lifecycle from the side, so the scheduler's request path gains nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runnerd.scheduler import Runner, RunnerState, Scheduler
from runnerd.timings import TimingHistograms

# Requests: from sub-millisecond answers to long generations.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Event-loop lag: a healthy loop wakes within a millisecond; anything near 100 ms is felt by every request.
_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_PERIOD = 0.05
_RUNNER = ("backend", "model", "mode")
# Set on a request by the proxy once it knows which registered model serves it.
REQUEST_MODEL = web.RequestKey("model", str)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("runnerd_requests", "HTTP requests answered, by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.request_seconds = TimingHistograms("runnerd_request_duration_seconds",
                                                "Time from request to the handler's return (streams: to their end)",
                                                _REQUEST_BUCKETS)
        self.ttfb_seconds = TimingHistograms("runnerd_time_to_first_byte_seconds",
                                             "Time from request until the response headers were sent", _REQUEST_BUCKETS)
        r.register(self.request_seconds)
        r.register(self.ttfb_seconds)
        self.loads = Counter("runnerd_runner_loads", "Runner starts, by outcome (ready, failed, cancelled)",
                             [*_RUNNER, "outcome"], registry=r)
        self.load_seconds = Histogram("runnerd_runner_load_duration_seconds", "Time from start to ready",
                                      _RUNNER, buckets=_LOAD_BUCKETS, registry=r)
        self.evictions = Counter("runnerd_runner_evictions",
                                 "Loaded runners stopped by runnerd, by reason (idle, unload, memory, drain, shutdown)",
                                 [*_RUNNER, "reason"], registry=r)
        self.crashes = Counter("runnerd_runner_crashes", "Loaded runners whose engine died on its own",
                               [*_RUNNER, "reason"], registry=r)
        self.loop_lag = Histogram("runnerd_event_loop_lag_seconds",
                                  f"How late a timer asked to fire every {LAG_PERIOD:g} s woke: time the event loop "
                                  "spent on something else", buckets=_LAG_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("runnerd_event_loop_lag_max_seconds",
                                  "The largest event-loop lag since the daemon started", registry=r)

        # labels() takes a lock and builds a key each call; the request path looks children up here instead.
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._scheduler: SchedulerCollector | None = None

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        key = (route, model, str(status))
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self.requests.labels(*key)
        counter.inc()
        self.request_seconds.observe(route, model, seconds)

    def observe_first_byte(self, route: str, model: str, seconds: float) -> None:
        self.ttfb_seconds.observe(route, model, seconds)

    def timed_series(self) -> int:
        """How many (route, model) pairs have request histograms: what most of a scrape's size grows with."""
        return max(len(self.request_seconds), len(self.ttfb_seconds))

    def observe_scheduler(self, scheduler: Scheduler) -> None:
        self._scheduler = SchedulerCollector(scheduler)

    def live_families(self) -> list[Metric]:
        """What is read from the scheduler at scrape time: on the event loop, where its state changes.
        The registry's counters and histograms are thread-safe: a scrape collects them in a thread."""
        return list(self._scheduler.collect()) if self._scheduler is not None else []


class LoopLagMonitor:
    """A timer that asks to wake every `period` seconds and records how late it woke: how long the event
    loop was busy with something else (a blocking call, a long computation) while requests waited."""

    def __init__(self, metrics: Metrics, period: float = LAG_PERIOD) -> None:
        self.metrics = metrics
        self.period = period
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            lag = max(0.0, loop.time() - due)
            self.metrics.loop_lag.observe(lag)
            if lag > self.max_lag:
                self.max_lag = lag
                self.metrics.loop_lag_max.set(lag)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event loop lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class SchedulerCollector(Collector):
    """Read at scrape time: the load queue, what the runners hold, and in which state they are."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        runners = self.scheduler.ps()
        yield GaugeMetricFamily("runnerd_queue_depth", "Loads waiting for memory to start",
                                value=self.scheduler.queue_depth)
        reserved = GaugeMetricFamily("runnerd_memory_reserved_bytes",
                                     "Memory runners hold: their estimates and what is measured",
                                     labels=["kind", "source"])
        known = [r.memory for r in runners if r.memory.known]
        reserved.add_metric(["ram", "estimate"], sum(m.ram_bytes for m in known))
        reserved.add_metric(["vram", "estimate"], sum(m.vram_bytes for m in known))
        reserved.add_metric(["ram", "measured"], sum(r.measured_ram_bytes for r in runners))
        reserved.add_metric(["vram", "measured"], sum(r.measured_vram_bytes for r in runners))
        yield reserved
        states = GaugeMetricFamily("runnerd_runners", "Runners by state", labels=["state"])
        for state in RunnerState:
            states.add_metric([state.value], sum(1 for r in runners if r.state is state))
        yield states


class RunnerWatcher:
    """Counts each runner's load, eviction or crash by watching it from start to exit.

    A runner that dies after it was ready without being asked to stop crashed; one that was asked to
    stop was evicted, for the reason the scheduler gave. Nothing here runs on a request's path.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, runner: Runner) -> None:
        runner.spawn(self._watch, runner)

    async def _watch(self, runner: Runner) -> None:
        labels = (runner.key.backend, runner.key.model, runner.key.mode)
        started = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner.wait_loaded()
        if not runner.loaded_ok:
            outcome = "cancelled" if runner.stop_requested else "failed"
            self.metrics.loads.labels(*labels, outcome).inc()
            return
        self.metrics.loads.labels(*labels, "ready").inc()
        self.metrics.load_seconds.labels(*labels).observe(time.monotonic() - started)
        await runner.wait_exited()
        if not runner.stop_requested:
            self.metrics.crashes.labels(*labels, runner.error.reason if runner.error else "exited").inc()
        else:
            self.metrics.evictions.labels(*labels, runner.stop_reason or "unknown").inc()
