"""Feature store cost: bytes per sample on disk and reader throughput, per storage dtype.

    .venv/bin/python benchmarks/feature_store.py            # paper shape: 128 rows x 3584 (Qwen2-VL-7B)
    .venv/bin/python benchmarks/feature_store.py --tiny     # seconds on a CPU (a test runs this)

The reader is the training stream itself (row group read + per-sample decode, one process), so
samples/s here is samples/s per CPU core feeding the trainer. Not part of the test suite's timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from thinkdiff.data.features import (
    FEATURE_KIND_LVLM,
    FeatureRecord,
    FeatureStore,
    FeatureStoreInfo,
    write_feature_shard,
)
from thinkdiff.storage import FEATURES_SCHEMA_VERSION, write_manifest
from thinkdiff.train.data import SampleStream, StreamPosition, lvlm_usable, take


def build_store(directory: Path, *, samples: int, rows: int, dim: int, dtype: str, shard_size: int = 256) -> FeatureStore:
    info = FeatureStoreInfo(schema_version=FEATURES_SCHEMA_VERSION, feature_kind=FEATURE_KIND_LVLM, dtype=dtype, dim=dim,
                            model_id="benchmark", model_revision="random", max_feature_rows=rows)
    g = torch.Generator().manual_seed(0)
    shards = []
    for start in range(0, samples, shard_size):
        count = min(shard_size, samples - start)
        records = [FeatureRecord(key=f"{start + i:09d}", instruction="Describe the image concisely.", text="x" * 300,
                                 token_ids=list(range(rows)), features_LD=torch.randn(rows, dim, generator=g))
                   for i in range(count)]
        name = f"part-{start // shard_size:05d}.parquet"
        write_feature_shard(directory / name, records, info)
        shards.append({"name": name, "num_samples": count, "num_failed": 0})
    write_manifest(directory, {"stage": "features", "info": dataclasses.asdict(info), "shards": shards})
    return FeatureStore(directory)


def measure(store: FeatureStore, samples: int, repeats: int = 3) -> float:
    """Best samples/s over `repeats` full passes of the training stream (page cache warm after the first)."""
    best = 0.0
    for _ in range(repeats):
        stream = iter(SampleStream(store, seed=0, position=StreamPosition(), usable=lvlm_usable))
        started = time.perf_counter()
        take(stream, samples)
        best = max(best, samples / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: runs in seconds")
    parser.add_argument("--samples", type=int, help="samples in the store (default 1024; tiny 64)")
    args = parser.parse_args()
    rows, dim = (16, 64) if args.tiny else (128, 3584)
    samples = args.samples or (64 if args.tiny else 1024)
    print(f"feature store: {samples} samples of {rows} x {dim}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| storage dtype | KB/sample on disk | reader samples/s (1 core) | reader GB/s |")
    print("|---|---|---|---|")
    for dtype in ("bfloat16", "float8_e4m3"):
        with tempfile.TemporaryDirectory() as tmp:
            store = build_store(Path(tmp), samples=samples, rows=rows, dim=dim, dtype=dtype)
            size = sum(p.stat().st_size for p in store.shards)
            rate = measure(store, samples)
            print(f"| {dtype} | {size / samples / 1024:.1f} | {rate:,.0f} | {rate * size / samples / 1e9:.2f} |")


if __name__ == "__main__":
    main()
