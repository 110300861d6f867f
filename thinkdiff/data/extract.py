"""Feature extraction stage: corpus shards -> captions + generated-token states -> feature shards.

    thinkdiff features --config tiny

ThinkDiff-LVLM, for each image: a chat prompt with an instruction drawn by a seeded RNG keyed by
the image key, sampled generation (temperature, top_p, max_new_tokens from config; a static KV cache and a compiled
decode step on CUDA), then one pass over the generated ids, reusing the prompt's KV cache, for the
final-norm states (docs/method.md, Features). ThinkDiff-CLIP: the vision
tower's CLS + downsampled patch tokens, stored with the url list's caption. One corpus shard becomes one feature shard;
finished shards are skipped, so a killed run resumes at the first missing one.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from thinkdiff.config import RunConfig
from thinkdiff.data.corpus import CorpusImage, corpus_shards, read_corpus_shard
from thinkdiff.data.features import (
    FEATURE_KIND_CLIP,
    FEATURE_KIND_LVLM,
    KEPT_SHARDS,
    FeatureRecord,
    FeatureStoreInfo,
    read_shard_failures,
    read_shard_info,
    write_feature_shard,
)
from thinkdiff.errors import DataContractError
from thinkdiff.models.common import shared
from thinkdiff.models.vision import VisionEncoder, load_vision
from thinkdiff.models.vlm import VLM, encode_chat, generate_with_states, load_vlm
from thinkdiff.storage import (
    FEATURES_SCHEMA_VERSION,
    exclusive,
    features_fingerprint,
    read_manifest,
    recorded_path,
    remove_stale_temp_files,
    stage_root,
    stop_when_full,
    upstream_fingerprint,
    write_manifest,
)

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def pick_instruction(instructions: list[str], seed: int, key: str) -> str:
    """Deterministic per image: the same key gets the same instruction in every run and batching."""
    return instructions[random.Random(f"{seed}:{key}").randrange(len(instructions))]


def feature_shard_path(out_dir: Path, corpus_shard: Path) -> Path:
    return out_dir / f"part-{corpus_shard.stem}.parquet"


Extractor = VLM | VisionEncoder


def store_info(cfg: RunConfig, model: Extractor) -> FeatureStoreInfo:
    return FeatureStoreInfo(
        schema_version=FEATURES_SCHEMA_VERSION,
        feature_kind=FEATURE_KIND_CLIP if isinstance(model, VisionEncoder) else FEATURE_KIND_LVLM,
        dtype=cfg.features.storage_dtype,
        dim=model.hidden_size,
        model_id=model.model_id,
        model_revision=model.revision,
        max_feature_rows=cfg.features.max_feature_rows,
    )


@dataclass
class PreparedBatch:
    """One batch, read, decoded and (LVLM) tokenized with its images preprocessed, ready for the model."""

    items: list[CorpusImage]
    instructions: list[str]
    inputs: dict[str, torch.Tensor] | None
    """encode_chat's output (LVLM); None for the CLIP tower, which preprocesses its own input."""


def _prepare_lvlm(cfg: RunConfig, vlm: VLM, items: list[CorpusImage], pool: Executor) -> PreparedBatch:
    f = cfg.features
    instructions = [pick_instruction(f.instructions, f.seed, item.key) for item in items]
    conversations = [[item.image, ins] for item, ins in zip(items, instructions, strict=True)]
    if f.compile:
        # The compiled decode graph is specialised to the batch size: a shard's short last batch is
        # filled with copies of its last image (their outputs are dropped) instead of compiling anew.
        conversations += [conversations[-1]] * (f.batch_size - len(conversations))
    # Kept on the CPU: the prefetch thread does no GPU work; the main thread copies it over.
    return PreparedBatch(items, instructions, encode_chat(vlm, conversations, f.system_prompt, pool=pool, device=CPU))


def _lvlm_records(cfg: RunConfig, vlm: VLM, batch: PreparedBatch, seed: int) -> list[FeatureRecord]:
    """Caption with the VLM; keep the producing state of every generated token."""
    f = cfg.features
    # One generation at a time per process: the model is shared, and seeding uses the global RNG.
    with _GENERATE_LOCK:
        inputs = {k: v.to(vlm.device) for k, v in batch.inputs.items()}
        samples = generate_with_states(vlm, inputs, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                                       top_p=f.top_p, seed=seed, kv_cache=f.kv_cache,
                                       compile=f.compile)[: len(batch.items)]
    return [
        FeatureRecord(key=item.key, instruction=instruction,
                      text=vlm.tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                      token_ids=sample.token_ids, features_LD=sample.states_LD)
        for item, instruction, sample in zip(batch.items, batch.instructions, samples, strict=True)
    ]


