"""Run training through `accelerate launch` in a subprocess, with the resolved config as a file.

The config file is the interface between the orchestrator and the training processes: the same
command scales from one CPU process (tests) to N GPUs (`train.num_processes`) and several nodes
(`train.launch_args`, e.g. ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", ...]).
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from thinkdiff.config import RunConfig, TrainConfig
from thinkdiff.errors import ThinkDiffError
from thinkdiff.storage import atomic_write_bytes, read_manifest
from thinkdiff.train.loop import TrainResult

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.yaml"


class TrainingLaunchError(ThinkDiffError):
    """The training subprocess failed; checkpoints written so far are kept and a rerun resumes."""


def launcher_flags(cfg: TrainConfig) -> list[str]:
    flags = ["--num_processes", str(cfg.num_processes), "--num_machines", "1", "--dynamo_backend", "no",
             "--mixed_precision", cfg.mixed_precision if torch.cuda.is_available() else "no"]
    if not torch.cuda.is_available():
        flags.append("--cpu")
    elif cfg.num_processes > 1:
        flags.append("--multi_gpu")
    return flags + list(cfg.launch_args)


def launch_training(cfg: RunConfig, features_dir: Path, run_dir: Path) -> TrainResult:
    """Train (or resume) in `accelerate launch` subprocesses; returns the complete run's result.

    Raises:
        TrainingLaunchError: the launcher exited non-zero (its output tail is in the message).
    """
    manifest = read_manifest(run_dir)
    if manifest is not None:
        log.info("training run %s is complete (step %d); skipping", run_dir, manifest["step"])
        return TrainResult.of_complete_run(run_dir, manifest)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / RESOLVED_CONFIG
    atomic_write_bytes(config_path, cfg.to_yaml().encode())
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_flags(cfg.train),
        "-m", "thinkdiff", "train", "--config", str(config_path), "--features", str(features_dir),
        "--out", str(run_dir),
    ]
    log.info("launching: %s", " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info("[train] %s", line)
    if proc.returncode != 0:
        raise TrainingLaunchError(
            f"training exited with {proc.returncode} (config {config_path}); checkpoints so far are kept in "
            f"{run_dir / 'checkpoints'} and a rerun resumes. Last output:\n" + "\n".join(tail)
        )
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise TrainingLaunchError(f"training exited cleanly but {run_dir}/manifest.json is missing")
    return TrainResult.of_complete_run(run_dir, manifest)
