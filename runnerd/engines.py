"""The backends this daemon offers, built from its settings (the seam where new engines plug in)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from backends.base import Backend
from backends.llamacpp import GpuDevice, LaunchOptions, LlamaCppBackend
from backends.llamacpp.install import cuda_available
from backends.vllm import VllmBackend, VllmLaunch
from backends.vllm.install import default_plan
from runnerd.config import Settings
from runnerd.gpus import GpuInfo, gpu_count, read_gpus


def default_backends(settings: Settings) -> dict[str, Backend]:
    gpus = gpu_count()
    llama = settings.llamacpp
    cuda = llama.cuda == "on" or (llama.cuda == "auto" and cuda_available(gpus))
    launch = LaunchOptions(threads=llama.threads, gpu_layers=llama.gpu_layers, use_gpu=cuda and gpus > 0,
                           default_context_size=settings.default_context_size,
                           prompt_cache_mib=llama.prompt_cache_mib)
    backend = LlamaCppBackend(cache_dir=settings.cache_dir, binary=llama.server, launch=launch, cuda=cuda,
                              stop_grace=settings.stop_grace, gpus=llamacpp_gpus if launch.use_gpu else None)
    vllm = vllm_backend(settings, gpus)
    return {backend.name: backend, vllm.name: vllm}


def visible(gpus: Sequence[GpuInfo], spec: str | None) -> list[GpuInfo]:
    """The GPUs a runner sees, in CUDA's order: CUDA_VISIBLE_DEVICES (passed on to engines, see
    backends/llamacpp/argv.py build_env) lists NVML indices or UUID prefixes; unset means all of them.
    An entry that names no GPU ends the list, as in CUDA."""
    if spec is None:
        return list(gpus)
    found: list[GpuInfo] = []
    for entry in (e.strip() for e in spec.split(",")):
        match = next((g for g in gpus if (entry.isdigit() and g.index == int(entry))
                      or (entry.startswith("GPU-") and g.uuid.startswith(entry))), None)
        if match is None:
            break
        found.append(match)
    return found


def llamacpp_gpus() -> list[GpuDevice]:
    """llama.cpp's view of the GPUs now: NVML index and free memory (its default layer split follows
    free memory), in the order llama-server numbers them."""
    gpus, _ = read_gpus()
    return [GpuDevice(index=g.index, free_bytes=g.memory_free_bytes)
            for g in visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))]


def vllm_backend(settings: Settings, gpus: int) -> VllmBackend:
    cfg = settings.vllm
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    gpu_total = None
    if use_gpu:
        found, _ = read_gpus()
        gpu_total = found[0].memory_total_bytes if found else None
    launch = VllmLaunch(use_gpu=use_gpu, default_context_size=settings.default_context_size,
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        kv_cache_space=int(cfg.kv_cache_space) if cfg.kv_cache_space is not None else None,
                        kv_cache_sequences=cfg.kv_cache_sequences, enforce_eager=cfg.enforce_eager,
                        cache_root=settings.cache_dir / "vllm" / "cache")
    plan = default_plan(use_gpu, package=cfg.package, version=cfg.version, torch=cfg.torch)
    return VllmBackend(cache_dir=settings.cache_dir, python=cfg.python, launch=launch, plan=plan,
                       stop_grace=settings.stop_grace, gpu_total=gpu_total)
