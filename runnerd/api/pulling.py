"""A store pull run for one HTTP request (POST /models/create, Ollama's POST /api/pull).

The pull runs as a task; its progress reports arrive one by one (`next_report`), so each route writes
them in its own line shapes, and can wait for the first report before starting its response (a pull
refused up front is then a plain error with its status). The pull belongs to the request: when the
request ends first (the client hung up), the pull is cancelled (its part files stay, so the next pull
resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._events: asyncio.Queue[PullProgress] = asyncio.Queue()
        self.task: asyncio.Task[ModelEntry]

    async def __aenter__(self) -> RequestPull:
        loop = asyncio.get_running_loop()

        def progress(p: PullProgress) -> None:
            # Local imports report from a worker thread: hand every report to the loop.
            loop.call_soon_threadsafe(self._events.put_nowait, p)

        self.task = asyncio.create_task(self._start(progress), name=self._name)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self.task.done():  # the client went away before the end: stop pulling for it
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def next_report(self) -> PullProgress | None:
        """The next progress report, or None once the pull is over."""
        getter = asyncio.ensure_future(self._events.get())
        try:
            await asyncio.wait({self.task, getter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reported = getter.done()
            if not reported:
                getter.cancel()
        return getter.result() if reported else None
