"""Feature store cost: bytes per sample on disk and reader throughput, per storage dtype.

    .venv/bin/python benchmarks/feature_store.py            # paper shape: 128 rows x 3584 (Qwen2-VL-7B)
    .venv/bin/python benchmarks/feature_store.py --tiny     # seconds on a CPU (a test runs this)

Rates of one process (the training loop's input side):
- reader: the training stream (row groups read, shuffled) with every sample's features decoded
  whole, on one CPU core (the process pinned to it);
- batches: what the training loop's prefetch thread makes, batch 32: the stream, the masked
  split, the target text decoded and re-tokenized, bucketing (window 16), and each sample's
  source rows decoded into the padded batch on DECODE_THREADS threads; on one core and on all.
  The tokenizers are the offline byte-level ones (ByT5's is pure Python, slower per target than
  flan-t5's Rust tokenizer), so these rates are lower bounds.
Not part of the test suite's timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import ByT5Tokenizer

from thinkdiff.data.features import (
    FEATURE_KIND_LVLM,
    FeatureRecord,
    FeatureStore,
    FeatureStoreInfo,
    write_feature_shard,
)
from thinkdiff.models.tiny import build_tiny_qwen_tokenizer
from thinkdiff.storage import FEATURES_SCHEMA_VERSION, write_manifest
from thinkdiff.train.data import (
    DECODE_THREADS,
    Batcher,
    BatcherState,
    MaskedSplitCollator,
    SampleStream,
    StreamPosition,
    lvlm_usable,
    take,
)

# Generated ids that decode to English: the offline Qwen tokenizer maps byte b to id b.
CAPTION_IDS = list(b"A red fox sits on a mossy log in a misty pine forest at dawn, its tail curled around its paws, "
                   b"soft light filtering through the branches behind it.")


def build_store(directory: Path, *, samples: int, rows: int, dim: int, dtype: str,
                shard_size: int = 256) -> FeatureStore:
    info = FeatureStoreInfo(schema_version=FEATURES_SCHEMA_VERSION, feature_kind=FEATURE_KIND_LVLM, dtype=dtype,
                            dim=dim, model_id="benchmark", model_revision="random", max_feature_rows=rows)
    g = torch.Generator().manual_seed(0)
    shards = []
    for start in range(0, samples, shard_size):
        count = min(shard_size, samples - start)
        records = [FeatureRecord(key=f"{start + i:09d}", instruction="Describe the image concisely.", text="x" * 300,
                                 token_ids=(CAPTION_IDS * 2)[:rows], features_LD=torch.randn(rows, dim, generator=g))
                   for i in range(count)]
        name = f"part-{start // shard_size:05d}.parquet"
        write_feature_shard(directory / name, records, info)
        shards.append({"name": name, "num_samples": count, "num_failed": 0})
    write_manifest(directory, {"stage": "features", "info": dataclasses.asdict(info), "shards": shards})
    return FeatureStore(directory)


def measure(store: FeatureStore, samples: int, repeats: int = 3) -> float:
    """Best samples/s over `repeats` full passes of the training stream, each sample decoded whole
    (page cache warm after the first)."""
    best = 0.0
    for _ in range(repeats):
        stream = iter(SampleStream(store, seed=0, position=StreamPosition(), usable=lvlm_usable))
        started = time.perf_counter()
        for sample in take(stream, samples):
            sample.features.decode()
        best = max(best, samples / (time.perf_counter() - started))
    return best


def measure_batches(store: FeatureStore, samples: int, batch_size: int = 32, window: int = 16) -> float:
    """Samples/s of the training loop's batch making (one pass; the page cache is warm by now)."""
    collate = MaskedSplitCollator(build_tiny_qwen_tokenizer(), ByT5Tokenizer(), max_source_rows=128,
                                  max_target_tokens=128, seed=0)
    batcher = iter(Batcher(store, collate, lvlm_usable, seed=0, batch_size=batch_size, world=1, rank=0,
                           window=min(window, max(1, samples // batch_size)), state=BatcherState()))
    started = time.perf_counter()
    n = 0
    while n < samples:
        n += len(next(batcher).labels_BT)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: runs in seconds")
    parser.add_argument("--samples", type=int, help="samples in the store (default 1024; tiny 64)")
    args = parser.parse_args()
    rows, dim = (16, 64) if args.tiny else (128, 3584)
    samples = args.samples or (64 if args.tiny else 1024)
    print(f"feature store: {samples} samples of {rows} x {dim}, torch {torch.__version__}, "
          f"{len(os.sched_getaffinity(0))} cores, {DECODE_THREADS} decode threads")
    print("| storage dtype | KB/sample on disk | reader samples/s, 1 core | reader GB/s, 1 core "
          "| batches samples/s, 1 core | batches samples/s |")
    print("|---|---|---|---|---|---|")
    cores = os.sched_getaffinity(0)
    for dtype in ("bfloat16", "float8_e4m3"):
        with tempfile.TemporaryDirectory() as tmp:
            store = build_store(Path(tmp), samples=samples, rows=rows, dim=dim, dtype=dtype)
            size = sum(p.stat().st_size for p in store.shards)
            os.sched_setaffinity(0, {min(cores)})
            try:
                reader = measure(store, samples)
                one_core = measure_batches(store, samples)
            finally:
                os.sched_setaffinity(0, cores)
            batches = measure_batches(store, samples)
            print(f"| {dtype} | {size / samples / 1024:.1f} | {reader:,.0f} | {reader * size / samples / 1e9:.2f} | "
                  f"{one_core:,.0f} | {batches:,.0f} |")


if __name__ == "__main__":
    main()
