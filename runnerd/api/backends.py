"""Backend management: list backends, install one as a job, uninstall one that no runner uses, define
an engine by a manifest and delete one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendState,
    InstallError,
    Mode,
    Progress,
    ProgressCallback,
)
from backends.catalog import Catalog, CatalogError, PipPlan, SourceBuild, Variant, host_variants, shipped_catalog
from backends.manifest import ManifestBackend, ManifestError
from backends.manifest.source import MAX_MANIFEST_BYTES
from runnerd.api import scopes
from runnerd.api.body import read_json_body
from runnerd.api.context import Daemon, daemon, over_unix_socket
from runnerd.api.errors import ApiError, parse_body
from runnerd.api.jobs import job_json, stream_job, wants_stream
from runnerd.catalog import (
    env_users,
    host_items,
    is_installed,
    load_catalog,
    pick,
    pip_env_python,
    remove_pip_env,
    upgrades,
)
from runnerd.catalog import install as catalog_install
from runnerd.catalog_feed import CATALOG_FEED
from runnerd.engines import BUILTIN, ManifestConflict, as_host_gpus, define_engine, engine_context, forget_engine
from runnerd.jobs import Job, JobWork
from runnerd.scheduler import RunnerKey, StartGuard

INSTALL = "install-backend"
UNINSTALL = "uninstall-backend"


class InstallBackendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64)


class UninstallBackendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64,
                                description="remove this installed version only (an engine that keeps several)")
    force: bool = Field(default=False, description="with version: stop the runners using it first")


@runtime_checkable
class VersionedBackend(Protocol):
    """An engine that keeps several versions installed side by side (one of the built-ins does)."""

    def installed_versions(self) -> list[str]: ...
    def version_problem(self, version: str) -> str | None: ...
    async def install_version(self, version: str, progress: ProgressCallback | None = None) -> None: ...
    async def uninstall_version(self, version: str) -> None: ...
    def pins_version(self, config: BackendConfiguration, version: str) -> bool: ...
    def runners_on(self, version: str) -> list[tuple[str, Mode]]: ...


@runtime_checkable
class NamedBuild(Protocol):
    """An engine that may run a binary the operator named in the settings instead of one it installed."""

    def named_build(self) -> tuple[Path, str] | None: ...


class NamedBinary(BaseModel):
    path: str
    version: str = Field(description="the binary's own `--version`")


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
    versions: list[str] = Field(description="the versions installed now (a manifest's: those whose executable is "
                                            "there), and last the named binary's version, if one is named")
    named_binary: NamedBinary | None = Field(
        default=None, description="the binary named in the settings, which serves unpinned models (it is listed "
                                  "in `versions` by its own `--version`; no configuration pins it, nothing removes "
                                  "it)")
    defined_by: Literal["built-in", "plug-in", "manifest"]



def _describe(d: Daemon, backend: Backend) -> BackendView:
    """Blocking (status may run the engine's --version, disk usage walks a directory)."""
    status = backend.status()
    job = d.jobs.active(f"{INSTALL}:{backend.name}")
    named = _named_binary(backend)
    versions = backend.installed_versions()
    return BackendView(name=backend.name, status=status.text, state=status.state, installed=status.installed,
                       version=status.version, installable_version=backend.installable_version,
                       capabilities=sorted(backend.capabilities), model_formats=sorted(backend.model_formats),
                       disk_usage=backend.disk_usage(), install_job=job.id if job else None,
                       versions=versions + ([named.version] if named is not None else []), named_binary=named,
                       defined_by=_defined_by(backend))


def _named_binary(backend: Backend) -> NamedBinary | None:
    """Blocking (it may run the binary's --version once)."""
    found = backend.named_build() if isinstance(backend, NamedBuild) else None
    return None if found is None else NamedBinary(path=str(found[0]), version=found[1])


def _defined_by(backend: Backend) -> Literal["built-in", "plug-in", "manifest"]:
    if isinstance(backend, ManifestBackend):
        return "manifest"
    return "built-in" if backend.name in BUILTIN else "plug-in"


async def list_backends(request: web.Request) -> web.Response:
    d = daemon(request)
    views = await asyncio.gather(*(asyncio.to_thread(_describe, d, b) for b in d.backends.values()))
    return web.json_response([v.model_dump(mode="json") for v in views])


def _check_version(backend: Backend, wanted: str | None) -> None:
    available = backend.installable_version
    if wanted is not None and wanted != available and not isinstance(backend, VersionedBackend):
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
    # The default version is the default install, and shares its job.
    if spec.version not in (None, backend.installable_version) and isinstance(backend, VersionedBackend):
        if (problem := backend.version_problem(spec.version)) is not None:
            raise ApiError(400, problem, code="version_not_available", param="version")
        job = await _install_version(d, backend, spec.version)
    else:
        job = await _install_default(d, backend)
    status_code = 200 if job.done else 202
    if wants_stream(request):
        return await stream_job(request, job, status_code)
    return web.json_response(job_json(job), status=status_code, headers={"Location": job.status_url})


async def _install_version(d: Daemon, backend: VersionedBackend, version: str) -> Job:
    """One job per (engine, version); the versions already built stay as they are."""
    name = getattr(backend, "name", "")
    target = f"{name}@{version}"
    key = f"{INSTALL}:{target}"
    job = d.jobs.active(key)
    if job is not None:
        return job
    if version in await asyncio.to_thread(backend.installed_versions):
        return d.jobs.finished(INSTALL, target, f"already installed: {target}")

    async def work(progress: ProgressCallback) -> str:
        try:
            await backend.install_version(version, progress)
        except InstallError as exc:
            raise InstallError(f"{target}: {exc}") from exc
        return f"installed {target}"

    job, _ = d.jobs.start(INSTALL, target, work, key=key)
    return job


async def _install_default(d: Daemon, backend: Backend) -> Job:
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
    return job


async def uninstall_backend(request: web.Request) -> web.Response:
    d = daemon(request)
    spec = parse_body(UninstallBackendRequest, await read_json_body(request), "uninstall request")
    backend = d.backend(spec.backend)
    if spec.version is not None:
        return await _uninstall_version(d, backend, spec.version, spec.force)
    # No runner starts on it between the check of its users and the removal: one either started before
    # (and the check names it) or is refused (503 naming the removal).
    with d.scheduler.refusing_starts(_runs_on(backend.name), f"{backend.name} is being uninstalled"):
        users = d.scheduler.live(_runs_on(backend.name))
        if users:
            names = ", ".join(f"{k.model} ({k.mode})" for k in users)
            raise ApiError(409, f"{backend.name} is in use by {len(users)} runner(s): {names}; unload them first",
                           code="backend_in_use")
        if (job := d.jobs.active(f"{INSTALL}:{backend.name}")) is not None:
            raise ApiError(409, f"{backend.name} is being installed (job {job.id}); cancel that job first",
                           code="backend_installing")
        await backend.uninstall()
    status = await asyncio.to_thread(backend.status)
    return web.json_response({"backend": backend.name, "status": status.text})


class InUse(Exception):
    """What a removal would take from under its users; the request answers 409, a job fails with it."""


async def _removable_version(d: Daemon, backend: Backend, version: str) -> VersionedBackend:
    """The engine, when `version` is installed and not being installed now (400 / 404 / 409 otherwise)."""
    if not isinstance(backend, VersionedBackend):
        raise ApiError(400, f"{backend.name} keeps a single version: uninstall it without one", code="unversioned",
                       param="version")
    installed = await asyncio.to_thread(backend.installed_versions)
    named = await asyncio.to_thread(_named_binary, backend)
    if version not in installed and named is not None and version == named.version:
        raise ApiError(400, f"{backend.name} {version} is the binary named in the settings ({named.path}): runnerd "
                            "did not install it and does not remove it", code="not_installed_by_runnerd",
                       param="version")
    if version not in installed:
        raise ApiError(404, f"{backend.name} {version} is not installed (installed: {', '.join(installed) or 'none'})",
                       code="version_not_installed", param="version")
    if (job := d.jobs.active(f"{INSTALL}:{backend.name}@{version}")) is not None:
        raise ApiError(409, f"{backend.name} {version} is being installed (job {job.id}); cancel that job first",
                       code="backend_installing")
    return backend


def _runs_on(name: str) -> StartGuard:
    """Whether a runner (key and configuration) runs on the engine `name`, whatever its version."""
    return lambda key, _: key.backend == name


def _runs_version(backend: VersionedBackend, name: str, version: str) -> StartGuard:
    """Whether a runner (key and configuration) runs `version` of the engine `name`."""
    return lambda key, config: key.backend == name and backend.pins_version(config, version)


def _running_version(d: Daemon, backend: VersionedBackend, name: str, version: str) -> list[RunnerKey]:
    """The runners on `version`: those the scheduler has whose configuration runs it (one still loading too),
    and those the engine saw start from its build."""
    keys = {*d.scheduler.live(_runs_version(backend, name, version)),
            *(RunnerKey(name, model, mode) for model, mode in backend.runners_on(version))}
    return sorted(keys, key=lambda k: (k.model, k.mode))


async def _version_users(d: Daemon, backend: VersionedBackend, name: str, version: str, force: bool) -> \
        tuple[list[str], list[RunnerKey]]:
    """The models whose stored configuration pins `version` and the runners running it; InUse naming them
    unless `force`."""
    configured = sorted({f"{c.model} ({c.mode})" for c in await asyncio.to_thread(d.configs.list)
                         if c.backend == name and backend.pins_version(c.config, version)})
    running = _running_version(d, backend, name, version)
    if (configured or running) and not force:
        parts = ([f"pinned by {', '.join(configured)}"] if configured else []) + \
                ([f"running {', '.join(f'{k.model} ({k.mode})' for k in running)}"] if running else [])
        raise InUse(f"{name} {version} is in use: {'; '.join(parts)}; re-pin or unload them, or uninstall with "
                    "force")
    return configured, running


@contextlib.contextmanager
def _removing_version(d: Daemon, backend: VersionedBackend, name: str, version: str) -> Iterator[None]:
    """No runner starts on `version` while the block checks its users and removes it (503 naming the
    removal): the check sees every runner that could hold it."""
    with d.scheduler.refusing_starts(_runs_version(backend, name, version),
                                     f"{name} {version} is being removed"):
        yield


async def _uninstall_version(d: Daemon, backend: Backend, version: str, force: bool) -> web.Response:
    """Remove one installed version: 409 naming the models whose stored configuration pins it or whose
    runner runs it, unless forced (then the runners on that version, and only those, are stopped first;
    the configurations stay, and their runners fail to start until the version is installed again)."""
    versioned = await _removable_version(d, backend, version)
    with _removing_version(d, versioned, backend.name, version):
        try:
            configured, running = await _version_users(d, versioned, backend.name, version, force)
        except InUse as exc:
            raise ApiError(409, str(exc), code="version_in_use") from exc
        stopped = await d.scheduler.unload(keys=running, reason="version uninstalled") if running else []
        await versioned.uninstall_version(version)
    return web.json_response({"backend": backend.name, "version": version, "unloaded": len(stopped),
                              "configured": configured,
                              "versions": await asyncio.to_thread(versioned.installed_versions)})


# --- engines defined by a manifest ----------------------------------------------------------------

MANIFEST_TYPES: dict[str, Literal["yaml", "toml"]] = {
    "application/yaml": "yaml", "application/x-yaml": "yaml", "text/yaml": "yaml", "text/x-yaml": "yaml",
    "application/toml": "toml", "text/toml": "toml",
}


class DefineEngineRequest(BaseModel):
    """`POST /engines/backends` as JSON; the manifest can also be the body itself (Content-Type
    application/yaml or application/toml)."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(min_length=1, max_length=MAX_MANIFEST_BYTES)
    format: Literal["yaml", "toml"] = "yaml"


def _peer_uid(request: web.Request) -> int | None:
    """The user id of the process at the other end of the unix socket (SO_PEERCRED), if the OS says."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return int(struct.unpack("3i", creds)[1])


def _owner_only(request: web.Request, what: str) -> None:
    # Defining an engine runs a program of the caller's choosing on the host, as the daemon's user. Over
    # TCP only an admin token may (the host's operator gave it that right); on the socket, the runnerd
    # group may use the daemon but only its own user (or root) may do this.
    if not over_unix_socket(request):
        grant = scopes.caller()
        if grant is None or grant.role != "admin":
            raise ApiError(403, f"{what} runs programs on this host: only over the daemon's unix socket or with "
                                "an admin token", code="admin_only", type="permission_error")
        return
    uid = _peer_uid(request)
    if uid is None or uid not in (0, os.getuid()):
        raise ApiError(403, f"{what} runs programs on this host as the daemon's user: only that user or root "
                            "may do it", code="not_socket_owner", type="permission_error")


async def _manifest_text(request: web.Request) -> tuple[str, Literal["yaml", "toml"]]:
    fmt = MANIFEST_TYPES.get(request.content_type)
    if fmt is None:
        spec = parse_body(DefineEngineRequest, await read_json_body(request), "engine definition")
        return spec.manifest, spec.format
    raw = await request.read()
    try:
        return raw.decode("utf-8"), fmt
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the manifest is not UTF-8 text (byte {exc.start})", code="invalid_manifest") from exc


def _registry(d: Daemon) -> MutableMapping[str, Backend]:
    registry = d.backends
    if not isinstance(registry, MutableMapping):
        raise ApiError(500, "this daemon's engine registry is fixed", code="registry_fixed")
    return registry


async def define_backend(request: web.Request) -> web.Response:
    """201 and the new engine; 400 naming the field (and line) a manifest breaks; 409 for a taken name.
    Nothing is stored unless every check passed."""
    _owner_only(request, "defining an engine")
    d = daemon(request)
    text, fmt = await _manifest_text(request)
    registry = _registry(d)
    def define() -> Backend:
        # engine_context counts the GPUs through NVML: blocking, like the checks and the write.
        context = engine_context(d.settings, lambda: as_host_gpus(d.scheduler.sampler.snapshot.gpus))
        return define_engine(d.settings, context, text, fmt, taken)

    taken = set(registry)
    try:
        backend = await asyncio.to_thread(define)
    except ManifestError as exc:
        raise ApiError(400, f"manifest refused: {exc}", code="invalid_manifest", param=exc.field or None) from exc
    except ManifestConflict as exc:
        raise ApiError(409, str(exc), code="backend_exists", param="name") from exc
    registry[backend.name] = backend
    view = await asyncio.to_thread(_describe, d, backend)
    return web.json_response(view.model_dump(mode="json"), status=201)


async def delete_backend(request: web.Request) -> web.Response:
    """Delete a manifest engine: 409 naming the models whose stored configuration or running runner uses
    it, unless `?force=true` (its runners are stopped first; configurations naming it are kept, shown as
    orphaned in GET /engines/_configure, and apply to no other engine: the model is served by the engine
    for its format with its defaults until the engine is defined again or the configuration replaced)."""
    _owner_only(request, "deleting an engine")
    d = daemon(request)
    backend = d.backend(request.match_info["name"])
    if not isinstance(backend, ManifestBackend):
        raise ApiError(400, f"{backend.name} is built in; only engines defined by a manifest can be deleted",
                       code="backend_built_in", param="name")
    force = request.query.get("force", "false").lower() in ("1", "true", "yes")
    # From the check of its users until it is gone from the registry no runner starts on it: one either
    # started before (the check names it, and a forced delete stops it) or is refused (503 naming the delete).
    with d.scheduler.refusing_starts(_runs_on(backend.name), f"{backend.name} is being deleted"):
        configured = sorted({f"{c.model} ({c.mode})" for c in await asyncio.to_thread(d.configs.list)
                             if c.backend == backend.name})
        running = d.scheduler.live(_runs_on(backend.name))
        if (configured or running) and not force:
            parts = ([f"configured for {', '.join(configured)}"] if configured else []) + \
                    ([f"running {', '.join(f'{k.model} ({k.mode})' for k in running)}"] if running else [])
            raise ApiError(409, f"{backend.name} is in use: {'; '.join(parts)}; change or unload them, or delete "
                                "with force=true", code="backend_in_use")
        stopped = await d.scheduler.unload(backend=backend.name, reason="engine deleted") if running else []
        _registry(d).pop(backend.name, None)
        await asyncio.to_thread(forget_engine, d.settings, backend.name)
    return web.json_response({"deleted": backend.name, "unloaded": len(stopped), "configured": configured})


# --- the catalog: what this host can install, what it has, what is newer -----------------------------

class CatalogInstallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64, description="default: the catalog's")
    variant: Variant | None = Field(default=None, description="default: this host's best (the meta entry)")