def _clip_records(cfg: RunConfig, vision: VisionEncoder, items: list[CorpusImage]) -> list[FeatureRecord]:
    """Vision tokens (CLS + downsampled grid) with the url list's own caption."""
    with _GENERATE_LOCK:
        tokens_BTD = vision.tokens([item.image for item in items])
    if tokens_BTD.shape[1] > cfg.features.max_feature_rows:
        raise ValueError(f"features.max_feature_rows={cfg.features.max_feature_rows} keeps fewer rows than the "
                         f"{tokens_BTD.shape[1]} vision tokens per image; raise it")
    return [FeatureRecord(key=item.key, instruction="", text=item.caption, token_ids=[], features_LD=tokens_BTD[i])
            for i, item in enumerate(items)]


def _decodable_batches(corpus_shard: Path, size: int, failures: list[dict]) -> Iterator[list[CorpusImage]]:
    """The shard's images in batches of `size`; undecodable ones go to `failures` (logged)."""
    pending: list[CorpusImage] = []
    for item in read_corpus_shard(corpus_shard):
        if item.image is None:
            failures.append({"key": item.key, "error": item.error})
            log.warning("%s: image %s does not decode (%s); skipped", corpus_shard.name, item.key, item.error)
            continue
        pending.append(item)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def extract_shard(cfg: RunConfig, model: Extractor, corpus_shard: Path, out_path: Path,
                  progress: tqdm | None = None) -> Path:
    """Every decodable image of one corpus shard -> one feature shard, written atomically."""
    failures: list[dict] = []
    batches = _decodable_batches(corpus_shard, cfg.features.batch_size, failures)
    records = extract_records(cfg, model, batches, seed_key=corpus_shard.name, progress=progress)
    return write_feature_shard(out_path, records, store_info(cfg, model), failures)


def extract_records(cfg: RunConfig, model: Extractor, batches: Iterator[list[CorpusImage]], *, seed_key: str,
                    progress: tqdm | None = None) -> list[FeatureRecord]:
    """Feature records of every image in `batches`; batch k samples with a seed from
    (features.seed, seed_key, k), so the same batches give the same records.

    While the model works on one batch, a background thread takes the next one from `batches`
    (reading and decoding it) and preprocesses its images on `features.preprocess_workers` threads:
    the image processor costs 10-20 ms of CPU per 448 px image, as much as the GPU spends on an
    image at the target rate.
    """
    f = cfg.features
    records: list[FeatureRecord] = []

    def prepare_next() -> PreparedBatch | None:
        items = next(batches, None)
        if items is None:
            return None
        if isinstance(model, VisionEncoder):
            return PreparedBatch(items, [], None)
        return _prepare_lvlm(cfg, model, items, pool)

    with ThreadPoolExecutor(f.preprocess_workers, thread_name_prefix="preprocess") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="prefetch") as ahead:
        upcoming = ahead.submit(prepare_next)
        batch_index = 0
        while (batch := upcoming.result()) is not None:
            upcoming = ahead.submit(prepare_next)
            if isinstance(model, VisionEncoder):
                records.extend(_clip_records(cfg, model, batch.items))
            else:
                seed = zlib.crc32(f"{f.seed}:{seed_key}:{batch_index}".encode())
                records.extend(_lvlm_records(cfg, model, batch, seed))
            if progress is not None:
                progress.update(len(batch.items))
            batch_index += 1
    return records


def pending_feature_shards(corpus_dir: Path, out_dir: Path) -> list[Path]:
    """Corpus shards whose feature shard does not exist yet ([] when the stage is complete)."""
    if read_manifest(out_dir, "features") is not None:
        log.info("features %s are complete; skipping", out_dir)
        return []
    with _PROGRESS_LOCK:
        _STAGE_PROGRESS.pop(out_dir, None)  # a new run's rate and ETA start from its own first shard
    return [s for s in corpus_shards(corpus_dir) if not feature_shard_path(out_dir, s).exists()]


def extract_feature_shard(cfg: RunConfig, corpus_shard: Path, out_dir: Path, progress: tqdm | None = None, *,
                          wait: bool = True) -> Path | None:
    """One corpus shard -> one feature shard (skipped when it exists). Safe to call from several
    threads (the VLM is loaded once per process and generation is serialised on it) and from several
    processes or machines on one store: a shard is claimed while it is extracted, and a shard
    another worker holds is waited for, or with `wait=False` left to it (None)."""
    out_path = feature_shard_path(out_dir, corpus_shard)
    if out_path.exists():
        return out_path
    with contextlib.ExitStack() as claim:
        # Only the store's own directory and lock file: a full disk met while the model loads is another disk's.
        with stop_when_full(out_dir, KEPT_SHARDS):
            out_dir.mkdir(parents=True, exist_ok=True)
            held = claim.enter_context(exclusive(
                out_dir / f".{out_path.name}.lock",
                f"features: another worker is extracting {out_path.name}; waiting for it", wait=wait))
        if held is None:  # another worker has it (a held lock's descriptor may be 0)
            return None
        if out_path.exists():  # the worker waited for wrote it
            return out_path
        remove_stale_temp_files(out_path)  # a killed writer's leftovers; no live writer has this claim
        return _extract_claimed_shard(cfg, corpus_shard, out_dir, out_path, progress)


