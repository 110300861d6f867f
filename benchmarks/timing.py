"""The benchmarks' clock: wall time after the GPU has finished the work queued so far."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> float:
    """`time.perf_counter()` once `device` is idle (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()
