"""An engine defined by a manifest: a Backend whose every answer comes from the manifest's fields.

Each manifest becomes its own Backend subclass (the protocol's name, capabilities, endpoint kind and
readiness are class attributes); its default version is the one that runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, create_model

from backends.base import (
    Backend,
    BackendConfiguration,
    BackendState,
    BackendStatus,
    EngineContext,
    InstallError,
    Launch,
    MemoryEstimate,
    Mode,
    ModelFormatError,
    ModelRef,
    ProgressCallback,
    RunnerError,
    RunnerOutput,
)
from backends.endpoint import Endpoint, EndpointKind
from backends.flags import FlagError, FlagTable
from backends.manifest.checks import executable_problem
from backends.manifest.model import EngineManifest, ListenKind, VersionSpec
from backends.manifest.template import render
from backends.process import run_process

# What an engine process inherits from the daemon; everything else comes from its manifest.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


class ManifestBackend(Backend):
    """Base of every manifest engine's class; `backend_class` makes one per manifest."""

    name: ClassVar[str] = "manifest"
    manifest: ClassVar[EngineManifest]
    capabilities = frozenset()
    model_formats = frozenset()

    @classmethod
    def create(cls, context: EngineContext, settings: BaseModel) -> ManifestBackend:
        return cls(context)

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    # --- install: the operator installs the engine; runnerd only checks it is there -----------------

    @property
    def _executable(self) -> str:
        return self.manifest.version.command[0]

    async def install(self, progress: ProgressCallback | None = None) -> None:
        import asyncio

        problem = await asyncio.to_thread(executable_problem, self._executable)
        if problem:
            raise InstallError(f"{self.name} is defined by a manifest; runnerd does not install it: {problem}")

    async def uninstall(self) -> None:
        """Nothing to remove: runnerd installed nothing (deleting the manifest removes the engine)."""

    def status(self) -> BackendStatus:
        problem = executable_problem(self._executable)
        if problem is None:
            return BackendStatus(state=BackendState.INSTALLED, version=self.manifest.chosen_version,
                                 product=self.name)
        if not os.path.exists(self._executable):
            return BackendStatus(state=BackendState.NOT_INSTALLED, detail=problem)
        return BackendStatus(state=BackendState.ERROR, detail=problem)

    def installed_versions(self) -> list[str]:
        return [key for key, v in self.manifest.versions.items() if executable_problem(v.command[0]) is None]

    def disk_usage(self) -> int:
        try:
            return os.stat(self._executable).st_size
        except OSError:
            return 0

    # --- run ---------------------------------------------------------------------------------------

    def _values(self, endpoint: Endpoint, model: ModelRef, config: BackendConfiguration) -> dict[str, str]:
        try:
            gpus = ",".join(str(g.index) for g in self.context.gpus())
        except Exception:  # a GPU probe that fails must not keep a CPU engine from starting
            gpus = ""
        return {
            "model_path": str(model.path), "model_name": model.name,
            "socket": str(endpoint.path) if endpoint.kind is EndpointKind.UNIX else "",
            "port": str(endpoint.port) if endpoint.kind is EndpointKind.TCP else "",
            "host": endpoint.host,
            "ctx": str(config.context_size or self.context.default_context_size),
            "threads": str(self.context.cpu_count), "gpu_ids": gpus,
        }

    def version_for(self, config: BackendConfiguration) -> str:
        """The version a runner with `config` runs: its pinned `backend_version`, else the default."""
        pinned: str | None = self.options(config).backend_version
        return pinned or self.manifest.chosen_version

    def launch_for(self, config: BackendConfiguration) -> Launch:
        """The pinned version's listen kind and readiness (options run refuses: the default version's)."""
        try:
            key = self.version_for(config)
        except RunnerError:
            key = self.manifest.chosen_version
        return version_launch(self.manifest.versions[key])

    def argv(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration) -> list[str]:
        """The command line: the version's command, its mode arguments, the default arguments, then the
        caller's validated flags (last, so they tune the defaults; they can never name a template option)."""
        version = self.manifest.versions[self.version_for(config)]
        values = self._values(endpoint, model, config)
        return [*render(version.command, values), *render(version.mode_args.get(mode, []), values),
                *render(self.manifest.default_args, values), *config.runtime_flags]

    def environment(self, version: VersionSpec, values: Mapping[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        names = list(version.environment)
        env.update(zip(names, render([version.environment[n] for n in names], values), strict=True))
        return env

    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration,
                  output: RunnerOutput) -> None:
        import asyncio

        if model.format not in self.model_formats:
            raise ModelFormatError(f"{self.name} serves {', '.join(sorted(self.model_formats))} models; "
                                   f"{model.name} is in {model.format} format")
        if mode not in self.manifest.modes:
            raise RunnerError(f"{self.name} does not run models in {mode} mode", reason="bad_config")
        version = self.manifest.versions[self.version_for(config)]
        problem = await asyncio.to_thread(executable_problem, version.command[0])
        if problem:
            raise RunnerError(f"cannot start {self.name} {self.version_for(config)}: {problem}",
                              reason="spawn_failed")
        try:
            self.validate_flags(config.runtime_flags)  # stored configurations may be old or hand-edited
        except FlagError as exc:
            raise RunnerError(str(exc), reason="bad_flag") from exc
        argv = self.argv(endpoint, model, mode, config)
        env = self.environment(version, self._values(endpoint, model, config))
        await run_process(argv, env=env, endpoint=endpoint, output=output, grace=self.context.stop_grace)

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        policy = self.manifest.memory
        if policy.kind == "fixed":
            return MemoryEstimate(ram_bytes=policy.ram_bytes, vram_bytes=policy.vram_bytes,
                                  notes=[f"fixed size from the {self.name} manifest"])
        if policy.kind == "gguf" and model.format in self.model_formats:
            from backends.formats.gguf import GGUFParseError, cached_header
            from backends.llamacpp.memory import estimate, settings_from_config

            try:
                header = cached_header(model.path)
            except (GGUFParseError, OSError) as exc:
                return MemoryEstimate.unknown(f"cannot read {model.path.name}: {exc}")
            settings = settings_from_config(mode, config, self.context.default_context_size, False)
            result = estimate(header, settings)
            result.notes.append(f"estimated as llama.cpp would load it ({self.name} manifest: memory gguf)")
            return result
        return MemoryEstimate.unknown(f"the {self.name} manifest gives no memory estimate: the runner is admitted "
                                      "unmeasured and measured once it has loaded")


def version_launch(version: VersionSpec) -> Launch:
    return Launch(endpoint_kind=EndpointKind.TCP if version.listen is ListenKind.TCP else EndpointKind.UNIX,
                  readiness_path=version.readiness.path, readiness_timeout=version.readiness.timeout)


def _options_model(manifest: EngineManifest) -> type[BaseModel]:
    """Per-model options: `backend_version`, one of the manifest's versions (unset: the default)."""
    versions: Any = Literal[tuple(manifest.versions)]
    return create_model(f"{manifest.name}-options", __config__=ConfigDict(extra="forbid"),
                        backend_version=(versions | None, None))


def backend_class(manifest: EngineManifest, flags: FlagTable | None) -> type[ManifestBackend]:
    """A Backend subclass for one checked manifest (parse_manifest gives both arguments). The class's
    endpoint and readiness are the default version's; `launch` answers for a pinned one."""
    launch = version_launch(manifest.version)
    attributes = {
        "options_model": _options_model(manifest),
        "name": manifest.name, "manifest": manifest, "capabilities": frozenset(manifest.capabilities),
        "model_formats": frozenset(manifest.model_formats), "flag_table": flags,
        "readiness_path": launch.readiness_path, "readiness_timeout": launch.readiness_timeout,
        "endpoint_kind": launch.endpoint_kind,
        "native_apis": manifest.native_apis, "__doc__": manifest.description or f"the {manifest.name} manifest",
    }
    cls = type(f"Manifest_{manifest.name.replace('-', '_').replace('.', '_')}", (ManifestBackend,), attributes)
    return cast(type[ManifestBackend], cls)
