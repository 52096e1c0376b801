"""runnerd.prometheus_text writes the Prometheus text format byte for byte as prometheus_client's
generate_latest does: for the daemon's own registry and for generated families (any type, names that need
escaping, label values with quotes, backslashes and newlines, timestamps, special floats)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from runnerd.metrics import Metrics
from runnerd.prometheus_text import text_exposition

_TYPES = ["counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "unknown"]
_NAMES = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,12}", fullmatch=True) | st.text(min_size=1, max_size=8)
_LABEL_NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(lambda n: not n.startswith("__")) \
    | st.text(min_size=1, max_size=6)
_VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20).map(float)

class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

def _library(families: list[Metric]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Fixed(families))  # type: ignore[arg-type]
    return generate_latest(registry)

@st.composite
def _families(draw: st.DrawFn) -> list[Metric]:
    families = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_NAMES)
        family = Metric(name, draw(st.text(max_size=20)), draw(st.sampled_from(_TYPES)))
        for _ in range(draw(st.integers(0, 5))):
            suffix = draw(st.sampled_from(["", "_total", "_bucket", "_created", "_gsum", "_gcount", "_sum", "_info"]))
            labels = draw(st.dictionaries(_LABEL_NAMES, st.text(max_size=10), max_size=3))
            timestamp = draw(st.none() | st.floats(0, 2e9))
            family.add_sample(name + suffix, labels, draw(_VALUES), timestamp)
        families.append(family)
    return families

@settings(max_examples=400, deadline=None)
@given(_families())
@example([Metric("a", 'line\\one\nline "two"', "counter")])
def test_generated_families_are_written_as_the_library_writes_them(families: list[Metric]) -> None:
    assert text_exposition(families) == _library(families)

def test_the_daemons_registry_is_written_as_the_library_writes_it() -> None:
    metrics = Metrics()
    for i in range(40):
        metrics.observe_request("/v1/chat/completions", "tiny", 200, i / 100)
        metrics.observe_request("/engines/ps", "", 200 if i % 3 else 503, i / 1000)
        metrics.observe_first_byte("/v1/chat/completions", "tiny", i / 1000)
        metrics.loop_lag.observe(i / 10_000)
    families = list(metrics.registry.collect())
    written = text_exposition(families)
    assert written == generate_latest(metrics.registry)
    parsed = {f.name: f for f in text_string_to_metric_families(written.decode())}
    count = next(s for s in parsed["runnerd_requests"].samples if s.labels.get("route") == "/engines/ps"
                 and s.labels["status"] == "503")
    assert count.value == 14  # i = 0, 3, ..., 39
