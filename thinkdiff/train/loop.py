"""Train the aligner against the frozen T5 decoder from a feature store (REFERENCE.md section 5).

    thinkdiff train --config tiny                       # one process (CPU or one GPU)
    accelerate launch -m thinkdiff train --config run.yaml   # N GPUs / nodes

Loop: stream samples -> split (masked split, or caption split for CLIP) -> length-bucketed batches ->
aligner -> T5 decoder loss (summed over target tokens, divided by the bucketing pool's mean tokens
per batch: `thinkdiff.train.data`, Loss weight) -> AdamW step -> log -> checkpoint every K steps.
The frozen T5 runs with its dropout when `train.t5_dropout` is set, drawing from torch's global
generators, which each process seeds with `train.seed + rank` as the official release does and a
checkpoint saves per process. A rerun of the same config resumes from the newest checkpoint and ends
with the same weights as an uninterrupted run (bitwise on CPU; a unit test checks it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from thinkdiff.config import RunConfig, TrainConfig
from thinkdiff.data.features import FeatureStore
from thinkdiff.errors import ConfigError, DataContractError
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.t5 import T5Parts, key_mask_4d, load_t5, padded_slots
from thinkdiff.models.vlm import load_vlm_tokenizer
from thinkdiff.plots import plot_loss_curve
from thinkdiff.storage import (
    atomic_write_bytes,
    git_revision,
    read_jsonl,
    read_manifest,
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
    lvlm_usable,
    prefetched,
)
from thinkdiff.train.engine import Accelerator, gather_object, make_accelerator

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    """The newest checkpoint; its `aligner/` subdirectory loads with Aligner.from_pretrained."""
    step: int
    loss: float | None
    """Token-mean loss over the last logging window (None when the run was already complete)."""

    @property
    def aligner_dir(self) -> Path:
        return self.checkpoint / ALIGNER_DIR


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


def encoder_states(aligner: torch.nn.Module, t5_encoder: torch.nn.Module | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen T5 decoder attends to, packed, with its slots (`T5DecoderLM.loss`): the
    aligned rows (LVLM), or for ThinkDiff-CLIP each sample's `[aligner(image tokens) ;
    T5enc(caption part 1)]`, the prefix rows after the aligned ones (still padded: few and short)."""
    rows, slots = aligner(batch.features_RD.float()), batch.source_slots_BS
    if batch.prefix_ids_BP is None:
        return rows, slots
    with torch.no_grad():
        prefix = t5_encoder(input_ids=batch.prefix_ids_BP, attention_mask=key_mask_4d(batch.prefix_mask_BP)).last_hidden_state
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


