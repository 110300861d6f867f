"""Train the aligner against the frozen T5 decoder from a feature store (docs/method.md, Training).

    thinkdiff train --config tiny                       # one process (CPU or one GPU)
    accelerate launch -m thinkdiff train --config run.yaml   # N GPUs / nodes

Loop: stream samples -> split (masked split, or caption split for CLIP) -> length-bucketed batches ->
aligner -> T5 decoder loss (summed over target tokens, divided by the bucketing pool's mean tokens
per batch: `thinkdiff.train.data`, Loss weight) -> AdamW step -> log -> checkpoint every K steps.
The frozen T5 runs with its dropout when `train.t5_dropout` is set, drawing from torch's global
generators, which each process seeds with `train.seed + rank` as the official release does and a
checkpoint saves per process. A rerun of the same config resumes from the newest checkpoint and ends
with the same weights and metrics.jsonl rows as an uninterrupted run (bitwise on CPU; unit tests check it).
One training at a time writes a run directory: a second is refused, naming the holder, or with
`wait` waits for it (`hold_run_directory`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from thinkdiff.config import RunConfig, TrainConfig
from thinkdiff.data.features import FeatureStore
from thinkdiff.errors import ConfigError, DataContractError, ThinkDiffError
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.t5 import T5Parts, key_mask_4d, load_t5, padded_slots
from thinkdiff.models.vlm import load_vlm_tokenizer
from thinkdiff.plots import plot_loss_curve
from thinkdiff.storage import (
    atomic_write_bytes,
    exclusive,
    git_revision,
    read_jsonl,
    read_manifest,
    recorded_location,
    recorded_path,
    stage_root,
    train_fingerprint,
    upstream_fingerprint,
    write_manifest,
)
from thinkdiff.train.checkpoint import (
    ALIGNER_DIR,
    latest_checkpoint,
    load_trainer_state,
    read_meta,
    remove_partial_checkpoints,
    save_checkpoint,
)
from thinkdiff.train.data import (
    Batch,
    Batcher,
    BatcherState,
    CaptionSplitCollator,
    MaskedSplitCollator,
    Sample,
    lvlm_usable,
    prefetched,
)
from thinkdiff.train.engine import Accelerator, gather_object, make_accelerator
from thinkdiff.train.live import LiveTrainingRun
from thinkdiff.train.state import LogWindow, TrainState

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

RUN_LOCK_ENV = "THINKDIFF_RUN_LOCK"
"""Set by the launcher, for the training processes it starts, to the run directory whose lock it holds."""

Collator = CaptionSplitCollator | MaskedSplitCollator


class RunDirectoryBusy(ThinkDiffError):
    """Another training holds the run directory: two writers would duplicate and lose metrics rows
    and record a wrong final loss."""


def run_lock_path(run_dir: Path) -> Path:
    """The run directory's lock, beside it: taking it creates no run directory, so a run refused for
    its inputs leaves none."""
    return run_dir.parent / f".{run_dir.name}.lock"


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def hold_run_directory(run_dir: Path, *, wait: bool = False) -> Iterator[int | None]:
    """Be the one training that writes `run_dir` while inside: a second is refused at once with
    RunDirectoryBusy naming the holder (pid and host), or with `wait` waits for it. The lock (flock)
    goes with the process that holds it, killed or not. Held by the process that lives as long as the
    run: the launcher, for the `accelerate launch` processes it starts (they find RUN_LOCK_ENV), else
    this process, or rank 0 of processes launched by hand (the ranks must not contend for it).
    Yields the lock's file descriptor (None where another process holds it for this one)."""
    if os.environ.get(RUN_LOCK_ENV) == str(run_dir.resolve()) or os.environ.get("RANK", "0") != "0":
        yield None
        return
    lock = run_lock_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    waiting = f"{run_dir} is being trained by {_lock_holder(lock)}; waiting for it to finish (--wait)"
    with exclusive(lock, waiting, wait=wait, holder=f"pid {os.getpid()} on {socket.gethostname()}") as held:
        if held is None:  # (a descriptor may be 0)
            raise RunDirectoryBusy(f"{run_dir} is being trained by {_lock_holder(lock)}: wait for it, or pass --wait")
        yield held


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    """The newest checkpoint; its `aligner/` subdirectory loads with Aligner.from_pretrained."""
    step: int
    loss: float | None
    """Token-mean loss over the last logging window (a complete run's: the one its manifest records)."""

    @property
    def aligner_dir(self) -> Path:
        return self.checkpoint / ALIGNER_DIR

    @property
    def loss_curve(self) -> Path:
        return self.run_dir / LOSS_CURVE_FILE

    @classmethod
    def of_complete_run(cls, run_dir: Path, manifest: dict) -> TrainResult:
        """The result a complete run's manifest records."""
        return cls(run_dir=run_dir, checkpoint=recorded_location(manifest["checkpoint"], run_dir),
                   step=manifest["step"], loss=manifest["loss"])


