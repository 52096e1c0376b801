"""Bursts of request work spread over turns of the event loop.

When hundreds of requests start in the same instant (clients that send together) or end in it (streams that
finish on the same engine step), their tasks all wake in one turn of the event loop, and that turn runs
every one of them, for tens of milliseconds, before the loop reads a socket or fires a timer again: every
other stream's events wait. A task at such a point goes on at once while the current turn has spent less
than its budget on such tasks (`Turns.spent()`), and otherwise waits (`Turns.take()`) for a later turn, after
the loop has read its sockets and run its timers. Outside bursts this costs a clock read.

A task waits at most `MAX_WAITS` turns: under a load that fills every turn's budget, new arrivals (which
may run ahead of it in a turn) cannot hold it back for long.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

# How long one turn of the loop may spend on tasks that take turns before the rest wait for the next.
TURN_BUDGET = 0.002
MAX_WAITS = 32


class Turns:
    def __init__(self, budget: float = TURN_BUDGET, max_waits: int = MAX_WAITS) -> None:
        self.budget = budget
        self.max_waits = max_waits
        self.waits = 0  # turns waited in all, for the tests and for anyone curious
        self._started: float | None = None
        self._turn = 0  # counts turns in which some task took a turn

    def spent(self) -> bool:
        """Whether this turn of the loop has spent its budget (the first to ask in a turn starts it): if so,
        `take()` waits for a turn that has not."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
            # In case nobody waits: the next turn starts with a whole budget all the same.
            asyncio.get_running_loop().call_soon(self._next_turn, self._turn)
            return False
        return now - self._started > self.budget

    async def take(self) -> None:
        """Wait for a later turn of the loop with budget left (at most MAX_WAITS turns)."""
        for _ in range(self.max_waits):
            turn = self._turn
            self.waits += 1
            await asyncio.sleep(0)
            self._next_turn(turn)  # the first to wake in a later turn starts that turn's budget
            if not self.spent():
                return

    def _next_turn(self, turn: int) -> None:
        if self._turn == turn:
            self._turn += 1
            self._started = None


TURNS = web.AppKey("turns", Turns)
