"""The backends this daemon offers, built from its settings (the seam where new engines plug in)."""

from __future__ import annotations

from backends.base import Backend
from backends.llamacpp import LaunchOptions, LlamaCppBackend
from backends.llamacpp.install import cuda_available
from runnerd.config import Settings
from runnerd.node import gpu_count


def default_backends(settings: Settings) -> dict[str, Backend]:
    gpus = gpu_count()
    llama = settings.llamacpp
    cuda = llama.cuda == "on" or (llama.cuda == "auto" and cuda_available(gpus))
    launch = LaunchOptions(threads=llama.threads, gpu_layers=llama.gpu_layers, use_gpu=cuda and gpus > 0,
                           default_context_size=settings.default_context_size)
    backend = LlamaCppBackend(cache_dir=settings.cache_dir, binary=llama.server, launch=launch, cuda=cuda,
                              stop_grace=settings.stop_grace)
    return {backend.name: backend}