def lr_multiplier(cfg: TrainConfig):
    """Linear warmup from warmup_start_lr to lr, then cosine from lr toward final_lr, reached at
    lr_horizon_steps; training stops at max_steps, before it when the horizon lies beyond (the
    release's cosine spans max_epoch x iters_per_epoch = 200,000 steps of a 25,000-step run)."""

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            lr = cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
        else:
            progress = (step - cfg.warmup_steps) / max(1, cfg.lr_horizon_steps - cfg.warmup_steps)
            lr = cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return lr / cfg.lr

    return multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and 1-D parameters (the norm) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def encoder_states(aligner: torch.nn.Module, t5_encoder: torch.nn.Module | None,
                   batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen T5 decoder attends to, packed, with its slots (`T5DecoderLM.loss`): the
    aligned rows (LVLM), or for ThinkDiff-CLIP each sample's `[aligner(image tokens) ;
    T5enc(caption part 1)]`, the prefix rows after the aligned ones (still padded: few and short)."""
    rows, slots = aligner(batch.features_RD.float()), batch.source_slots_BS
    if batch.prefix_ids_BP is None:
        return rows, slots
    with torch.no_grad():
        prefix = t5_encoder(input_ids=batch.prefix_ids_BP,
                            attention_mask=key_mask_4d(batch.prefix_mask_BP)).last_hidden_state
    return (torch.cat([rows, prefix.flatten(0, 1).to(rows.dtype)]),
            torch.cat([slots, padded_slots(batch.prefix_mask_BP, first_row=rows.shape[0])], dim=1))


def build_aligner(cfg: TrainConfig, in_dim: int, out_dim: int, norm_weight: torch.Tensor) -> Aligner:
    """The aligner a run starts from, drawn from its own generator seeded with `train.seed` (the
    global one is dropout's): Linear layers at `train.aligner_init`, the output norm a copy of the
    T5 encoder's final_layer_norm."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        aligner = Aligner(AlignerConfig(in_dim=in_dim, out_dim=out_dim))
        if cfg.aligner_init == "normal":
            aligner.init_linears_normal()
    aligner.init_norm_from(norm_weight)
    return aligner


def train_step(aligner: torch.nn.Module, t5: T5Parts, batch: Batch, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, accelerator: Accelerator) -> torch.Tensor:
    """One optimizer step on `batch` (already on the device); returns the batch's token-mean loss,
    detached, on the device. The gradient is that of the summed token loss over `batch.loss_tokens`
    (`Batch.loss_weight`). Nothing here makes the CPU wait for the GPU, so the CPU queues the next
    step's work while the GPU runs this one."""
    with accelerator.autocast():
        rows, slots = encoder_states(aligner, t5.encoder, batch)
        loss = t5.decoder_lm.loss(rows, slots, batch.labels_BT, batch.target_positions_N)
    accelerator.backward(loss * batch.loss_weight)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class TrainSetup:
    """A run's fixed parts, built once per call whether it starts or resumes (`TrainState` holds what moves)."""

    train: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    store: FeatureStore
    t5: T5Parts
    collate: Collator
    usable: Callable[[Sample], bool]
    """Which samples the collator can split (`Batcher`)."""
    aligner: torch.nn.Module
    """As `accelerator.prepare` returned it: wrapped when several processes train."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    meta: dict[str, Any]
    """What every checkpoint's meta.json and the run's manifest record of its inputs and settings."""
    live: LiveTrainingRun | None = None
    """The MLflow run shown while it trains (main process, `tracking.live_training`)."""

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def batches_from(self, position: BatcherState) -> Batcher:
        """The batches from `position` on. Every process draws the same global batches and keeps its
        own slice, so the data order does not depend on the number of processes."""
        t = self.train
        return Batcher(self.store, self.collate, self.usable, seed=t.seed, batch_size=t.batch_size,
                       world=self.world, rank=self.accelerator.process_index, window=t.bucket_window, state=position,
                       pin_memory=self.on_gpu)


def train_aligner(cfg: RunConfig, features_dir: Path, run_dir: Path, *,
                  stop_after_steps: int | None = None, wait: bool = False) -> TrainResult:
    """Train (or resume training) the aligner into `run_dir`; returns the newest checkpoint.

    Args:
        cfg: the resolved config; `cfg.train` drives the loop.
        features_dir: a complete feature store.
        run_dir: where checkpoints, metrics and the manifest go (the stage directory).
        stop_after_steps: stop (with a checkpoint) once this step is reached, as a preempted job
            would; the next call resumes. Used by tests; None runs to `train.max_steps`.
        wait: while another training holds `run_dir`, wait for it rather than be refused.

    Raises:
        RunDirectoryBusy: another training holds `run_dir` (and `wait` is False).
        FileNotFoundError / DataContractError: the feature store is missing, incomplete, was
            made by another model than `models.vlm`, or keeps fewer rows than train.max_source_rows.
    """
    fingerprint = train_fingerprint(cfg, features_dir)
    completed = _completed_run(run_dir, read_manifest(run_dir, "train"), fingerprint)
    if completed is not None:  # read-only: needs no lock
        return completed
    with hold_run_directory(run_dir, wait=wait):
        # Read again under the lock: the training waited for may have completed the run.
        completed = _completed_run(run_dir, read_manifest(run_dir, "train"), fingerprint)
        if completed is not None:
            return completed
        setup = _set_up(cfg, features_dir, run_dir, fingerprint)
        state = _start_or_resume(setup)
        # After the resume, which drops the metrics rows it will log again: a live MLflow run that holds
        # such rows is not continued (registration would find them twice).
        setup.live = LiveTrainingRun.start(cfg, run_dir, setup.meta) if setup.accelerator.is_main_process else None
        try:
            return _train(setup, state, stop_after_steps)
        finally:
            if setup.live is not None:
                setup.live.close()


def _train(setup: TrainSetup, state: TrainState, stop_after_steps: int | None) -> TrainResult:
    """Train from `state` (step 0 or the newest checkpoint) to train.max_steps (or `stop_after_steps`)."""
    run_dir = setup.run_dir
    t = setup.train
    target_step = min(t.max_steps, stop_after_steps) if stop_after_steps is not None else t.max_steps
    setup.aligner.train()
    # Bars only on a terminal (disable=None); logs and pipes get the periodic log line with rate and ETA.
    progress = tqdm(total=t.max_steps, initial=state.step, desc="train", unit="step",
                    disable=None if setup.accelerator.is_main_process else True, dynamic_ncols=True)
    log.info("training %s: step %d -> %d, batch %d (%d per process x %d), %d samples in store", run_dir, state.step,
             target_step, t.batch_size, t.batch_size // setup.world, setup.world, setup.store.num_samples)
    # A bucketing pool's worth of batches ahead (the batcher reads and splits a pool at once), plus one.
    with prefetched(setup.batches_from(state.batcher), depth=t.bucket_window + 1, device=setup.device) as batches:
        while state.step < target_step:
            cpu_batch, state.batcher = next(batches)
            loss = train_step(setup.aligner, setup.t5, cpu_batch.to(setup.device, non_blocking=setup.on_gpu),
                              setup.optimizer, setup.scheduler, setup.accelerator)
            state.step += 1
            progress.update(1)
            state.window.add(loss, cpu_batch, setup.world)
            closes = state.step % t.log_every == 0 or state.step == t.max_steps
            if closes or state.step == target_step:
                # A stop between logging steps logs its open window without closing it: the
                # checkpoint keeps it, and the resumed run drops that row and logs the window whole.
                _log_window(setup, state, progress, close=closes)
            if state.step % t.checkpoint_every == 0 or state.step == target_step:
                _save_checkpoint(setup, state)
    progress.close()
    return _finish(setup, state)


def _completed_run(run_dir: Path, manifest: dict[str, Any] | None, fingerprint: str) -> TrainResult | None:
    """The result of this config's complete run in `run_dir` (its train `manifest`), or None when it
    is not complete. A run of other settings there, complete or not, is refused."""
    if manifest is not None:
        _refuse_another_run(run_dir, manifest.get("train_fingerprint"), fingerprint)
        log.info("training run %s is complete (step %d); skipping", run_dir, manifest["step"])
        return TrainResult.of_complete_run(run_dir, manifest)
    newest = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    if newest is not None:  # before anything loads or is cleaned up in that directory
        _refuse_another_run(run_dir, _recorded_fingerprint(newest), fingerprint)
    return None


def _set_up(cfg: RunConfig, features_dir: Path, run_dir: Path, fingerprint: str) -> TrainSetup:
    """Check the settings against the processes launched and the feature store, then load and build
    what trains."""
    t = cfg.train
    if t.decoder_attention == "flex" and t.t5_dropout:
        raise ConfigError("train.decoder_attention=flex runs the T5 decoder without dropout (FlexAttention has none), "
                          "but train.t5_dropout=true asks for it: use train.decoder_attention=sdpa, or set "
                          "train.t5_dropout=false")
    accelerator = make_accelerator(t)
    if t.decoder_attention == "flex" and accelerator.device.type != "cuda":
        raise ConfigError(f"train.decoder_attention=flex needs a CUDA GPU (FlexAttention has no backward on "
                          f"{accelerator.device.type}): use train.decoder_attention=sdpa")
    world = accelerator.num_processes
    if t.batch_size % world:  # `accelerate launch` may start another count than train.num_processes
        raise ConfigError(f"train.batch_size={t.batch_size} (the global batch) does not split over the {world} "
                          f"processes launched: use a multiple of {world}, or launch as many processes as divide it")
    store = _open_store(cfg, features_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # once its input is known good: a refused run leaves no directory
    t5, collate = _frozen_t5_and_collator(cfg, accelerator.device)
    aligner = build_aligner(t, store.info.dim, t5.decoder_lm.d_model, t5.encoder_final_norm)
    optimizer = torch.optim.AdamW(param_groups(aligner, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t))
    aligner, optimizer = accelerator.prepare(aligner, optimizer)
    # When the run began, kept across resumes, so that its MLflow run's duration covers all its steps.
    earlier = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    started_at = (read_meta(earlier).get("started_at") if earlier is not None else None) or time.time()
    meta = {
        "started_at": started_at,
        "config": cfg.to_dict(),
        "features_dir": recorded_path(features_dir, stage_root(cfg)),
        "features_fingerprint": upstream_fingerprint(cfg, "features", features_dir),
        "corpus_fingerprint": store.manifest.get("corpus_fingerprint"),
        "train_fingerprint": fingerprint,
        "git_revision": git_revision(),
    }
    usable = collate.usable if isinstance(collate, CaptionSplitCollator) else lvlm_usable
    return TrainSetup(train=t, run_dir=run_dir, accelerator=accelerator, store=store, t5=t5, collate=collate,
                      usable=usable, aligner=aligner, optimizer=optimizer, scheduler=scheduler, meta=meta)


def _open_store(cfg: RunConfig, features_dir: Path) -> FeatureStore:
    """The feature store, made by the variant's feature model and keeping the rows the split needs."""
    t, clip = cfg.train, cfg.variant == "clip"
    store = FeatureStore(features_dir, expect_model_id=(cfg.models.vision if clip else cfg.models.vlm).id)
    stored_rows = store.info.max_feature_rows
    if not clip and stored_rows < t.max_source_rows:  # a split past the stored rows would have no features
        raise DataContractError(
            f"{features_dir}: the store keeps {stored_rows} feature rows per sample, fewer than "
            f"train.max_source_rows={t.max_source_rows}: set train.max_source_rows={stored_rows}, or extract the "
            f"features again with features.max_feature_rows={t.max_source_rows}")
    return store


def _frozen_t5_and_collator(cfg: RunConfig, device: torch.device) -> tuple[T5Parts, Collator]:
    """The frozen T5 as `cfg.train` runs it, and the collator that splits samples into its inputs and
    targets: the caption split for ThinkDiff-CLIP, the masked split for ThinkDiff-LVLM."""
    t, clip = cfg.train, cfg.variant == "clip"
    t5 = load_t5(cfg.models.t5, device=device, keep_encoder=clip)
    t5.decoder_lm.set_attention(t.decoder_attention)
    t5.decoder_lm.set_dropout(t.t5_dropout)
    if t.compile:
        t5.decoder_lm.compile_decoder()
    if clip:
        # The release trains with its whole T5 in train mode (`set_dropout`): the encoder of caption part 1 too.
        t5.encoder.train(t.t5_dropout)
        return t5, CaptionSplitCollator(t5.tokenizer, max_prefix_tokens=t.max_prefix_tokens,
                                        max_target_tokens=t.max_target_tokens, seed=t.seed,
                                        blip_captions=t.blip_captions)
    return t5, MaskedSplitCollator(
        load_vlm_tokenizer(cfg.models.vlm), t5.tokenizer,
        max_source_rows=t.max_source_rows, max_target_tokens=t.max_target_tokens, seed=t.seed,
    )


def _start_or_resume(setup: TrainSetup) -> TrainState:
    """Step 0, or where the newest complete checkpoint left off: weights, optimizer, schedule, data
    position, this process's random generators and its open logging window. Metric lines past the
    window's start are dropped: the window's row is logged again, whole."""
    accelerator, rank = setup.accelerator, setup.accelerator.process_index
    step, batcher_state, window = 0, BatcherState(), LogWindow.open(setup.device)
    logged_step = 0
    remove_partial_checkpoints(setup.checkpoints)
    resume_from = latest_checkpoint(setup.checkpoints)
    # Dropout draws from torch's global generators: seeded per process as the release's
    # setup_seeds does (train.py at 3ed85e6: run seed + rank), restored from the checkpoint on resume.
    torch.manual_seed(setup.train.seed + rank)
    if resume_from is not None:
        saved = load_trainer_state(resume_from)
        saved_weights = Aligner.from_pretrained(resume_from / ALIGNER_DIR).state_dict()
        accelerator.unwrap_model(setup.aligner).load_state_dict(saved_weights)
        setup.optimizer.load_state_dict(saved["optimizer"])
        setup.scheduler.load_state_dict(saved["scheduler"])
        step, batcher_state = saved["step"], BatcherState(**saved["batcher"])
        restore_rng(saved, rank, setup.world, setup.device, setup.train.seed, step)
        windows = saved.get("log_window", [])  # none in a checkpoint of an older version: an empty window
        logged_step = step - windows[0]["steps"] if windows else step  # rank 0's: the one metrics.jsonl logs
        if len(windows) == setup.world:  # else restore_rng warned: the run is no longer the uninterrupted one
            window = LogWindow.resumed(windows[rank], setup.device)
        log.info("resuming %s from %s (step %d, epoch %d, sample %d)", setup.run_dir, resume_from.name, step,
                 batcher_state.epoch, batcher_state.index)
    _truncate_metrics(setup.run_dir / METRICS_FILE, logged_step, accelerator.is_main_process)
    return TrainState(step=step, batcher=batcher_state, window=window, last_checkpoint=resume_from)


def _log_window(setup: TrainSetup, state: TrainState, progress: tqdm, *, close: bool = True) -> None:
    """Log the logging window into the log line, the progress bar's loss and (main process) a
    metrics.jsonl line, then (`close`) open the next."""
    t, window = setup.train, state.window
    # Read before the clock: reading the loss waits for the GPU to finish the window's steps.
    state.loss = window.loss_sum.item() / window.loss_tokens
    elapsed = time.perf_counter() - window.start
    # The rates count this process's steps only: a resumed window's earlier ones ran before its clock.
    steps, samples, tokens = (n - untimed for n, untimed in zip((window.steps, window.samples, window.tokens),
                                                                 window.untimed, strict=True))
    record = {
        "step": state.step,
        "time": time.time(),
        "loss": state.loss,
        "lr": setup.scheduler.get_last_lr()[0],
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
    }
    eta = (t.max_steps - state.step) * elapsed / steps
    log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f tokens/s ETA %.0fs", state.step, t.max_steps, state.loss,
             record["lr"], record["samples_per_s"], record["tokens_per_s"], eta)
    progress.set_postfix(loss=f"{state.loss:.3f}")
    if setup.accelerator.is_main_process:
        with open(setup.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if close and setup.live is not None:  # an open window's row is logged again, whole, after a resume
            setup.live.log_row(record)
    if close:
        state.window = LogWindow.open(setup.device)


def _save_checkpoint(setup: TrainSetup, state: TrainState) -> None:
    """Checkpoint the step: the main process writes it, with every process's random generators and
    open logging window."""
    accelerator = setup.accelerator
    rng, windows = zip(*gather_object([(process_rng(setup.device), state.window.sums())]), strict=True)  # rank order
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.last_checkpoint = save_checkpoint(
            setup.checkpoints,
            step=state.step,
            aligner=accelerator.unwrap_model(setup.aligner),
            trainer_state={
                "step": state.step,
                "batcher": dict(state.batcher.__dict__),
                "optimizer": setup.optimizer.state_dict(),
                "scheduler": setup.scheduler.state_dict(),
                "rng_cpu": [r["cpu"] for r in rng],
                "rng_cuda": [r["cuda"] for r in rng],
                "log_window": list(windows),
            },
            meta={**setup.meta, "loss": state.loss},
            keep_last=setup.train.keep_last,
        )
        if setup.live is not None:
            setup.live.log_checkpoint(state.last_checkpoint)
    accelerator.wait_for_everyone()


def _finish(setup: TrainSetup, state: TrainState) -> TrainResult:
    """The result, at the newest checkpoint (written by the main process). A run that reached
    train.max_steps is complete: its loss curve and manifest are written."""
    last_checkpoint = latest_checkpoint(setup.checkpoints) or state.last_checkpoint
    if state.step >= setup.train.max_steps and setup.accelerator.is_main_process:
        plot_loss_curve(read_metrics(setup.run_dir / METRICS_FILE), setup.run_dir / LOSS_CURVE_FILE)
        write_manifest(setup.run_dir, {**setup.meta, "stage": "train", "step": state.step, "loss": state.loss,
                                       "checkpoint": recorded_path(last_checkpoint, setup.run_dir)})
        log.info("training complete: %s (loss curve %s)", last_checkpoint, setup.run_dir / LOSS_CURVE_FILE)
    setup.accelerator.wait_for_everyone()
    return TrainResult(run_dir=setup.run_dir, checkpoint=last_checkpoint, step=state.step, loss=state.loss)


def process_rng(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's global generator states: the CPU's, and its own GPU's (what its dropout draws from)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict, rank: int, world: int, device: torch.device, seed: int, step: int) -> None:
    """Put this process's global generators where the checkpoint left them, so its dropout draws
    what an uninterrupted run's would. A checkpoint of another process count has no state for
    this one: it gets a seed of its own (seed, rank, step), and the run goes on, no longer exactly
    the uninterrupted one."""
    saved_cpu, saved_cuda = state["rng_cpu"], state["rng_cuda"]
    if len(saved_cpu) != world:
        log.warning("the checkpoint holds the random states of %d process(es), this run has %d: dropout draws other "
                    "masks than an uninterrupted run would", len(saved_cpu), world)
        torch.manual_seed(hash((seed, rank, step)))
        return
    torch.set_rng_state(saved_cpu[rank])
    if device.type == "cuda" and saved_cuda[rank] is not None:  # None: saved by a run on the CPU
        torch.cuda.set_rng_state(saved_cuda[rank], device)


def _recorded_fingerprint(checkpoint: Path) -> str | None:
    """The train fingerprint a checkpoint's meta.json records (None if unreadable: resuming does not need it)."""
    try:
        return read_meta(checkpoint).get("train_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _refuse_another_run(run_dir: Path, recorded: str | None, expected: str) -> None:
    """A run directory given by hand (`--out`) may hold another config's run: completing or resuming
    it under this config would record settings it was not trained with."""
    if recorded is not None and recorded != expected:
        raise DataContractError(
            f"{run_dir} holds a training run of other settings (train fingerprint {recorded[:12]}, this config's "
            f"{expected[:12]}): give a new --out, or leave --out out to train in this config's own run directory")


def _truncate_metrics(path: Path, step: int, is_main: bool) -> None:
    """Drop metric lines past `step`, the resumed run's last closed logging window: lines written by a
    run that died before its next checkpoint, and a stopped run's line for its open window."""
    if not is_main or not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in kept).encode())


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per logged step)."""
    return read_jsonl(path, "delete that line "
                            "(its step's loss is lost from the log and the loss curve; the run is not)")
