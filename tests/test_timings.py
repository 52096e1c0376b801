"""runnerd.timings.TimingHistograms exposes what a prometheus_client Histogram with the same labels and buckets
exposes after the same observations: sample for sample, and byte for byte in both writers of the text
format. Observations are drawn on the bucket bounds too, where "less than or equal" decides the bucket."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from runnerd.prometheus_text import text_exposition
from runnerd.timings import TimingHistograms

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SECONDS = st.sampled_from([0.0, *_BUCKETS, 301.0]) | st.floats(0, 1000, allow_nan=False) \
    | st.floats(0, 1e-3, allow_nan=False)
_LABEL = st.sampled_from(["/v1/chat/completions", "/metrics", "unmatched", "tiny:latest", ""]) \
    | st.text(max_size=6)  # quotes, backslashes and newlines included: the writers escape them
_OBSERVATIONS = st.lists(st.tuples(_LABEL, _LABEL, _SECONDS), max_size=40)


def _pair(observations: list[tuple[str, str, float]]) -> tuple[CollectorRegistry, CollectorRegistry]:
    ours, library = CollectorRegistry(), CollectorRegistry()
    timings = TimingHistograms("runnerd_request_duration_seconds", "Time to \"answer\"\\n", _BUCKETS)
    ours.register(timings)
    histogram = Histogram("runnerd_request_duration_seconds", "Time to \"answer\"\\n", ["route", "model"],
                          buckets=_BUCKETS, registry=library)
    for route, model, seconds in observations:
        timings.observe(route, model, seconds)
        histogram.labels(route, model).observe(seconds)
    return ours, library


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")]


@settings(max_examples=200, deadline=None)
@given(_OBSERVATIONS)
def test_samples_are_a_prometheus_histograms(observations: list[tuple[str, str, float]]) -> None:
    ours, library = _pair(observations)
    assert _samples(ours) == _samples(library)
    created = [s.labels for f in ours.collect() for s in f.samples if s.name.endswith("_created")]
    assert created == [s.labels for f in library.collect() for s in f.samples if s.name.endswith("_created")]


def _without_created(text: bytes) -> list[bytes]:
    return [line for line in text.split(b"\n") if b"_created{" not in line]


@settings(max_examples=100, deadline=None)
@given(_OBSERVATIONS)
def test_the_text_formats_are_the_libraries(observations: list[tuple[str, str, float]]) -> None:
    ours, library = _pair(observations)
    assert text_exposition(ours.collect()) == generate_latest(ours)
    assert _without_created(text_exposition(ours.collect())) == _without_created(generate_latest(library))
    assert _without_created(openmetrics_latest(ours)) == _without_created(openmetrics_latest(library))


def test_counts_copied_at_the_scrape_do_not_change_with_later_observations() -> None:
    timings = TimingHistograms("t", "t", (1.0,))
    timings.observe("/r", "m", 0.5)
    (family,) = timings.collect()
    timings.observe("/r", "m", 0.5)
    assert [s.value for s in family.samples if s.name == "t_count"] == [1.0]
    assert len(timings) == 1