def train_aligner(cfg: RunConfig, features_dir: Path, run_dir: Path, *, stop_after_steps: int | None = None) -> TrainResult:
    """Train (or resume training) the aligner into `run_dir`; returns the newest checkpoint.

    Args:
        cfg: the resolved config; `cfg.train` drives the loop.
        features_dir: a complete feature store.
        run_dir: where checkpoints, metrics and the manifest go (the stage directory).
        stop_after_steps: stop (with a checkpoint) once this step is reached, as a preempted job
            would; the next call resumes. Used by tests; None runs to `train.max_steps`.

    Raises:
        FileNotFoundError / DataContractError: the feature store is missing, incomplete, was
            made by another model than `models.vlm`, or keeps fewer rows than train.max_source_rows.
    """
    t = cfg.train
    ckpt_root = run_dir / "checkpoints"
    manifest = read_manifest(run_dir, "train")
    expected = train_fingerprint(cfg, features_dir)
    if manifest is not None:
        _refuse_another_run(run_dir, manifest.get("train_fingerprint"), expected)
        log.info("training run %s is complete (step %d); skipping", run_dir, manifest["step"])
        return TrainResult(run_dir=run_dir, checkpoint=Path(manifest["checkpoint"]), step=manifest["step"], loss=None)
    newest = latest_checkpoint(ckpt_root)
    if newest is not None:  # before anything loads or is cleaned up in that directory
        _refuse_another_run(run_dir, _recorded_fingerprint(newest), expected)

    if t.decoder_attention == "flex" and t.t5_dropout:
        raise ConfigError("train.decoder_attention=flex runs the T5 decoder without dropout (FlexAttention has none), "
                          "but train.t5_dropout=true asks for it: use train.decoder_attention=sdpa, or set "
                          "train.t5_dropout=false")
    accelerator = make_accelerator(t)
    if t.decoder_attention == "flex" and accelerator.device.type != "cuda":
        raise ConfigError(f"train.decoder_attention=flex needs a CUDA GPU (FlexAttention has no backward on "
                          f"{accelerator.device.type}): use train.decoder_attention=sdpa")
    if t.batch_size % accelerator.num_processes:  # `accelerate launch` may start another count than train.num_processes
        raise ConfigError(f"train.batch_size={t.batch_size} (the global batch) does not split over the {accelerator.num_processes} "
                          f"processes launched: use a multiple of {accelerator.num_processes}, or launch as many processes as divide it")
    clip = cfg.variant == "clip"
    store = FeatureStore(features_dir, expect_model_id=(cfg.models.vision if clip else cfg.models.vlm).id)
    stored_rows = store.info.max_feature_rows
    if not clip and stored_rows < t.max_source_rows:  # a split past the stored rows would have no features
        raise DataContractError(
            f"{features_dir}: the store keeps {stored_rows} feature rows per sample, fewer than "
            f"train.max_source_rows={t.max_source_rows}: set train.max_source_rows={stored_rows}, or extract the "
            f"features again with features.max_feature_rows={t.max_source_rows}")
    run_dir.mkdir(parents=True, exist_ok=True)  # once its input is known good: a refused run leaves no directory
    t5 = load_t5(cfg.models.t5, device=accelerator.device, keep_encoder=clip)
    t5.decoder_lm.set_attention(t.decoder_attention)
    t5.decoder_lm.set_dropout(t.t5_dropout)
    if t.compile:
        t5.decoder_lm.compile_decoder()
    if clip:
        # The release trains with its whole T5 in train mode (`set_dropout`): the encoder of caption part 1 too.
        t5.encoder.train(t.t5_dropout)
        collate = CaptionSplitCollator(t5.tokenizer, max_prefix_tokens=t.max_prefix_tokens,
                                       max_target_tokens=t.max_target_tokens, seed=t.seed, blip_captions=t.blip_captions)
    else:
        collate = MaskedSplitCollator(
            load_vlm_tokenizer(cfg.models.vlm), t5.tokenizer,
            max_source_rows=t.max_source_rows, max_target_tokens=t.max_target_tokens, seed=t.seed,
        )
    aligner = build_aligner(t, store.info.dim, t5.decoder_lm.d_model, t5.encoder_final_norm)
    optimizer = torch.optim.AdamW(param_groups(aligner, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t))
    aligner, optimizer = accelerator.prepare(aligner, optimizer)

    world, rank = accelerator.num_processes, accelerator.process_index
    step, batcher_state = 0, BatcherState()
    remove_partial_checkpoints(ckpt_root)
    resume_from = latest_checkpoint(ckpt_root)
    # Dropout draws from torch's global generators: seeded per process as the release's
    # setup_seeds does (train.py at 3ed85e6: run seed + rank), restored from the checkpoint on resume.
    torch.manual_seed(t.seed + rank)
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        accelerator.unwrap_model(aligner).load_state_dict(Aligner.from_pretrained(resume_from / ALIGNER_DIR).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, batcher_state = state["step"], BatcherState(**state["batcher"])
        restore_rng(state, rank, world, accelerator.device, t.seed, step)
        log.info("resuming %s from %s (step %d, epoch %d, sample %d)", run_dir, resume_from.name, step,
                 batcher_state.epoch, batcher_state.index)
    _truncate_metrics(run_dir / METRICS_FILE, step, accelerator.is_main_process)

    meta = {
        "config": cfg.to_dict(),
        "features_dir": str(features_dir),
        "features_fingerprint": upstream_fingerprint(cfg, "features", features_dir),
        "corpus_fingerprint": store.manifest.get("corpus_fingerprint"),
        "train_fingerprint": expected,
        "git_revision": git_revision(),
    }
    # Every process draws the same global batches and keeps its own slice, so the data order does
    # not depend on the number of processes.
    on_gpu = accelerator.device.type == "cuda"
    batcher = Batcher(store, collate, collate.usable if clip else lvlm_usable, seed=t.seed, batch_size=t.batch_size,
                      world=world, rank=rank, window=t.bucket_window, state=batcher_state, pin_memory=on_gpu)
    target_step = min(t.max_steps, stop_after_steps) if stop_after_steps is not None else t.max_steps
    last_ckpt = resume_from
    # The logged loss is the token mean over the logging window of this process's batches: the
    # summed token losses (on the device) over their target tokens.
    window_loss, window_loss_tokens = torch.zeros((), device=accelerator.device), 0
    window_steps, window_samples, window_tokens = 0, 0, 0
    window_start = time.perf_counter()
    loss_value = None
    aligner.train()
    # Bars only on a terminal (disable=None); logs and pipes get the periodic log line with rate and ETA.
    progress = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=None if accelerator.is_main_process else True, dynamic_ncols=True)
    log.info("training %s: step %d -> %d, batch %d (%d per process x %d), %d samples in store", run_dir, step, target_step,
             t.batch_size, t.batch_size // world, world, store.num_samples)
    # A bucketing pool's worth of batches ahead (the batcher reads and splits a pool at once), plus one.
    with prefetched(batcher, depth=t.bucket_window + 1, device=accelerator.device) as batches:
        while step < target_step:
            cpu_batch, batcher_state = next(batches)
            loss = train_step(aligner, t5, cpu_batch.to(accelerator.device, non_blocking=on_gpu), optimizer, scheduler, accelerator)
            step += 1
            progress.update(1)
            # Summed on the device: reading the loss every step would make the CPU wait for the GPU.
            window_loss += loss * cpu_batch.num_target_tokens
            window_loss_tokens += cpu_batch.num_target_tokens
            window_steps += 1
            window_samples += cpu_batch.labels_BT.shape[0] * world
            window_tokens += cpu_batch.num_target_tokens * world
            if step % t.log_every == 0 or step == target_step:
                loss_value = window_loss.item() / window_loss_tokens
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "time": time.time(),
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window_samples / elapsed,
                    "tokens_per_s": window_tokens / elapsed,
                }
                eta = (t.max_steps - step) * elapsed / window_steps
                log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s %.0f tokens/s ETA %.0fs",
                         step, t.max_steps, loss_value, record["lr"], record["samples_per_s"], record["tokens_per_s"], eta)
                progress.set_postfix(loss=f"{loss_value:.3f}")
                if accelerator.is_main_process:
                    with open(run_dir / METRICS_FILE, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                window_loss, window_loss_tokens = torch.zeros((), device=accelerator.device), 0
                window_steps, window_samples, window_tokens = 0, 0, 0
                window_start = time.perf_counter()
            if step % t.checkpoint_every == 0 or step == target_step:
                rng = gather_object([process_rng(accelerator.device)])  # every process's, in rank order
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    last_ckpt = save_checkpoint(
                        ckpt_root,
                        step=step,
                        aligner=accelerator.unwrap_model(aligner),
                        trainer_state={
                            "step": step,
                            "batcher": dict(batcher_state.__dict__),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng_cpu": [r["cpu"] for r in rng],
                            "rng_cuda": [r["cuda"] for r in rng],
                        },
                        meta={**meta, "loss": loss_value},
                        keep_last=t.keep_last,
                    )
                accelerator.wait_for_everyone()
    progress.close()
    last_ckpt = latest_checkpoint(ckpt_root) or last_ckpt
    if step >= t.max_steps and accelerator.is_main_process:
        plot_loss_curve(read_metrics(run_dir / METRICS_FILE), run_dir / LOSS_CURVE_FILE)
        write_manifest(run_dir, {**meta, "stage": "train", "step": step, "loss": loss_value, "checkpoint": str(last_ckpt)})
        log.info("training complete: %s (loss curve %s)", last_ckpt, run_dir / LOSS_CURVE_FILE)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, checkpoint=last_ckpt, step=step, loss=loss_value)


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
    """Drop metric lines past the resumed step (written by a run that died before its next checkpoint)."""
    if not is_main or not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in kept).encode())


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per logged step)."""
    return read_jsonl(path, "delete that line (its step's loss is lost from the log and the loss curve; the run is not)")
