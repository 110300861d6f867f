"""The only place an Accelerator is built (one process on CPU in tests; N GPUs / nodes via `accelerate launch`)."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

__all__ = ["Accelerator", "gather_object", "make_accelerator"]  # accelerate is imported here only

from thinkdiff.config import TrainConfig

log = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """bf16 autocast on GPU when `train.mixed_precision=bf16`; plain fp32 on CPU (autocast there is slow)."""
    on_gpu = torch.cuda.is_available()
    mixed = cfg.mixed_precision if on_gpu else "no"
    if cfg.mixed_precision == "bf16" and not on_gpu:
        log.warning("train.mixed_precision=bf16 has no effect without a GPU; training in fp32")
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)