class CatalogUninstallRequest(CatalogInstallRequest):
    force: bool = False


class UpgradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: str = Field(min_length=1, max_length=64)


async def _catalog(request: web.Request) -> tuple[Catalog, list[Variant]]:
    d = daemon(request)
    feed = request.app.get(CATALOG_FEED)
    fetched = feed.catalog if feed is not None else None
    try:
        found = await asyncio.to_thread(load_catalog, shipped_catalog(), d.settings.catalog_file, fetched)
    except CatalogError as exc:
        raise ApiError(500, f"catalog refused: {exc}", code="invalid_catalog") from exc
    return found, host_variants(g.cuda_version for g in d.scheduler.sampler.snapshot.gpus)


async def get_catalog(request: web.Request) -> web.Response:
    """What this host can install: each catalog version with the variant that suits this host."""
    d = daemon(request)
    found, preferred = await _catalog(request)
    items = await asyncio.to_thread(host_items, found, preferred, d.settings.cache_dir, d.backends)
    feed = request.app.get(CATALOG_FEED)
    return web.json_response({"host_variants": preferred, "items": [i.model_dump(mode="json") for i in items],
                              "catalog_url": feed.status().model_dump(mode="json") if feed is not None else None})


async def refresh_catalog(request: web.Request) -> web.Response:
    """Fetch `catalog_url` now: the URL feed's status block as GET /engines/backends/catalog shows it (a
    failed fetch leaves the catalog in force and is told in its `error`)."""
    feed = request.app.get(CATALOG_FEED)
    if feed is None:
        raise ApiError(409, "no catalog_url is set: nothing to fetch (the shipped catalog and catalog_file are "
                            "read on every request)", code="no_catalog_url")
    await feed.refresh()
    return web.json_response({"catalog_url": feed.status().model_dump(mode="json")})


