"""Per-token limits: requests in flight at once and requests per minute.

Kept in memory by token name, so a reload that changes a token's limits applies them at once, and the
counts of a token survive the reload. A request over a limit is refused before its handler runs, with
how long to wait: for the minute window, until its oldest request leaves it; for concurrency, one second
(when a request in flight ends cannot be known).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from runnerd.tokens import Grant

WINDOW = 60.0


@dataclass(frozen=True)
class LimitHit(Exception):
    limit: str  # "max_concurrent" or "requests_per_minute"
    value: int
    retry_after: int  # whole seconds, at least 1

    def message(self, token: str) -> str:
        what = ("requests in flight at once" if self.limit == "max_concurrent" else "requests per minute")
        return (f"token {token!r} is over its limit of {self.value} {what}; retry after {self.retry_after} s")


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}

    def enter(self, grant: Grant) -> Callable[[], None]:
        """Count one request of `grant`'s; LimitHit if that would break a limit (nothing counted then).
        The returned function ends the request; call it once."""
        now = self._clock()
        in_flight = self._in_flight.get(grant.name, 0)
        if grant.max_concurrent is not None and in_flight >= grant.max_concurrent:
            raise LimitHit("max_concurrent", grant.max_concurrent, 1)
        recent = self._recent.setdefault(grant.name, deque())
        while recent and recent[0] <= now - WINDOW:
            recent.popleft()
        if grant.requests_per_minute is not None:
            if len(recent) >= grant.requests_per_minute:
                wait = recent[len(recent) - grant.requests_per_minute] + WINDOW - now
                raise LimitHit("requests_per_minute", grant.requests_per_minute, max(1, math.ceil(wait)))
            recent.append(now)
        elif recent:
            recent.clear()
        self._in_flight[grant.name] = in_flight + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._in_flight.get(grant.name, 1) - 1
            if left > 0:
                self._in_flight[grant.name] = left
            else:
                self._in_flight.pop(grant.name, None)

        return release

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)