def _extract_claimed_shard(cfg: RunConfig, corpus_shard: Path, out_dir: Path, out_path: Path,
                           progress: tqdm | None) -> Path:
    model = shared_extractor(cfg)  # loading it is not extraction time
    started = time.perf_counter()
    with _PROGRESS_LOCK:
        clock = _STAGE_PROGRESS.setdefault(out_dir, [started, 0, 0])  # this process's first shard start, images, shards
    path = extract_shard(cfg, model, corpus_shard, out_path, progress)
    rows = pq.ParquetFile(path).metadata.num_rows
    left = sum(not feature_shard_path(out_dir, s).exists() for s in corpus_shards(corpus_shard.parent))
    # Concurrent shard tasks wait for one another on the model: rate and ETA come from the stage's
    # wall time in this process, not from this shard's.
    with _PROGRESS_LOCK:
        clock[1] += rows
        clock[2] += 1
        elapsed = time.perf_counter() - clock[0]
    log.info("features: wrote %s (%d images in %.1fs); %d shards left, %.1f img/s, ETA %.0fs", path.name, rows,
             time.perf_counter() - started, left, clock[1] / elapsed, left * elapsed / clock[2])
    return path


def finalize_features(cfg: RunConfig, corpus_dir: Path, out_dir: Path) -> Path:
    """Write the manifest once every corpus shard has its feature shard; returns `out_dir`.

    Raises:
        DataContractError: a feature shard is missing, or shards disagree on model, dim or dtype.
    """
    if read_manifest(out_dir, "features") is not None:
        return out_dir
    shards = [feature_shard_path(out_dir, s) for s in corpus_shards(corpus_dir)]
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise DataContractError(f"{out_dir}: feature shards {missing[:5]} are missing; "
                                "rerun the features stage to make them")
    infos = {read_shard_info(p) for p in shards}
    if len(infos) != 1:
        raise DataContractError(f"{out_dir}: shards were made with different settings: {sorted(map(str, infos))}; "
                                "delete the odd ones")
    entries = [{"name": p.name, "num_samples": pq.ParquetFile(p).metadata.num_rows,
                "num_failed": len(read_shard_failures(p))} for p in shards]
    write_manifest(out_dir, {
        "stage": "features",
        "fingerprint": features_fingerprint(cfg, corpus_dir),
        "corpus_dir": recorded_path(corpus_dir, stage_root(cfg)),
        "corpus_fingerprint": upstream_fingerprint(cfg, "corpus", corpus_dir),
        "info": infos.pop().__dict__,
        "config": {"features": cfg.features.__dict__, "vlm": cfg.models.vlm.__dict__},
        "shards": entries,
    })
    log.info("features: %d samples (%d failed to decode) in %s", sum(e["num_samples"] for e in entries),
             sum(e["num_failed"] for e in entries), out_dir)
    return out_dir


def extract_features(cfg: RunConfig, corpus_dir: Path, out_dir: Path) -> Path:
    """The whole features stage in this process: every missing shard, then the manifest.

    Skipped entirely when `out_dir/manifest.json` exists; a killed run resumes at the missing shards.
    """
    if read_manifest(out_dir, "features") is not None:
        log.info("features %s are complete; skipping", out_dir)
        return out_dir
    todo = pending_feature_shards(corpus_dir, out_dir)
    log.info("features: %d corpus shards to extract -> %s", len(todo), out_dir)
    total = sum(pq.ParquetFile(s).metadata.num_rows for s in todo)
    with tqdm(total=total, desc="features", unit="img", dynamic_ncols=True, disable=None) as progress:
        # Logs each shard with the shards left and an ETA. Shards another worker on this store is
        # extracting are left to it, then waited for at the end.
        held_elsewhere = [s for s in todo if extract_feature_shard(cfg, s, out_dir, progress, wait=False) is None]
        for shard in held_elsewhere:
            extract_feature_shard(cfg, shard, out_dir, progress)
    return finalize_features(cfg, corpus_dir, out_dir)


_GENERATE_LOCK = threading.Lock()
_PROGRESS_LOCK = threading.Lock()
_STAGE_PROGRESS: dict[Path, list] = {}


def shared_extractor(cfg: RunConfig) -> Extractor:
    """The feature model of `cfg` (the VLM, or the vision tower for ThinkDiff-CLIP), loaded once per
    process: mapped shard tasks share it (and CoBSAT's generator the VLM)."""
    f = cfg.features
    if cfg.variant == "clip":
        return shared(load_vision, cfg.models.vision, image_size=f.vision_image_size)
    return shared(load_vlm, cfg.models.vlm, min_pixels=f.min_pixels, max_pixels=f.max_pixels)
