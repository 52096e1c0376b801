"""vLLM's OpenAI-compatible server as a runnerd backend: install, argv, memory estimate."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
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
from backends.formats.safetensors import ModelConfigError, SafetensorsError, read_model_config, weights_bytes
from backends.gpus import cuda_visible
from backends.process import ExitPatterns, run_process
from backends.vllm.argv import VllmLaunch, build_argv, build_env, write_site
from backends.vllm.flags import VLLM_FLAGS, validate_vllm_flags, version_flags
from backends.vllm.host_limits import VllmHostLimits, check_host_flags
from backends.vllm.install import (
    InstallPlan,
    default_plan,
    directory_size,
    install_private,
    install_root,
    installed_python,
    interpreter_of,
    options_dir,
    read_version,
    record_options,
)
from backends.vllm.memory import (
    EstimateInputs,
    GiB,
    ModelShape,
    estimate,
    kv_bytes_per_token,
    kv_cache_bytes,
    model_shape,
)
from backends.vllm.option_list import cache_file, load_options
from backends.vllm.options import OPTIONS_KEY, VllmOptions, VllmSettings
from backends.vllm.overrides import validate_hf_overrides
from backends.vllm.requests import request_problem

__all__ = ["VllmBackend", "VllmLaunch", "VllmOptions", "VllmSettings"]

# vLLM has a repetition penalty but no window for it (repeat_last_n), no typical sampling and no n_keep
# (it never shifts the context): Ollama's options for those are dropped, as Ollama ignores what a runner lacks.
VLLM_SAMPLING = {"repeat_penalty": "repetition_penalty"}

VLLM_EXIT_PATTERNS: ExitPatterns = (
    ("socket_in_use", re.compile(r"Address already in use", re.I),
     "the runner's socket path is taken by another process"),
    ("not_installed", re.compile(r"No module named '?vllm", re.I),
     "the configured Python cannot import vllm: install the vllm backend"),
    ("out_of_memory", re.compile(r"No available memory for the cache blocks|insufficient memory|"
                                 r"is larger than the available KV cache memory|to store at least one request",
                                 re.I),
     "vLLM has too little memory for the KV cache of one full-length sequence"),
    ("bad_config", re.compile(r"max_model_len.*(greater|larger) than|ValidationError|Invalid (repository|model)",
                              re.I),
     "vLLM refused the model's configuration"),
    ("model_load_failed", re.compile(r"Engine core initialization failed|EngineCore failed to start", re.I),
     "vLLM's engine failed to start"),
)

DTYPE_FLAG_BYTES = {"float": 4, "float32": 4, "half": 2, "float16": 2, "bfloat16": 2}

# Architectures whose pooling output is a relevance score: only these serve /rerank.
_SCORER_SUFFIXES = ("ForSequenceClassification", "ForScoring", "ForReranking")


@functools.lru_cache(maxsize=64)
def _config(path: Path, mtime_ns: int) -> dict[str, Any]:
    return read_model_config(path)


@functools.lru_cache(maxsize=64)
def _weights(path: Path, mtime_ns: int) -> int:
    return weights_bytes(path)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _environment_mtime(python: Path) -> int:
    """The latest modification of `python` and of its environment's site-packages directories."""
    sites = python.parent.parent.glob("lib/python3*/site-packages")
    return max([_mtime(python), *(_mtime(site) for site in sites)])


def model_weights(model_dir: Path) -> int:
    """Bytes of a model directory's safetensors, read once per version of its files."""
    return _weights(model_dir, max(_mtime(p) for p in [model_dir, *model_dir.glob("*.safetensors")]))


def draft_weights(config: BackendConfiguration, formats: frozenset[ModelFormat]) -> int:
    """A resolved draft model's weights: vLLM loads them beside the target's (its KV cache comes out of
    the same pool, which the estimate already sizes)."""
    spec = config.speculative
    if spec is None or spec.draft is None or spec.draft.format not in formats:
        return 0
    return model_weights(spec.draft.path)


def model_config(model_dir: Path) -> dict[str, Any]:
    """config.json, read once per version of the file."""
    try:
        mtime = _mtime(model_dir / "config.json")
    except OSError as exc:
        raise ModelConfigError(f"config.json: {exc.strerror or exc}") from exc
    return dict(_config(model_dir, mtime))


def is_scorer(config: dict[str, Any]) -> bool:
    archs = config.get("architectures")
    return isinstance(archs, list) and any(isinstance(a, str) and a.endswith(_SCORER_SUFFIXES) for a in archs)


