"""Request-duration histograms by route and model, kept as plain counts.

Every request observes two of them. prometheus_client's Histogram takes a lock per bucket and per sum
on each observation, and on each scrape builds every sample again (a label dict, a formatted bucket
bound, a lock per value). Here an observation is a bisect and two additions on the event loop that owns
the counts, and a scrape copies each series' counts and pairs them with labels made once per series.
The samples, their names, labels and order are those of a prometheus_client Histogram with the same
labels and buckets, so the exposition is unchanged.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from runnerd.prometheus_text import RenderedLabels

# prometheus_client's switch for the `_created` series, read the way it reads it.
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class _Series:
    __slots__ = ("bucket_labels", "counts", "created", "labels", "total")

    def __init__(self, labels: RenderedLabels, bucket_labels: list[RenderedLabels]) -> None:
        self.counts = [0] * len(bucket_labels)
        self.total = 0.0
        self.created = time.time()
        self.labels = labels
        self.bucket_labels = bucket_labels


class TimingHistograms(Collector):
    """One histogram family with the labels `route` and `model`."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = (*sorted(float(b) for b in buckets), float("inf"))
        self._le = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, str], _Series] = {}

    def __len__(self) -> int:
        return len(self._series)

    def observe(self, route: str, model: str, seconds: float) -> None:
        series = self._series.get((route, model))
        if series is None:
            series = self._series[(route, model)] = self._new(route, model)
        series.counts[bisect.bisect_left(self.bounds, seconds)] += 1  # a bucket counts values <= its bound
        series.total += seconds

    def _new(self, route: str, model: str) -> _Series:
        labels = {"route": route, "model": model}
        return _Series(RenderedLabels(labels), [RenderedLabels({**labels, "le": le}) for le in self._le])

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.documentation, "histogram")

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        bucket, count, total, created = (self.name + s for s in ("_bucket", "_count", "_sum", "_created"))
        samples = metric.samples
        for series in list(self._series.values()):  # a scrape in a thread sees the series of one moment
            counts = series.counts[:]
            cumulative = 0.0
            for labels, n in zip(series.bucket_labels, counts, strict=True):
                cumulative += n
                samples.append(Sample(bucket, labels, cumulative, None, None))
            samples.append(Sample(count, series.labels, cumulative, None, None))
            samples.append(Sample(total, series.labels, series.total, None, None))
            if _CREATED:
                samples.append(Sample(created, series.labels, series.created, None, None))
        yield metric
