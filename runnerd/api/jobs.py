"""Jobs over HTTP: GET /jobs, GET /jobs/{id} (JSON, or NDJSON updates with ?follow=true), DELETE /jobs/{id}."""

from __future__ import annotations

from aiohttp import web

from runnerd.api.context import DAEMON, daemon
from runnerd.api.errors import ApiError
from runnerd.jobs import Job, JobNotFound, JobState

NDJSON = "application/x-ndjson"


def job_json(job: Job) -> dict[str, object]:
    return job.model_dump(mode="json")


def _job(request: web.Request) -> Job:
    job_id = request.match_info["id"]
    try:
        return daemon(request).jobs.get(job_id)
    except JobNotFound:
        raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)",
                       code="job_not_found") from None


def wants_stream(request: web.Request) -> bool:
    return request.query.get("follow", "").lower() in ("1", "true", "yes") or request.headers.get(
        "Accept", "").startswith(NDJSON)


async def stream_job(request: web.Request, job: Job, status: int = 200) -> web.StreamResponse:
    """One JSON object per line: the job now, then after every change, until it has ended."""
    response = web.StreamResponse(status=status, headers={"Content-Type": NDJSON, "Location": job.status_url})
    await response.prepare(request)
    try:
        async for snapshot in daemon(request).jobs.watch(job.id):
            await response.write(snapshot.model_dump_json().encode() + b"\n")
    except JobNotFound:
        pass  # forgotten while we watched: the stream simply ends
    await response.write_eof()
    return response


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response([job_json(j) for j in daemon(request).jobs.list()])


async def get_job(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    if wants_stream(request):
        return await stream_job(request, job)
    return web.json_response(job_json(job))


async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    if job.done and job.state is not JobState.CANCELLED:
        raise ApiError(409, f"job {job.id} has already {job.state}", code="job_finished")
    return web.json_response(job_json(await daemon(request).jobs.cancel(job.id)))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{id}", get_job)
    app.router.add_delete("/jobs/{id}", cancel_job)

    async def stop_jobs(app: web.Application) -> None:
        await app[DAEMON].jobs.shutdown()

    # on_shutdown runs before in-flight requests are awaited: followers of a job end with it.
    app.on_shutdown.append(stop_jobs)