async def known_backends(request: web.Request) -> web.Response:
    """Every engine the daemon knows of: registered ones and every catalog entry, whatever the hardware."""
    d = daemon(request)
    found, _ = await _catalog(request)
    return web.json_response({
        "registered": sorted(d.backends),
        "catalog": [{"engine": e.name, "description": e.description, "default_version": e.newest,
                     "versions": {v: sorted(spec.variants) for v, spec in e.versions.items()}} for e in found.engines]})


async def get_upgrades(request: web.Request) -> web.Response:
    d = daemon(request)
    found, preferred = await _catalog(request)
    items = await asyncio.to_thread(host_items, found, preferred, d.settings.cache_dir, d.backends)
    return web.json_response([u.model_dump(mode="json") for u in upgrades(items)])


async def _start_catalog_install(request: web.Request, d: Daemon, spec: CatalogInstallRequest) -> web.StreamResponse:
    found, preferred = await _catalog(request)
    try:
        entry, version, variant, recipe = pick(found, preferred, spec.engine, spec.version, spec.variant)
    except CatalogError as exc:
        field = str(exc).split(":", 1)[0]
        raise ApiError(404 if field in ("engine", "version") else 400, str(exc), code="not_in_catalog",
                       param=field) from exc
    target = f"{entry.name}@{version}:{variant}"
    if (removing := d.jobs.active(f"{UNINSTALL}:{target}")) is not None:
        raise ApiError(409, f"{target} is being removed (job {removing.id}); wait for it", code="backend_removing")
    key = f"{INSTALL}:{target}"
    job = d.jobs.active(key)
    if job is None:
        cache, backends = d.settings.cache_dir, d.backends
        if await asyncio.to_thread(is_installed, cache, backends, entry.name, version, variant, recipe):
            job = d.jobs.finished(INSTALL, target, f"already installed: {target}")
        else:
            async def work(progress: ProgressCallback) -> str:
                return await catalog_install(cache, backends, entry.name, version, variant, recipe, progress)

            job, _ = d.jobs.start(INSTALL, target, work, key=key)
    status_code = 200 if job.done else 202
    if wants_stream(request):
        return await stream_job(request, job, status_code)
    return web.json_response(job_json(job), status=status_code, headers={"Location": job.status_url})


