"""The estimate's tuning parameters, shared by GET /models/{name}/estimate and `runnerd estimate`
(kept out of runnerd.api so the CLI can read it without importing the daemon's HTTP layer). Each
backend says which it understands and which runtime flag each stands for (`estimate_parameters`)."""

ESTIMATE_PARAMS = ("parallel", "cache_type_k", "cache_type_v", "gpu_layers", "flash_attn", "batch_size",
                   "ubatch_size")
