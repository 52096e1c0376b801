"""Lines llama-server prints when it fails, and what they mean to a user."""

from __future__ import annotations

import re

from backends.process import ExitPatterns

LLAMACPP_EXIT_PATTERNS: ExitPatterns = (
    ("out_of_memory", re.compile(r"unable to allocate|failed to allocate .*buffer|cudaMalloc failed|"
                                 r"out of memory", re.I),
     "llama-server ran out of memory while loading the model"),
    ("bad_flag", re.compile(r"error while handling argument|invalid argument|unknown argument", re.I),
     "llama-server refused a command-line flag"),
    ("model_load_failed", re.compile(r"failed to load model|error loading model|llama_model_load: error|"
                                     r"gguf_init_from_file|unknown model architecture", re.I),
     "llama-server failed to load the model"),
    ("address_in_use", re.compile(r"couldn't bind|address already in use", re.I),
     "llama-server could not listen on its socket"),
)
