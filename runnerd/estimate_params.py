"""The estimate's tuning parameters, shared by GET /models/{name}/estimate and `runnerd estimate`
(kept out of runnerd.api so the CLI can read it without importing the daemon's HTTP layer)."""

# query parameter / CLI option -> the engine flag it stands for; each value is validated like a runtime flag.
FLAG_PARAMS = {
    "parallel": "--parallel",
    "cache_type_k": "--cache-type-k",
    "cache_type_v": "--cache-type-v",
    "gpu_layers": "--gpu-layers",
    "flash_attn": "--flash-attn",
    "batch_size": "--batch-size",
    "ubatch_size": "--ubatch-size",
}
