"""What the host has: GPUs through NVML. No driver or no GPU is simply zero GPUs."""

from __future__ import annotations

import logging

log = logging.getLogger("runnerd.node")


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no device: all mean "no GPU" here
        log.debug("NVML unavailable: %s", exc)
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("NVML shutdown failed: %s", exc)
