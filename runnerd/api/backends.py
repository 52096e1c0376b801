"""Backend management: list backends, install one as a job, uninstall one that no runner uses."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backends.base import Backend, BackendState, ProgressCallback
from runnerd.api.context import Daemon, daemon
from runnerd.api.engines import read_json_body
from runnerd.api.errors import ApiError, parse_body
from runnerd.api.jobs import job_json, stream_job, wants_stream
from runnerd.scheduler import RunnerState

INSTALL = "install-backend"


class InstallBackendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64)


class UninstallBackendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field(min_length=1, max_length=64)


class BackendView(BaseModel):
    name: str
    status: str
    state: BackendState
    installed: bool
    version: str | None = Field(description="the installed engine's own version string")
    installable_version: str | None = Field(description="the version `install-backend` would install")
    capabilities: list[str]
    model_formats: list[str]
    disk_usage: int
    install_job: str | None = Field(description="id of the install job running now, if any")



def _describe(d: Daemon, backend: Backend) -> BackendView:
    """Blocking (status may run the engine's --version, disk usage walks a directory)."""
    status = backend.status()
    job = d.jobs.active(f"{INSTALL}:{backend.name}")
    return BackendView(name=backend.name, status=status.text, state=status.state, installed=status.installed,
                       version=status.version, installable_version=backend.installable_version,
                       capabilities=sorted(backend.capabilities), model_formats=sorted(backend.model_formats),
                       disk_usage=backend.disk_usage(), install_job=job.id if job else None)


async def list_backends(request: web.Request) -> web.Response:
    d = daemon(request)
    views = await asyncio.gather(*(asyncio.to_thread(_describe, d, b) for b in d.backends.values()))
    return web.json_response([v.model_dump(mode="json") for v in views])


def _check_version(backend: Backend, wanted: str | None) -> None:
    available = backend.installable_version
    if wanted is not None and wanted != available:
        offer = f"only version {available}" if available else "no choice of version"
        raise ApiError(400, f"{backend.name} offers {offer}; asked for {wanted}", code="version_not_available",
                       param="version")


async def install_backend(request: web.Request) -> web.StreamResponse:
    """202 and a job that installs the backend; 200 and a finished job when it already is installed.
    Two requests for one backend share the running job."""
    d = daemon(request)
    spec = parse_body(InstallBackendRequest, await read_json_body(request), "install request")
    backend = d.backend(spec.backend)
    _check_version(backend, spec.version)
    key = f"{INSTALL}:{backend.name}"
    job = d.jobs.active(key)
    if job is None:
        status = await asyncio.to_thread(backend.status)
        if status.installed:
            job = d.jobs.finished(INSTALL, backend.name, f"already installed: {status.text}")
        else:
            async def work(progress: ProgressCallback) -> str:
                await backend.install(progress)
                return (await asyncio.to_thread(backend.status)).text

            job, _ = d.jobs.start(INSTALL, backend.name, work, key=key)
    status_code = 200 if job.done else 202
    if wants_stream(request):
        return await stream_job(request, job, status_code)
    return web.json_response(job_json(job), status=status_code, headers={"Location": job.status_url})


async def uninstall_backend(request: web.Request) -> web.Response:
    d = daemon(request)
    spec = parse_body(UninstallBackendRequest, await read_json_body(request), "uninstall request")
    backend = d.backend(spec.backend)
    users = [r for r in d.scheduler.ps() if r.backend == backend.name and r.state is not RunnerState.EXITED]
    if users:
        names = ", ".join(sorted({f"{r.model} ({r.mode})" for r in users}))
        raise ApiError(409, f"{backend.name} is in use by {len(users)} runner(s): {names}; unload them first",
                       code="backend_in_use")
    if (job := d.jobs.active(f"{INSTALL}:{backend.name}")) is not None:
        raise ApiError(409, f"{backend.name} is being installed (job {job.id}); cancel that job first",
                       code="backend_installing")
    await backend.uninstall()
    status = await asyncio.to_thread(backend.status)
    return web.json_response({"backend": backend.name, "status": status.text})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/engines/backends", list_backends)
    app.router.add_post("/engines/install-backend", install_backend)
    app.router.add_post("/engines/uninstall-backend", uninstall_backend)
