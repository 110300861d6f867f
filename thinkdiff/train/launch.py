"""Run training through `accelerate launch` in a subprocess, with the resolved config as a file.

The config file is the interface between the orchestrator and the training processes: the same
command scales from one CPU process (tests) to N GPUs (`train.num_processes`) and several nodes
(`train.launch_args`, e.g. ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", ...]).

The launcher runs in a process group of its own and ends with the process that started it, however
that one ends (`thinkdiff.processes.spawn`, SIGKILL included): it gets SIGTERM, which ends its workers
too: accelerate's single-process launcher shares its group with its worker, and torchrun's elastic
agent (multi-GPU) stops its workers, which run in sessions of their own, when it gets SIGTERM. A
rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from thinkdiff.config import RunConfig, TrainConfig
from thinkdiff.errors import ThinkDiffError
from thinkdiff.processes import spawn, stop_process_group
from thinkdiff.storage import atomic_write_bytes, read_manifest
from thinkdiff.train.loop import RUN_LOCK_ENV, TrainResult, hold_run_directory

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.yaml"
# torchrun's agent gives its workers 30 s between SIGTERM and SIGKILL (LocalElasticAgent's shutdown_timeout):
# the launcher gets longer, so that it is not killed before they are.
STOP_GRACE_S = 45.0


class TrainingLaunchError(ThinkDiffError):
    """The training subprocess failed; checkpoints written so far are kept and a rerun resumes."""


def launcher_flags(cfg: TrainConfig) -> list[str]:
    flags = ["--num_processes", str(cfg.num_processes), "--num_machines", "1", "--dynamo_backend", "no",
             "--mixed_precision", cfg.mixed_precision if torch.cuda.is_available() else "no"]
    if not torch.cuda.is_available():
        # What accelerate would pick (physical cores per process), given so that it does not warn it picked it.
        threads = max(1, (psutil.cpu_count(logical=False) or 1) // cfg.num_processes)
        flags += ["--cpu", "--num_cpu_threads_per_process", str(threads)]
    elif cfg.num_processes > 1:
        flags.append("--multi_gpu")
    return flags + list(cfg.launch_args)


def launch_training(cfg: RunConfig, features_dir: Path, run_dir: Path, *, wait: bool = False) -> TrainResult:
    """Train (or resume) in `accelerate launch` subprocesses; returns the complete run's result.
    This process holds the run directory's lock for them, as long as they run (`hold_run_directory`).

    Raises:
        RunDirectoryBusy: another training holds `run_dir` (and `wait` is False: else this waits for it).
        TrainingLaunchError: the launcher exited non-zero (its output tail is in the message).
    """
    complete = read_manifest(run_dir) is not None  # read without the lock: a complete run is not written again
    with contextlib.nullcontext() if complete else hold_run_directory(run_dir, wait=wait) as lock_fd:
        return _launch(cfg, features_dir, run_dir, lock_fd)


def _launch(cfg: RunConfig, features_dir: Path, run_dir: Path, lock_fd: int | None) -> TrainResult:
    manifest = read_manifest(run_dir)  # again: the training waited for may have completed the run
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_LOCK_ENV: str(run_dir.resolve())}  # held here, for them
    # The launcher's supervisor gets the lock too: killed, this process frees it no earlier than the
    # launcher and its workers have ended (a second training must not start while they still write).
    returncode, tail = run_launcher(command, env, pass_fds=(lock_fd,) if lock_fd is not None else ())
    if returncode != 0:
        raise TrainingLaunchError(
            f"training exited with {returncode} (config {config_path}); checkpoints so far are kept in "
            f"{run_dir / 'checkpoints'} and a rerun resumes. Last output:\n" + "\n".join(tail)
        )
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise TrainingLaunchError(f"training exited cleanly but {run_dir}/manifest.json is missing")
    return TrainResult.of_complete_run(run_dir, manifest)


def run_launcher(command: list[str], env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> tuple[int, collections.deque[str]]:
    """Run `command` (an `accelerate launch`) with its output logged line by line; returns its exit
    code and its last 30 lines. It ends with this process (the module docstring says how); when this
    thread is interrupted (Ctrl-C, a cancellation), the launcher and its workers are stopped first."""
    log.info("launching: %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = spawn(command, grace_s=STOP_GRACE_S, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                 pass_fds=pass_fds)
    with proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    tail.append(line)
                    log.info("[train] %s", line)
        except BaseException:
            stop_process_group(proc, grace_s=STOP_GRACE_S)
            raise
    return proc.returncode, tail
