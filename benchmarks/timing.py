"""The benchmarks' clock (wall time after the GPU has finished the work queued so far), and a
count of the times a piece of work makes the CPU wait for the GPU."""

from __future__ import annotations

import time
import warnings

import torch


def sync(device: torch.device) -> float:
    """`time.perf_counter()` once `device` is idle (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def host_syncs(fn) -> int:
    """How many times `fn` makes the CPU wait for the GPU (CUDA's sync debug mode, warning per sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
