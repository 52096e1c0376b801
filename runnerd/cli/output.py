"""How the CLI prints results: JSON, aligned tables, short sizes and durations."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def duration(seconds: float) -> str:
    """12s, 4m05s, 3h07m, 2d04h: two units at most, so a table column stays narrow."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age(ts: float | None) -> str:
    return "-" if ts is None else duration(time.time() - ts)


def short_size(n: int | None) -> str:
    """Bytes the way `free -h` writes them (binary units), 4-5 characters wide."""
    if n is None:
        return "-"
    for unit, scale in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B" if n else "0"


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class ProgressView:
    """A long operation's progress: a tqdm bar on a terminal; elsewhere (a CI log, a pipe) one plain
    line on stderr each time its phase changes (`line_prefix` + the phase), as a log reads.
    `enabled=False` shows nothing."""

    def __init__(self, desc: str, *, enabled: bool = True, percent: bool = False, line_prefix: str = "",
                 **bar_options: Any) -> None:
        self.enabled = enabled
        self.line_prefix = line_prefix
        self._phase: str | None = None
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=100 if percent else None, desc=desc, **bar_options)

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, phase: str, completed: float | None = None, total: float | None = None) -> None:
        if self._bar is not None:
            self._bar.set_description(phase)
            if total is not None:
                self._bar.total = total
            if completed is not None:
                self._bar.n = completed
            self._bar.refresh()
        elif self.enabled and phase != self._phase:
            print(f"{self.line_prefix}{phase}", file=sys.stderr, flush=True)
        self._phase = phase
