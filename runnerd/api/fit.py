"""Before a configuration is stored: would a runner started with it start, and could it ever fit?

A stored configuration outlives the request that set it and every restart, so one the engine cannot
run, or one whose estimate exceeds what runners may ever hold (the scheduler answers 507 for it on
every request), must be refused with the request that brings it: a 400 for that request, and the
stored configuration stays as it was. The fit is the scheduler's own check (its memory budget's
capacity against the backend's estimate), asked here before anything is written.
"""

from __future__ import annotations

import asyncio

from backends.base import Backend, BackendConfiguration, Mode
from runnerd.admission import needed
from runnerd.api.context import Daemon
from runnerd.api.errors import ApiError
from runnerd.store import ModelEntry


async def refuse_unfit(d: Daemon, backend: Backend, model: ModelEntry, mode: Mode, config: BackendConfiguration,
                       *, param: str) -> None:
    """ApiError 400 naming `param` when `config` (the effective configuration to be stored) would make the
    engine fail, or could never fit this host whatever else is unloaded."""
    problem = await asyncio.to_thread(backend.configuration_problem, model.ref(), mode, config)  # stats builds
    if problem is not None:
        raise ApiError(400, f"{model.name} on {backend.name}: {problem}", code="configuration_refused", param=param)
    estimate = await asyncio.to_thread(backend.required_memory, model.ref(), mode, config)
    need = needed(estimate)
    await d.scheduler.sampler.current()  # the host's totals, as admission reads them
    budget = d.scheduler.budget
    if not need.fits_in(budget.capacity()):
        size = f"context size {config.context_size}" if config.context_size is not None else "this configuration"
        raise ApiError(400, f"{model.name} with {size} can never fit on this host: it "
                            f"{budget.explain_capacity(need)}; nothing was stored", code="does_not_fit", param=param)
