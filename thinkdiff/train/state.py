"""What a training run carries from one step to the next (`thinkdiff.train.loop`): the step, the data
position, the logging window and the last checkpoint. A checkpoint stores the step, the data
position and the open logging window's sums, so a resumed run logs the rows an uninterrupted one does."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinkdiff.train.data import Batch, BatcherState


@dataclass
class LogWindow:
    """This process's batches since the last log line. The logged loss is their token mean: the
    summed token losses over their target tokens. The loss sum stays on the device: reading it every
    step would make the CPU wait for the GPU."""

    loss_sum: torch.Tensor
    loss_tokens: int = 0
    steps: int = 0
    samples: int = 0
    """Over all processes (each trains on its slice of the same global batch), as is `tokens`."""
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    untimed: tuple[int, int, int] = (0, 0, 0)
    """The (steps, samples, tokens) counted before `start`: a resumed window's, trained before the
    checkpoint, which the rates leave out."""

    @classmethod
    def open(cls, device: torch.device) -> LogWindow:
        return cls(loss_sum=torch.zeros((), device=device))

    def sums(self) -> dict[str, Any]:
        """What a checkpoint keeps of the window (the loss sum as is, so a resumed run adds to the
        very value an uninterrupted run would: its logged losses are the same bitwise)."""
        return {"loss_sum": self.loss_sum.detach().cpu(), "loss_tokens": self.loss_tokens, "steps": self.steps,
                "samples": self.samples, "tokens": self.tokens}

    @classmethod
    def resumed(cls, sums: dict[str, Any], device: torch.device) -> LogWindow:
        """The window a checkpoint's `sums` left open, its clock starting now."""
        window = cls(loss_sum=sums["loss_sum"].to(device), loss_tokens=sums["loss_tokens"], steps=sums["steps"],
                     samples=sums["samples"], tokens=sums["tokens"])
        window.untimed = (window.steps, window.samples, window.tokens)
        return window

    def add(self, loss: torch.Tensor, batch: Batch, world: int) -> None:
        """Count one step: `loss` is `batch`'s token-mean loss, on the device."""
        self.loss_sum += loss * batch.num_target_tokens
        self.loss_tokens += batch.num_target_tokens
        self.steps += 1
        self.samples += batch.labels_BT.shape[0] * world
        self.tokens += batch.num_target_tokens * world


@dataclass
class TrainState:
    """The run's position: what the loop advances each step and a checkpoint resumes from."""

    step: int
    batcher: BatcherState
    """The data position after the last step's batch."""
    window: LogWindow
    last_checkpoint: Path | None
    """The newest checkpoint this process knows of (only the main process writes them)."""
    loss: float | None = None
    """The loss of the last logging window (None until one closes)."""