async def install_from_catalog(request: web.Request) -> web.StreamResponse:
    """A job carrying out the catalog's recipe (a source build, a pip plan, a check of a binary)."""
    d = daemon(request)
    spec = parse_body(CatalogInstallRequest, await read_json_body(request), "catalog install request")
    return await _start_catalog_install(request, d, spec)


async def upgrade_backend(request: web.Request) -> web.StreamResponse:
    """Install the catalog's default version beside the installed ones (removing the old is a separate,
    checked step: models may pin it)."""
    d = daemon(request)
    spec = parse_body(UpgradeRequest, await read_json_body(request), "upgrade request")
    found, preferred = await _catalog(request)
    items = await asyncio.to_thread(host_items, found, preferred, d.settings.cache_dir, d.backends)
    upgrade = next((u for u in upgrades(items) if u.engine == spec.engine), None)
    if upgrade is None:
        raise ApiError(409, f"no upgrade for {spec.engine}: nothing of it is installed, or the catalog's default "
                            "version is installed already", code="no_upgrade", param="engine")
    return await _start_catalog_install(request, d, CatalogInstallRequest(
        engine=spec.engine, version=upgrade.available, variant=upgrade.variant))


async def uninstall_from_catalog(request: web.Request) -> web.StreamResponse:
    """Remove what a catalog entry installed, as a job: a source build (the checks of uninstall-backend
    with a version), or a private environment (409 naming the manifest engines that run from it, unless
    force: their runners are stopped first). What can be refused is refused here, before the job; the job
    checks the users again when it starts, since a runner may have started in between."""
    d = daemon(request)
    spec = parse_body(CatalogUninstallRequest, await read_json_body(request), "catalog uninstall request")
    found, preferred = await _catalog(request)
    try:
        entry, version, variant, recipe = pick(found, preferred, spec.engine, spec.version, spec.variant)
    except CatalogError as exc:
        raise ApiError(404, str(exc), code="not_in_catalog", param=str(exc).split(":", 1)[0]) from exc
    target = f"{entry.name}@{version}:{variant}"
    key = f"{UNINSTALL}:{target}"
    job = d.jobs.active(key)
    if job is None:
        if (installing := d.jobs.active(f"{INSTALL}:{target}")) is not None:
            raise ApiError(409, f"{target} is being installed (job {installing.id}); cancel that job first",
                           code="backend_installing")
        if isinstance(recipe, SourceBuild):
            work = await _source_build_removal(d, d.backend(entry.name), recipe.source_version, spec.force)
        elif isinstance(recipe, PipPlan):
            work = await _pip_env_removal(d, entry.name, version, variant, recipe, spec.force)
        else:
            raise ApiError(400, f"{entry.name} {version} is an existing binary: runnerd did not install it and "
                                "does not remove it", code="not_installed_by_runnerd")
        job, _ = d.jobs.start(UNINSTALL, target, work, key=key)
    if wants_stream(request):
        return await stream_job(request, job, 202)
    return web.json_response(job_json(job), status=202, headers={"Location": job.status_url})