_TMP_PREFIX = "rv-"
_TMP_OWNER = "runnerd-owner"


def make_runner_tmpdir() -> Path:
    """A short private TMPDIR for one runner (vLLM's IPC socket paths must fit in 108 bytes).

    Each holds the daemon's pid; directories left by a daemon that was killed (it could not remove
    them) are removed here, when no live process has that pid any more.
    """
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    for old in base.glob(f"{_TMP_PREFIX}*"):
        try:
            if old.stat().st_uid != os.getuid():
                continue
            pid = int((old / _TMP_OWNER).read_text())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=base))
    (tmpdir / _TMP_OWNER).write_text(str(os.getpid()))
    return tmpdir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VllmBackend(Backend):
    name = "vllm"
    # Rerank only for scorer models: see `model_capabilities`.
    capabilities = frozenset(Capability)
    model_formats = frozenset({ModelFormat.SAFETENSORS})
    flag_table = VLLM_FLAGS
    options_model = VllmOptions
    options_key = OPTIONS_KEY
    settings_model = VllmSettings
    settings_aliases = ("vllm",)
    # A `vllm` executable or a Python interpreter that can import vllm.
    settings_env = {"RUNNERD_VLLM": "python"}
    sampling_dialect = VLLM_SAMPLING
    # vLLM 0.32's server routes (its api_router modules); it has no /v1/responses/input_tokens.
    native_apis = frozenset({Api.CHAT_COMPLETIONS, Api.COMPLETIONS, Api.EMBEDDINGS, Api.RERANK, Api.MESSAGES,
                             Api.MESSAGES_COUNT_TOKENS, Api.RESPONSES})
    # vLLM refuses a request whose `model` is not its --served-model-name (the daemon rewrites it).
    checks_model_name = True

    @classmethod
    def create(cls, context: EngineContext, settings: BaseModel) -> VllmBackend:
        assert isinstance(settings, VllmSettings)
        use_gpu = settings.device == "cuda" or (settings.device == "auto" and context.gpu_count > 0)
        gpu_total = None
        seen = []
        if use_gpu:
            # The first GPU vLLM sees is the one it runs on (one GPU per runner).
            seen = cuda_visible(context.gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            gpu_total = seen[0].memory_total_bytes if seen else None
        kv = int(settings.kv_cache_space) if settings.kv_cache_space is not None else None
        launch = VllmLaunch(use_gpu=use_gpu, default_context_size=context.default_context_size,
                            gpu_memory_utilization=settings.gpu_memory_utilization, kv_cache_space=kv,
                            kv_cache_sequences=settings.kv_cache_sequences, enforce_eager=settings.enforce_eager,
                            cache_root=context.cache_dir / "vllm" / "cache")
        plan = default_plan(use_gpu, package=settings.package, version=settings.version, torch=settings.torch)
        host = VllmHostLimits(gpus=len(seen) or (context.gpu_count if use_gpu else 0), cpus=context.cpu_count)
        backend = cls(cache_dir=context.cache_dir, python=settings.python, launch=launch, plan=plan,
                      stop_grace=context.stop_grace, gpu_total=gpu_total, host=host)
        # Read (or load from its cache) the release's option list now, in a thread, so configure requests
        # check flags against it.
        threading.Thread(target=backend.build_flags, name="vllm options", daemon=True).start()
        return backend

    def __init__(
        self,
        *,
        cache_dir: Path,
        python: Path | None = None,
        launch: VllmLaunch | None = None,
        plan: InstallPlan | None = None,
        stop_grace: float = 5.0,
        gpu_total: int | None = None,
        host: VllmHostLimits | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.explicit = python
        self.launch = launch or VllmLaunch()
        self.plan = plan or default_plan(self.launch.use_gpu)
        self.stop_grace = stop_grace
        # Total memory of the GPU vLLM runs on (GPU hosts only): the base of gpu_memory_utilization.
        self.gpu_total = gpu_total if self.launch.use_gpu else None
        self.host = host or VllmHostLimits(gpus=1 if self.launch.use_gpu else 0, cpus=host_cpu_count())
        self._installing: str | None = None
        self._error: str | None = None
        self._versions: dict[tuple[Path, int], str | None] = {}
        self._tables: dict[tuple[Path, str], FlagTable] = {}
        self._table: FlagTable | None = None
        # One reader at a time: reading a release's options costs ~10 s of CPU.
        self._table_lock = threading.Lock()
        self._reading = False

    @property
    def source_version(self) -> str:
        """The version `install` would install."""
        return self.plan.version

    @property
    def installable_version(self) -> str | None:
        return self.plan.version

    # --- install -------------------------------------------------------------------------------

    def locate(self) -> Path | None:
        """The Python that runs vLLM: the configured one, else the private environment's."""
        if self.explicit is not None:
            if not self.explicit.exists():
                return None
            python = interpreter_of(self.explicit)
            return python if python.exists() else None
        return installed_python(self.cache_dir, self.plan)

    def python(self) -> Path:
        found = self.locate()
        if found is None:
            where = self.explicit or install_root(self.cache_dir, self.plan)
            raise InstallError(f"vLLM is not installed ({where} not found): install the vllm backend first")
        return found

    async def install(self, progress: ProgressCallback | None = None) -> None:
        if self.explicit is not None:
            python = await asyncio.to_thread(self.python)
            if await asyncio.to_thread(read_version, python) is None:
                raise InstallError(f"configured vLLM {self.explicit}: {python} cannot find a vllm distribution")
            await self._record_options()
            return
        self._error = None

        def report(p: Any) -> None:
            self._installing = getattr(p, "phase", "installing")
            if progress is not None:
                progress(p)

        try:
            self._installing = "starting"
            await install_private(self.cache_dir, self.plan, report)
            await self._record_options()
        except InstallError as exc:
            self._error = str(exc).splitlines()[0]
            raise
        finally:
            self._installing = None

    async def _record_options(self) -> None:
        """Make sure the installed release's option list is cached (an environment installed before runnerd
        kept one gets it here, in a process killed if the install is cancelled)."""
        python = await asyncio.to_thread(self.python)
        version = await asyncio.to_thread(read_version, python)
        directory = options_dir(python, self.cache_dir)
        if version is None or await asyncio.to_thread(cache_file(directory, version).is_file):
            return
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        await record_options(python, directory, os.environ)

    async def uninstall(self) -> None:
        """Remove the private environment; a vLLM the operator named is never touched."""
        if self.explicit is None:
            await asyncio.to_thread(shutil.rmtree, install_root(self.cache_dir, self.plan), True)

    def version(self) -> str | None:
        """`<distribution> <version>` from package metadata, cached per interpreter and state of its
        site-packages (pip installing or removing a distribution changes that directory's entries, so an
        upgrade in place is seen, and with it the new release's option list)."""
        python = self.locate()
        if python is None:
            return None
        key = (python, _environment_mtime(python))
        if key not in self._versions:
            self._versions[key] = read_version(python)
        return self._versions[key]

    def build_flags(self) -> FlagTable:
        """Blocking: the allowlist of the installed release, from its own option list (backends/vllm/flags.py,
        `version_flags`), cached beside the install per version (backends/vllm/option_list.py) and here per
        interpreter and version; the pinned release's table when none is installed or its list cannot be read."""
        try:
            python = self.locate()
            version = self.version() if python is not None else None
        except (OSError, subprocess.SubprocessError, InstallError):
            return VLLM_FLAGS
        if python is None or version is None:
            return VLLM_FLAGS
        key = (python, version)
        with self._table_lock:
            table = self._tables.get(key)
            if table is None:
                self._reading = True
                try:
                    options = load_options(python, options_dir(python, self.cache_dir), version)
                except (OSError, InstallError):
                    return VLLM_FLAGS
                finally:
                    self._reading = False
                table = self._tables[key] = version_flags(options.options)
            self._table = table
        return table

    @property
    def flags(self) -> FlagTable:
        """The installed release's allowlist once read (`build_flags`), else the pinned release's table."""
        return self._table or VLLM_FLAGS

    def status(self) -> BackendStatus:
        if self._installing is not None:
            return BackendStatus(state=BackendState.INSTALLING, detail=self._installing)
        if self._error is not None:
            return BackendStatus(state=BackendState.ERROR, detail=self._error)
        try:
            version = self.version()
        except (OSError, subprocess.SubprocessError, InstallError) as exc:
            return BackendStatus(state=BackendState.ERROR,
                                 detail=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if version is None:
            if self.explicit is None:
                return BackendStatus(state=BackendState.NOT_INSTALLED)
            return BackendStatus(state=BackendState.ERROR, detail=f"{self.explicit} has no vllm distribution")
        if not self._reading:  # a read under way (about 10 s) would hold up status and readiness probes
            self.build_flags()  # a new release (installed, upgraded in place) brings its own option list
        return BackendStatus(state=BackendState.INSTALLED, version=version)

    def disk_usage(self) -> int:
        """Bytes of the private environment; 0 for a vLLM the operator installed elsewhere."""
        if self.explicit is not None or self.locate() is None:
            return 0
        return directory_size(install_root(self.cache_dir, self.plan))

    # --- models --------------------------------------------------------------------------------

    def check_model(self, model: ModelRef) -> None:
        if model.format not in self.model_formats:
            raise ModelFormatError(f"vllm serves Hugging Face-format (safetensors) model directories; "
                                   f"{model.name} is in {model.format} format")

    def model_capabilities(self, model: ModelRef) -> frozenset[Capability]:
        """What this backend serves for `model`: rerank needs a scorer (a sequence-classification head)."""
        try:
            scorer = is_scorer(model_config(model.path))
        except ModelConfigError:
            scorer = False
        return self.capabilities if scorer else self.capabilities - {Capability.RERANK}

    def validate_flags(self, flags: Sequence[str], table: FlagTable | None = None) -> list[str]:
        """The installed release's flag table's checks, then this host's bounds on counts
        (backends/vllm/host_limits.py). Never blocks: until the release's option list has been read the
        pinned table answers (configure requests use `validate_flags_for`, which waits for it), and `run`
        checks again against the release's own."""
        table = table or self.flags
        try:
            validated = validate_vllm_flags(table, list(flags))
        except FlagError as exc:
            if self._reading and table is VLLM_FLAGS and "allowlist" in exc.reason:
                raise FlagError(exc.element, f"{exc.reason}; the installed vLLM's own option list is still "
                                "being read (about 10 s, once per release): try again shortly",
                                index=exc.index) from None
            raise
        check_host_flags(table, validated, self.host)
        return validated

    def validate_flags_for(self, flags: Sequence[str], config: BackendConfiguration) -> list[str]:
        """Blocking: checked against the installed release's own table (read from its parser once per
        release, about 10 s the first time), which `run` applies too."""
        return self.validate_flags(flags, self.build_flags())

    def request_problem(self, model: ModelRef, config: BackendConfiguration,
                        payload: Mapping[str, Any]) -> str | None:
        """Why vLLM run with `config` would answer this request wrongly (see backends/vllm/requests.py)."""
        return request_problem(config.runtime_flags, payload)

    def _shape(self, model: ModelRef, config: BackendConfiguration) -> ModelShape:
        return model_shape(model_config(model.path), self.options(config).hf_overrides)

    def max_model_len(self, shape: ModelShape, config: BackendConfiguration) -> int:
        """The configured context size; the daemon's default is capped at what the model was trained for."""
        if config.context_size is not None:
            return config.context_size
        limit = shape.max_position_embeddings
        return min(self.launch.default_context_size, limit) if limit else self.launch.default_context_size

    def default_dtype(self, shape: ModelShape) -> str | None:
        """The operator-level ``--dtype`` (callers may override it with their own ``--dtype``).

        On CPU hosts a float32 model stays float32: vLLM's "auto" would run it in bfloat16, whose CPU
        attention kernel uses AMX on CPUs that advertise it, and on hosts (VMs) that advertise AMX
        without enabling it for the process the engine dies with SIGILL on the first request.
        """
        return "float32" if not self.launch.use_gpu and shape.dtype_bytes == 4 else None

    def _dtype_bytes(self, shape: ModelShape, flags: dict[str, str | bool]) -> ModelShape:
        """The shape with the element size vLLM will compute in (the estimate's weights and KV cache)."""
        chosen = flags.get("--dtype") or self.default_dtype(shape) or "auto"
        size = DTYPE_FLAG_BYTES.get(str(chosen), min(shape.dtype_bytes, 2))  # "auto": 32-bit models run in 16
        return dataclasses.replace(shape, dtype_bytes=size)

    def _kv_cache(self, shape: ModelShape, max_model_len: int, flags: dict[str, str | bool]) -> int:
        """KV-cache bytes on a CPU host: the caller's flag, else the operator's setting, else sized."""
        tuned = flags.get("--kv-cache-memory-bytes")
        if isinstance(tuned, str) and tuned.isdigit():
            return int(tuned)
        if self.launch.kv_cache_space is not None:
            return self.launch.kv_cache_space
        dtype = flags.get("--kv-cache-dtype")
        return kv_cache_bytes(shape, max_model_len, self.launch.kv_cache_sequences,
                              dtype if isinstance(dtype, str) else None)

    # --- run -----------------------------------------------------------------------------------

    async def run(self, endpoint: Endpoint, model: ModelRef, mode: Mode, config: BackendConfiguration,
                  output: RunnerOutput) -> None:
        assert endpoint.path is not None, "vLLM runners listen on a unix socket"
        socket_path = endpoint.path
        self.check_model(model)
        if config.speculative is not None:
            config.speculative.usable_draft(self.name, self.model_formats)
        python = self.python()
        table = await asyncio.to_thread(self.build_flags)
        try:
            # Checked again here, not only at configure time: a stored configuration may be old or hand-edited,
            # or checked before the release's option list was read.
            self.validate_flags(config.runtime_flags, table)
            flags = table.values(config.runtime_flags)
            options = self.options(config)  # a RunnerError when the stored options fail today's checks
            overrides = validate_hf_overrides(options.hf_overrides) if options.hf_overrides is not None else None
        except FlagError as exc:
            raise RunnerError(str(exc), reason="bad_flag") from exc
        try:
            shape = await asyncio.to_thread(self._shape, model, config)
        except ModelConfigError as exc:
            raise RunnerError(f"{model.name}: {exc}", reason="model_load_failed") from exc
        dtype = self.default_dtype(shape)
        shape = self._dtype_bytes(shape, flags)
        max_len = self.max_model_len(shape, config)
        kv = None if self.launch.use_gpu else self._kv_cache(shape, max_len, flags)
        argv = build_argv(python, socket_path, model, mode, config, self.launch, max_model_len=max_len,
                          kv_cache_bytes=kv, hf_overrides=overrides, dtype=dtype)
        tmpdir = await asyncio.to_thread(make_runner_tmpdir)
        try:
            write_site(tmpdir)
            await run_process(argv, env=build_env(self.launch, tmpdir), endpoint=endpoint, output=output,
                              grace=self.stop_grace, cwd=tmpdir, exit_patterns=VLLM_EXIT_PATTERNS)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, tmpdir, True))

    def required_memory(self, model: ModelRef, mode: Mode, config: BackendConfiguration) -> MemoryEstimate:
        """From the safetensors headers, config.json and the settings vLLM would be started with."""
        if model.format not in self.model_formats:
            return MemoryEstimate.unknown(f"vllm cannot serve {model.format} models")
        try:
            shape = self._shape(model, config)
            weights = model_weights(model.path) + draft_weights(config, self.model_formats)
            # Not strict: stored flags were checked against the release's table when configured, and until
            # that table is read again (a daemon start) the pinned one does not know every flag it accepts;
            # those that change memory are in both.
            flags = self.flags.values(config.runtime_flags, strict=False)
        except (ModelConfigError, SafetensorsError, FlagError, OSError) as exc:
            return MemoryEstimate.unknown(f"cannot estimate {model.name}: {exc}")
        file_dtype_bytes = shape.dtype_bytes
        shape = self._dtype_bytes(shape, flags)
        # Weights are held in the compute dtype: a float32 checkpoint run in bfloat16 takes half its bytes.
        weights = weights * shape.dtype_bytes // file_dtype_bytes if shape.dtype_bytes < file_dtype_bytes else weights
        max_len = self.max_model_len(shape, config)
        if self.gpu_total is None:
            kv = self._kv_cache(shape, max_len, flags)
        else:
            dtype = flags.get("--kv-cache-dtype")
            kv = kv_bytes_per_token(shape, dtype if isinstance(dtype, str) else None) * max_len
        utilization = self.options(config).gpu_memory_utilization or self.launch.gpu_memory_utilization
        offload = flags.get("--cpu-offload-gb")
        # Weights are on the host anyway on a CPU host; on a GPU host the offloaded part takes host memory too.
        offload_bytes = int(float(offload) * GiB) if isinstance(offload, str) and self.gpu_total is not None else 0
        return estimate(EstimateInputs(weights=weights, shape=shape, max_model_len=max_len, kv_cache=kv,
                                       gpu_total=self.gpu_total, gpu_memory_utilization=utilization,
                                       cpu_offload=min(offload_bytes, weights)))
