"""llama.cpp's llama-server as a runnerd backend."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backends.base import (
    Api,
    Backend,
    BackendConfiguration,
    BackendState,
    BackendStatus,
    Capability,
    EngineContext,
    HostGpu,
    InstallError,
    MemoryEstimate,
    Mode,
    ModelFormat,
    ModelFormatError,
    ModelRef,
    ProgressCallback,
    RunnerError,
    RunnerOutput,
    host_cpu_count,
)
from backends.endpoint import Endpoint
from backends.flags import FlagError, FlagTable
from backends.formats.gguf import GGUFHeader, GGUFParseError, cached_header
from backends.gpus import cuda_visible
from backends.llamacpp.argv import LaunchOptions, build_argv, build_env
from backends.llamacpp.errors import LLAMACPP_EXIT_PATTERNS
from backends.llamacpp.flags import LLAMACPP_FLAGS, version_flags
from backends.llamacpp.help import help_options
from backends.llamacpp.host_limits import HostLimits, check_host_flags, slots_problem
from backends.llamacpp.install import (
    BASE_CMAKE_OPTIONS,
    SOURCE_VERSION,
    build_key,
    build_llama_server,
    cached_binary,
    check_source_version,
    cmake_options,
    cuda_available,
    installed_builds,
    remove_build,
)
from backends.llamacpp.memory import GpuDevice, estimate, offload_devices, settings_from_config
from backends.llamacpp.options import OPTIONS_KEY, LlamaCppOptions, LlamaCppSettings, llamacpp_options
from backends.llamacpp.requests import answer_size_problem
from backends.llamacpp.templates import fallback_chat_template
from backends.process import run_process

__all__ = ["GpuDevice", "GpuProvider", "LaunchOptions", "LlamaCppBackend", "LlamaCppOptions", "LlamaCppSettings",
           "offload_devices", "visible_devices"]

# The GPUs llama-server will see, in its own order (CUDA0, CUDA1, ...), each with its NVML index and
# free memory now.
GpuProvider = Callable[[], Sequence[GpuDevice]]

# Ollama option -> llama-server's body field, where Ollama's name is not the OpenAI one.
LLAMA_SERVER_SAMPLING = {"repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                         "typical_p": "typical_p", "num_keep": "n_keep"}


def visible_devices(gpus: Sequence[HostGpu]) -> list[GpuDevice]:
    """llama.cpp's view of the host's GPUs: those CUDA lets it see, in its order, with their free memory
    (its default layer split follows free memory)."""
    return [GpuDevice(index=g.index, free_bytes=g.memory_free_bytes)
            for g in cuda_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))]


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    capabilities = frozenset(Capability)
    model_formats = frozenset({ModelFormat.GGUF})
    flag_table = LLAMACPP_FLAGS
    options_model = LlamaCppOptions
    options_key = OPTIONS_KEY
    settings_model = LlamaCppSettings
    settings_aliases = ("llamacpp",)
    settings_env = {"RUNNERD_LLAMA_SERVER": "server"}
    sampling_dialect = LLAMA_SERVER_SAMPLING
    # The pinned llama-server serves Anthropic Messages and OpenAI Responses itself.
    native_apis = frozenset(Api)
    estimate_parameters = {"parallel": "--parallel", "cache_type_k": "--cache-type-k",
                           "cache_type_v": "--cache-type-v", "gpu_layers": "--gpu-layers",
                           "flash_attn": "--flash-attn", "batch_size": "--batch-size", "ubatch_size": "--ubatch-size"}

    @classmethod
    def create(cls, context: EngineContext, settings: BaseModel) -> LlamaCppBackend:
        assert isinstance(settings, LlamaCppSettings)
        cuda = settings.cuda == "on" or (settings.cuda == "auto" and cuda_available(context.gpu_count))
        launch = LaunchOptions(threads=settings.threads, gpu_layers=settings.gpu_layers,
                               use_gpu=cuda and context.gpu_count > 0,
                               default_context_size=context.default_context_size,
                               prompt_cache_mib=settings.prompt_cache_mib)
        gpus = context.gpus
        backend = cls(cache_dir=context.cache_dir, binary=settings.server, launch=launch, cuda=cuda,
                      stop_grace=context.stop_grace,
                      gpus=(lambda: visible_devices(gpus())) if launch.use_gpu else None,
                      host=HostLimits.of_host(context.cpu_count))
        # Read the build's option list now, in a thread, so configure requests check flags against it.
        threading.Thread(target=backend.build_flags, name="llama-server --help", daemon=True).start()
        return backend

    def __init__(
        self,
        *,
        cache_dir: Path,
        binary: Path | None = None,
        launch: LaunchOptions | None = None,
        cuda: bool = False,
        stop_grace: float = 5.0,
        source_version: str = SOURCE_VERSION,
        gpus: GpuProvider | None = None,
        host: HostLimits | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.gpus = gpus
        self.host = host or HostLimits.of_host(host_cpu_count())
        self.explicit_binary = binary
        self.launch = launch or LaunchOptions()
        self.cuda = cuda
        self.stop_grace = stop_grace
        self.source_version = source_version
        self._installing: str | None = None
        self._error: str | None = None
        self._versions: dict[tuple[Path, float], str] = {}
        self._tables: dict[tuple[Path, float], FlagTable] = {}
        self._table: FlagTable | None = None  # the allowlist of the default build, once read
        # The binary each live runner was started from, with its model and mode: what uninstalling a
        # version must not pull from under a runner.
        self._live: dict[int, tuple[Path, str, Mode]] = {}

    # --- install -------------------------------------------------------------------------------

    @property
    def _cached(self) -> Path:
        return cached_binary(self.cache_dir, build_key(self.source_version, cmake_options(self.cuda)))

    def locate(self) -> Path | None:
        if self.explicit_binary is not None:
            return self.explicit_binary if self.explicit_binary.is_file() else None
        return self._cached if self._cached.is_file() else None

    def binary(self) -> Path:
        found = self.locate()
        if found is None:
            where = self.explicit_binary or self._cached
            raise InstallError(f"llama.cpp is not installed ({where} not found): install the backend first")
        return found

    async def install(self, progress: ProgressCallback | None = None) -> None:
        if self.explicit_binary is not None:
            if not self.explicit_binary.is_file():
                raise InstallError(f"configured llama-server {self.explicit_binary} does not exist")
            return
        self._error = None

        def report(p: object) -> None:
            self._installing = getattr(p, "phase", "building")
            if progress is not None:
                progress(p)  # type: ignore[arg-type]

        try:
            self._installing = "starting"
            await build_llama_server(self.cache_dir, cuda=self.cuda, source_version=self.source_version,
                                     progress=report)
        except InstallError as exc:
            self._error = str(exc).splitlines()[0]
            raise
        finally:
            self._installing = None

    async def uninstall(self) -> None:
        """Remove the cached build; a binary the operator named is never touched."""
        if self.explicit_binary is None:
            await asyncio.to_thread(shutil.rmtree, self._cached.parent.parent, True)

    # --- versions side by side: one cached build per llama-cpp-python source version -------------------

    def installed_versions(self) -> list[str]:
        """Blocking: the source versions built for this backend's build options, oldest first."""
        return list(installed_builds(self.cache_dir, cmake_options(self.cuda)))

    def named_build(self) -> tuple[Path, str] | None:
        """Blocking: the binary named in the settings, when there is one, with its own `--version` (run once
        per path and modification time). It serves unpinned models; it is no release, so no configuration
        pins it and runnerd never removes it."""
        if self.explicit_binary is None or not self.explicit_binary.is_file():
            return None
        return self.explicit_binary, self.version() or "unknown"

    def version_binary(self, version: str) -> Path:
        return cached_binary(self.cache_dir, build_key(check_source_version(version), cmake_options(self.cuda)))

    def build_problem(self, options: Sequence[str]) -> str | None:
        """Why a catalog build with these CMake options (on top of the base ones) would not serve here (None:
        it would). Builds are found by this backend's own options, so one made with others would never run."""
        wanted = set(cmake_options(self.cuda))
        if {*BASE_CMAKE_OPTIONS, *options} != wanted:
            own = " ".join(sorted(wanted - set(BASE_CMAKE_OPTIONS)))
            return f"this daemon builds llama.cpp with {own}; the recipe's options {list(options)} differ"
        return None

    def version_problem(self, version: str) -> str | None:
        """Why `version` cannot name a build (None: it can; whether PyPI has that release, the build finds out)."""
        try:
            check_source_version(version)
        except InstallError as exc:
            return str(exc)
        return None

    async def install_version(self, version: str, progress: ProgressCallback | None = None) -> None:
        """Build llama-server from `version`'s sdist beside the builds already there (none is replaced)."""
        check_source_version(version)
        if version == self.source_version and self.explicit_binary is None:
            await self.install(progress)
            return
        await build_llama_server(self.cache_dir, cuda=self.cuda, source_version=version, progress=progress)

    async def uninstall_version(self, version: str) -> None:
        await asyncio.to_thread(remove_build, self.cache_dir, version, cmake_options(self.cuda))

    def version_for(self, config: BackendConfiguration) -> str | None:
        """The source version a runner with `config` is pinned to; None: the default build."""
        return llamacpp_options(config).backend_version

    def pins_version(self, config: BackendConfiguration, version: str) -> bool:
        """Whether a runner with `config` would run `version`'s cached build (unpinned ones run the default
        build, which is the cache's only when no binary was named in the settings)."""
        pinned = self.version_for(config)
        if pinned is not None:
            return pinned == version
        return self.explicit_binary is None and version == self.source_version

    def runners_on(self, version: str) -> list[tuple[str, Mode]]:
        """The (model, mode) of every live runner started from `version`'s cached build."""
        binary = self.version_binary(version)
        return sorted({(model, mode) for path, model, mode in self._live.values() if path == binary})

    def binary_for(self, config: BackendConfiguration) -> Path:
        pinned = self.version_for(config)
        if pinned is None:
            return self.binary()
        binary = self.version_binary(pinned)
        if not binary.is_file():
            raise InstallError(f"llama.cpp {pinned} is not installed: `runnerd backends install llama.cpp@{pinned}`")
        return binary

    def version(self) -> str | None:
        binary = self.locate()
        if binary is None:
            return None
        key = (binary, binary.stat().st_mtime)
        if key not in self._versions:
            done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                                  env=build_env(binary), check=False)
            text = done.stdout + done.stderr
            line = next((ln for ln in text.splitlines() if ln.startswith("version:")), "")
            self._versions[key] = line.removeprefix("version:").strip() or "unknown"
        return self._versions[key]

    def build_flags(self, binary: Path | None = None) -> FlagTable:
        """Blocking: the allowlist of a build (the default one unless `binary` names another), from its own
        `--help` (backends/llamacpp/flags.py, `version_flags`), read once per binary path and modification
        time; the pinned table when no build is installed or its help cannot be read."""
        default = binary is None
        binary = self.locate() if binary is None else binary
        try:
            if binary is None:
                return LLAMACPP_FLAGS
            key = (binary, binary.stat().st_mtime)
            table = self._tables.get(key)
            if table is None:
                table = self._tables[key] = version_flags(help_options(binary, build_env(binary)))
        except (OSError, subprocess.SubprocessError):
            return LLAMACPP_FLAGS
        if default:
            self._table = table
        return table

    def status(self) -> BackendStatus:
        if self._installing is not None:
            return BackendStatus(state=BackendState.INSTALLING, detail=self._installing)
        if self._error is not None:
            return BackendStatus(state=BackendState.ERROR, detail=self._error)
        try:
            version = self.version()
        except (OSError, subprocess.SubprocessError) as exc:
            return BackendStatus(state=BackendState.ERROR, detail=binary_error(exc))
        if version is None:
            return BackendStatus(state=BackendState.NOT_INSTALLED)
        self.build_flags()  # a new build (installed, rebuilt) brings its own option list
        return BackendStatus(state=BackendState.INSTALLED, version=version, product="llama.cpp")

    @property
    def installable_version(self) -> str | None:
        return self.source_version

    def disk_usage(self) -> int:
        binary = self.locate()
        if binary is None:
            return 0
        return _directory_size(binary.parent) if self.explicit_binary is None else binary.stat().st_size

    # --- run -----------------------------------------------------------------------------------

    def check_model(self, model: ModelRef) -> None:
        if model.format not in self.model_formats:
            raise ModelFormatError(f"llama.cpp serves GGUF models; {model.name} is in {model.format} format")

    def check_draft(self, config: BackendConfiguration) -> None:
        if config.speculative is not None:
            config.speculative.usable_draft(self.name, self.model_formats)

    # --- configuration and requests ------------------------------------------------------------

    @property
    def flags(self) -> FlagTable:
        """The installed build's allowlist once read (`build_flags`), else the pinned build's table."""
        return self._table or LLAMACPP_FLAGS

    def validate_flags(self, flags: Sequence[str], table: FlagTable | None = None) -> list[str]:
        """The build's flag table's checks, then this host's bounds (threads and CPU placement by its CPUs,
        slots; see backends/llamacpp/host_limits.py). Never blocks: until the build's option list has been
        read the pinned table answers, and `run` checks again against the build's own (a model pinned to
        another version: that version's)."""
        table = table or self.flags
        validated = table.validate(list(flags))
        check_host_flags(table, validated, self.host)
        return validated

    def validate_flags_for(self, flags: Sequence[str], config: BackendConfiguration) -> list[str]:
        """Blocking: checked against the table of the build `config` runs (its pinned version's, read from that
        build's `--help`), which `run` applies too; a pin to a build that is not there is left to
        configuration_problem, and the default build's table answers meanwhile."""
        pinned = self.version_for(config)
        binary = self.version_binary(pinned) if pinned is not None else self.locate()
        if binary is None or not binary.is_file():
            return self.validate_flags(flags)
        return self.validate_flags(flags, self.build_flags(binary if pinned is not None else None))

    def configuration_problem(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> str | None:
        pinned = self.version_for(config)
        if pinned is not None and not self.version_binary(pinned).is_file():
            return (f"llama.cpp {pinned} is not installed (installed: {', '.join(self.installed_versions()) or 'none'})"
                    f": `runnerd backends install llama.cpp@{pinned}` first")
        context = config.context_size or self.launch.default_context_size
        return slots_problem(LLAMACPP_FLAGS.values(config.runtime_flags, strict=False), context)

    def request_problem(self, model: ModelRef, config: BackendConfiguration,
                        payload: Mapping[str, Any]) -> str | None:
        """Fields that would multiply the size of llama-server's answer (backends/llamacpp/requests.py)."""
        return answer_size_problem(payload)

    def default_chat_template(self, model: ModelRef) -> str | None:
        try:
            header = cached_header(model.path)
        except (GGUFParseError, OSError):
            return None
        return fallback_chat_template(header.architecture, False)

    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration,
                  output: RunnerOutput) -> None:
        assert endpoint.path is not None, "llama.cpp runners listen on a unix socket"
        socket_path = endpoint.path
        self.check_model(model)
        self.check_draft(config)
        try:
            binary = self.binary_for(config)
        except InstallError as exc:
            raise RunnerError(str(exc), reason="not_installed") from exc
        table = await asyncio.to_thread(self.build_flags, binary)
        try:
            # Checked again here, not only at configure time: a stored configuration may be old or hand-edited,
            # or checked before this build's option list was read, or pinned to another version.
            self.validate_flags(config.runtime_flags, table)
        except FlagError as exc:
            raise RunnerError(str(exc), reason="bad_flag") from exc
        problem = await asyncio.to_thread(self.configuration_problem, model, mode, config)
        if problem is not None:
            raise RunnerError(problem, reason="bad_config")
        traits = await asyncio.to_thread(model_traits, model.path)
        argv = build_argv(binary, socket_path, model, mode, config, self.launch,
                          pooling_in_file=traits.pooling_in_file, chat_template=traits.fallback_template)
        token = id(output)
        self._live[token] = (binary, model.name, mode)
        try:
            await run_process(argv, env=build_env(binary), endpoint=endpoint, output=output,
                              grace=self.stop_grace, exit_patterns=LLAMACPP_EXIT_PATTERNS)
        finally:
            self._live.pop(token, None)

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        """From the GGUF header and the settings this backend would start llama-server with."""
        try:
            header = cached_header(model.path)
        except (GGUFParseError, OSError) as exc:
            return MemoryEstimate.unknown(f"cannot read {model.path.name}: {exc}")
        # A caller's --cache-ram comes after runnerd's default on the command line, so it is the one that counts.
        cache_ram = None if "--cache-ram" in config.runtime_flags else self.launch.prompt_cache_mib
        try:
            draft = self._draft_header(config)
        except (GGUFParseError, OSError) as exc:
            return MemoryEstimate.unknown(f"cannot read the draft model: {exc}")
        settings = settings_from_config(mode, config, self.launch.default_context_size, self.launch.use_gpu,
                                        gpu_layers=self.launch.gpu_layers, gpus=self._visible_gpus(),
                                        cache_ram_mib=cache_ram, draft=draft)
        # Admission counts the prompt cache's whole budget: it fills as prompts change, up to what was set.
        settings = settings.model_copy(update={"count_prompt_cache": True})
        if model.mmproj is not None:
            try:
                settings = settings.model_copy(update={"mmproj": cached_header(model.mmproj)})
            except (GGUFParseError, OSError) as exc:
                return MemoryEstimate.unknown(f"cannot read the projector {model.mmproj.name}: {exc}")
        result = estimate(header, settings)
        spec = config.speculative
        if spec is not None and draft is None:
            # run() refuses to start without it; the estimate still answers for the main model.
            result.notes.append(f"draft model {spec.draft_model!r} is not in the store: not counted")
        return result

    def _visible_gpus(self) -> list[GpuDevice]:
        """The GPUs llama-server would see (the estimator picks among them by the caller's flags); empty
        when unknown (no provider, none found, or the probe failed): the estimator then assumes one GPU,
        index 0, as it always did."""
        if not self.launch.use_gpu or self.gpus is None:
            return []
        try:
            return list(self.gpus())
        except Exception:  # a GPU probe that fails must not make estimates fail
            return []

    def _draft_header(self, config: BackendConfiguration) -> GGUFHeader | None:
        """The draft's header when one is configured, resolved and GGUF (the estimator counts its weights,
        KV cache and compute buffers, and the main model's extra output rows for drafted tokens)."""
        spec = config.speculative
        if spec is None or spec.draft is None or spec.draft.format not in self.model_formats:
            return None
        return cached_header(spec.draft.path)


def binary_error(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class ModelTraits:
    pooling_in_file: bool = False
    fallback_template: str | None = None


def model_traits(path: Path) -> ModelTraits:
    """What the header says that changes the command line: a pooling type (then llama-server must
    not be given one) and a missing chat template (then runnerd supplies one if it knows the family)."""
    try:
        header = cached_header(path)
    except (GGUFParseError, OSError):
        return ModelTraits()  # llama-server will report the problem itself, with its own words
    return ModelTraits(
        pooling_in_file=header.arch_get("pooling_type") is not None,
        fallback_template=fallback_chat_template(header.architecture,
                                                 header.get("tokenizer.chat_template") is not None),
    )
