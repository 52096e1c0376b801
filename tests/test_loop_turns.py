"""Turns of the event loop: a burst of tasks that wake together is served over several turns, so that what
the loop scheduled meanwhile (a socket's read, a timer) runs between them; a lone task never waits; no
task waits more than MAX_WAITS turns."""

from __future__ import annotations

import asyncio
import time

import pytest

from runnerd.loop_turns import Turns

pytestmark = pytest.mark.anyio


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _burst(turns: Turns | None, tasks: int, work: float) -> tuple[int, int]:
    """(tasks done before a callback scheduled just after the burst ran, tasks done in all)"""
    done = 0
    seen: list[int] = []

    async def request() -> None:
        nonlocal done
        if turns is not None and turns.spent():
            await turns.take()
        _busy(work)
        done += 1

    running = [asyncio.create_task(request()) for _ in range(tasks)]
    asyncio.get_running_loop().call_soon(lambda: seen.append(done))
    await asyncio.gather(*running)
    return seen[0], done


async def test_without_turns_a_burst_runs_whole_before_anything_else() -> None:
    before, done = await _burst(None, 40, 0.0005)
    assert (before, done) == (40, 40)


async def test_a_burst_is_served_over_several_turns() -> None:
    turns = Turns(budget=0.002)
    before, done = await _burst(turns, 40, 0.0005)
    assert done == 40
    assert before <= 20  # about 5 fit in a 2 ms turn
    assert turns.waits > 0


async def test_a_lone_task_never_waits() -> None:
    turns = Turns(budget=0.002)
    for _ in range(20):
        assert not turns.spent()
        _busy(0.003)  # longer than the budget: the next take is in a later turn all the same
        await asyncio.sleep(0)
    assert turns.waits == 0


async def test_no_task_waits_more_than_max_waits_turns(monkeypatch) -> None:
    turns = Turns(budget=0.002, max_waits=3)
    monkeypatch.setattr(turns, "_next_turn", lambda turn: None)  # as if every turn's budget were spent at once
    assert not turns.spent()
    _busy(0.003)
    assert turns.spent()
    await turns.take()
    assert turns.waits == 3
