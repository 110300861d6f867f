"""Training checkpoints: `checkpoints/step_{step:06d}/` holding

    aligner/            config.json + model.safetensors (Aligner.save_pretrained)
    trainer_state.pt    optimizer, scheduler, data position, and every process's global CPU and GPU
                        generator states (`rng_cpu`, `rng_cuda`: lists in rank order; the frozen
                        T5's dropout draws from them), every process's open logging window
                        (`log_window`: its sums, `LogWindow.sums`); tensors and plain values only,
                        read back with torch.load(weights_only=True)
    meta.json           resolved config, step, loss, feature-store fingerprint, git revision

A checkpoint is written into a temporary directory and renamed when complete, so a directory named
`step_*` is always whole; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from thinkdiff.errors import DataContractError, first_line
from thinkdiff.models.aligner import Aligner
from thinkdiff.storage import atomic_write_json, disk_full_error, flush_to_disk, stop_when_full, temp_dir_for

log = logging.getLogger(__name__)

ALIGNER_DIR = "aligner"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
KEPT_CHECKPOINTS = "the checkpoints completed before it are kept, and training resumes from the newest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META_FILE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: Path,
    *,
    step: int,
    aligner: Aligner,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write one complete checkpoint atomically, then prune older ones beyond `keep_last`.

    Raises:
        DiskFullError: the disk holding `root` ran out of space; the partial checkpoint is removed.
    """
    final = root / checkpoint_name(step)
    if final.exists():
        raise FileExistsError(f"{final} exists; a checkpoint is never overwritten")
    with stop_when_full(root, KEPT_CHECKPOINTS):
        tmp = temp_dir_for(final)
    try:
        aligner.save_pretrained(tmp / ALIGNER_DIR)
        torch.save(trainer_state, tmp / STATE_FILE)
        flush_to_disk(tmp / STATE_FILE)
        atomic_write_json(tmp / META_FILE, {**meta, "step": step})
        os.replace(tmp, final)
    except BaseException as error:
        # Judged before the partial checkpoint goes: torch.save's failure carries no errno, and the
        # free space its bytes left is what tells a full disk.
        full = disk_full_error(error, root, KEPT_CHECKPOINTS)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
        log.info("removed old checkpoint %s (keep_last=%d)", old.name, keep_last)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataContractError(f"{path} missing: the checkpoint is incomplete; "
                                f"delete {checkpoint} to resume from the one before") from None
    except PermissionError as error:  # not damaged: deleting it would lose a good checkpoint
        raise DataContractError(f"{path} cannot be read ({first_line(error)}): give this user read access "
                                f"to {checkpoint}") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # A truncated or empty file (torch raises RuntimeError or OSError: "PytorchStreamReader failed
        # reading zip archive"), one the disk cannot read back, or not a torch file.
        raise DataContractError(f"{path} is unreadable ({first_line(error)}): delete {checkpoint} "
                                "to resume from the checkpoint before it") from None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / META_FILE).read_text())


def remove_partial_checkpoints(root: Path) -> None:
    """Temporary directories of checkpoints whose writer died; complete ones are untouched."""
    if root.is_dir():
        for tmp in root.glob(".step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
