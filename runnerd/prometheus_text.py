"""The Prometheus text format (0.0.4) of a scrape, byte for byte as prometheus_client's `generate_latest`
writes it, in a fraction of its time.

`generate_latest` validates and escapes every label name of every sample and builds each line through
several layers of calls: about 4 µs a line, 1-2 ms for the daemon's few hundred lines, on every scrape,
holding the GIL that the event loop needs. The names are few and repeat on every line, so each is
escaped once and remembered; a label value is escaped only when it holds a character that needs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name
from prometheus_client.utils import floatToGoString

# OpenMetrics samples that the text format writes as gauge families of their own, after their family.
_SEPARATE_SUFFIXES = ("_created", "_gsum", "_gcount")
# The text format's name and type for each OpenMetrics type that it writes differently.
_TEXT_TYPES = {"counter": ("_total", "counter"), "info": ("_info", "gauge"), "stateset": ("", "gauge"),
               "gaugehistogram": ("", "histogram"), "unknown": ("", "untyped")}


@lru_cache(maxsize=4096)
def _metric_name(name: str) -> str:
    return escape_metric_name(name, UNDERSCORES)


@lru_cache(maxsize=4096)
def _label_name(name: str) -> str:
    return escape_label_name(name, UNDERSCORES)


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _help(name: str, documentation: str) -> str:
    escaped = documentation.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {escaped}\n"


def _pairs(labels: dict[str, str]) -> str:
    return ",".join([f'{_label_name(k)}="{_label_value(v)}"' for k, v in sorted(labels.items())])


class RenderedLabels(dict[str, str]):
    """A sample's labels that keep their text-format rendering, for labels that recur on every scrape:
    written without sorting and escaping them again. Not to be changed once made."""

    __slots__ = ("text",)

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__(labels)
        self.text = _pairs(labels)


def _line(name: str, labels: dict[str, str], value: float, timestamp: object) -> str:
    head = _metric_name(name)
    if labels:
        pairs = labels.text if type(labels) is RenderedLabels else _pairs(labels)
        head = f"{head}{{{pairs}}}"
    stamp = "" if timestamp is None else f" {int(float(timestamp) * 1000):d}"  # type: ignore[arg-type]
    return f"{head} {floatToGoString(value)}{stamp}\n"  # type: ignore[no-untyped-call]


def text_exposition(families: Iterable[Metric]) -> bytes:
    """The families in the Prometheus text format, as `generate_latest` would write them."""
    out: list[str] = []
    for family in families:
        suffix, text_type = _TEXT_TYPES.get(family.type, ("", family.type))
        name = _metric_name(family.name + suffix)
        out.append(_help(name, family.documentation))
        out.append(f"# TYPE {name} {text_type}\n")
        separate = {family.name + s: s for s in _SEPARATE_SUFFIXES}
        held: dict[str, list[str]] = {}
        for sample in family.samples:
            line = _line(sample.name, sample.labels, sample.value, sample.timestamp)
            kind = separate.get(sample.name)
            if kind is None:
                out.append(line)
            else:
                held.setdefault(kind, []).append(line)
        for kind, lines in sorted(held.items()):
            name = _metric_name(family.name + kind)
            out.append(_help(name, family.documentation))
            out.append(f"# TYPE {name} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")