async def _source_build_removal(d: Daemon, backend: Backend, version: str, force: bool) -> JobWork:
    versioned = await _removable_version(d, backend, version)
    try:
        await _version_users(d, versioned, backend.name, version, force)
    except InUse as exc:
        raise ApiError(409, str(exc), code="version_in_use") from exc

    async def work(progress: ProgressCallback) -> str:
        with _removing_version(d, versioned, backend.name, version):
            _, running = await _version_users(d, versioned, backend.name, version, force)
            progress(Progress(phase="stopping runners", percent=0.0, message=f"{len(running)} runner(s)"))
            stopped = await d.scheduler.unload(keys=running, reason="version uninstalled") if running else []
            progress(Progress(phase="removing", percent=50.0))
            await versioned.uninstall_version(version)
        return f"removed {backend.name} {version}" + (f"; stopped {len(stopped)} runner(s)" if stopped else "")

    return work


async def _pip_env_removal(d: Daemon, engine: str, version: str, variant: Variant, recipe: PipPlan,
                           force: bool) -> JobWork:
    cache = d.settings.cache_dir
    if not await asyncio.to_thread(is_installed, cache, d.backends, engine, version, variant, recipe):
        raise ApiError(404, f"{engine} {version} ({variant}) is not installed", code="version_not_installed")
    root = pip_env_python(cache, engine, version, variant).parent.parent.parent

    async def users() -> list[str]:
        found = await asyncio.to_thread(env_users, d.backends, root)
        if found and not force:
            raise InUse(f"{engine} {version} ({variant}) is run by the manifest engine(s) {', '.join(found)}; "
                        "delete them first, or uninstall with force")
        return found

    try:
        engines = set(await users())
    except InUse as exc:
        raise ApiError(409, str(exc), code="version_in_use") from exc

    async def work(progress: ProgressCallback) -> str:
        # The guard reads `engines`, which the check under it completes (an engine defined since the first
        # check): a runner of any of them either started before the check (and is stopped) or is refused.
        with d.scheduler.refusing_starts(lambda key, _: key.backend in engines,
                                         f"{engine} {version} ({variant}) is being removed"):
            engines.update(await users())
            progress(Progress(phase="stopping runners", percent=0.0, message=", ".join(sorted(engines))))
            running = d.scheduler.live(lambda key, _: key.backend in engines)
            stopped = await d.scheduler.unload(keys=running, reason="engine uninstalled") if running else []
            progress(Progress(phase="removing", percent=50.0))
            await remove_pip_env(cache, engine, version, variant)
        return f"removed {engine} {version} ({variant})" + (f"; stopped {len(stopped)} runner(s) of "
                                                             f"{', '.join(sorted(engines))}" if stopped else "")

    return work


def add_routes(app: web.Application) -> None:
    app.router.add_get("/engines/backends/catalog", get_catalog)
    app.router.add_get("/engines/backends/known", known_backends)
    app.router.add_get("/engines/backends/upgrades", get_upgrades)
    app.router.add_post("/engines/backends/catalog/refresh", refresh_catalog)
    app.router.add_post("/engines/backends/catalog/install", install_from_catalog)
    app.router.add_post("/engines/backends/catalog/uninstall", uninstall_from_catalog)
    app.router.add_post("/engines/backends/upgrade", upgrade_backend)
    app.router.add_get("/engines/backends", list_backends)
    app.router.add_post("/engines/backends", define_backend)
    app.router.add_delete("/engines/backends/{name}", delete_backend)
    app.router.add_post("/engines/install-backend", install_backend)
    app.router.add_post("/engines/uninstall-backend", uninstall_backend)
