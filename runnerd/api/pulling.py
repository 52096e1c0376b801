"""A store pull run for one HTTP request (POST /models/create, Ollama's POST /api/pull).

The pull runs as a task; its progress reports arrive one by one (`next_report`), so each route writes
them in its own line shapes, and can wait for the first report before starting its response (a pull
refused up front is then a plain error with its status). The pull belongs to the request: when the
request ends first (the client hung up), the pull is cancelled and awaited to its end before the
request ends (its part files stay, so the next pull resumes): no task of the pull outlives it, and
waiting for reports creates none (the pull's end is put in the report queue).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from runnerd.store import ModelEntry, PullProgress, PullProgressCallback

StartPull = Callable[[PullProgressCallback], Coroutine[Any, Any, ModelEntry]]


class RequestPull:
    """`async with RequestPull(lambda progress: store.pull(..., progress)) as pulling:` starts the pull;
    `pulling.task` is its task, whose result (or StoreError) is the pull's once `next_report` said None."""

    def __init__(self, start: StartPull, name: str | None = None) -> None:
        self._start = start
        self._name = name
        self._events: asyncio.Queue[PullProgress | None] = asyncio.Queue()
        self.task: asyncio.Task[ModelEntry]
        self._over = False

    async def __aenter__(self) -> RequestPull:
        loop = asyncio.get_running_loop()

        def progress(p: PullProgress) -> None:
            # Local imports report from a worker thread: hand every report to the loop.
            loop.call_soon_threadsafe(self._events.put_nowait, p)

        self.task = asyncio.create_task(self._start(progress), name=self._name)
        # Reports a worker thread handed to the loop are queued before this: they come first.
        self.task.add_done_callback(lambda _: loop.call_soon_threadsafe(self._events.put_nowait, None))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self.task.done():  # the client went away before the end: stop pulling for it
            self.task.cancel()
            # Wait for it without swallowing a cancellation of the request itself.
            await asyncio.wait({self.task})
        if not self.task.cancelled():
            self.task.exception()  # seen here, so never reported as "exception was never retrieved"

    async def next_report(self) -> PullProgress | None:
        """The next progress report, or None once the pull is over."""
        if self._over:
            return None
        report = await self._events.get()
        self._over = report is None
        return report
