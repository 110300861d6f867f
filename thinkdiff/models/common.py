"""Small helpers shared by the model loaders."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from thinkdiff.config import ModelSource

Model = TypeVar("Model")
_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shared(load: Callable[..., Model], src: ModelSource, **options: Any) -> Model:
    """`load(src, **options)`, once per process for the same loader, model source and options.

    A frozen model that several parts of one process use is then loaded and held once: the
    feature model of mapped shard tasks, the VLM of the features stage and of CoBSAT in the
    pipeline flow (two copies would not fit beside FLUX and the judge on one 80 GB card), and
    FLUX, the VLM and the judge of a nightly run's two evaluations.
    """
    key = (load.__module__, load.__qualname__, src.id, src.revision, src.dtype, tuple(sorted(options.items())))
    with _SHARED_LOCK:  # one load at a time: concurrent tasks asking for one model wait for it
        if key not in _SHARED:
            _SHARED[key] = load(src, **options)
        return _SHARED[key]
