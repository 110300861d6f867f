"""Throughput of the features stage and of CoBSAT on a Ray cluster: one worker at a time, then N at once.

    .venv/bin/python benchmarks/cluster_throughput.py --config paper-lvlm --address auto --workers 8 \
        --root /shared/thinkdiff-benchmark                # a running cluster (docs/cluster.md)
    .venv/bin/python benchmarks/cluster_throughput.py --tiny   # seconds on a CPU: a local cluster, 2 workers

Both measures run in one cluster on the same corpus and prompts: "1 worker" gives each unit of work
(a feature shard, a CoBSAT (task, shot) unit) all N of the cluster's GPUs, so Ray runs one at a time;
"N workers" gives each one GPU. Each unit holds one CPU either way, so a CPU-only run keeps the same
threads per unit (the tiny mode's GPUs are logical: the models run on the CPU). The models are loaded
in the workers by a warm-up pass first, as a long stage's later shards find them. The shards run as the
flow's tasks run them (thinkdiff.pipeline.cache_feature_shard), without Prefect's bookkeeping; CoBSAT
runs as the stage does (thinkdiff.eval.stage.evaluate_cobsat), MLflow logging included.
Not part of the test suite's timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from thinkdiff import cluster, pipeline
from thinkdiff.config import RunConfig, config_from_dict, load_config
from thinkdiff.eval import stage

log = logging.getLogger("cluster_throughput")


def cache_shard(config: dict, corpus_shard: str) -> int:
    """One feature shard, as the cache-feature-shard task makes it; its images."""
    import pyarrow.parquet as pq

    path = pipeline.cache_feature_shard(config_from_dict(config), Path(corpus_shard))
    return pq.ParquetFile(path).metadata.num_rows


def with_settings(cfg: RunConfig, run: int, gpus_per_worker: float) -> RunConfig:
    """Run `run` of the benchmark: its own seeds, so that it writes directories of its own (nothing is
    skipped as done) beside the others, in the same root, MLflow store and CoBSAT set."""
    return dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, seed=cfg.features.seed + run),
                               eval=dataclasses.replace(cfg.eval, seed=cfg.eval.seed + run),
                               cluster=dataclasses.replace(cfg.cluster, gpus_per_worker=gpus_per_worker))


def features_rate(cfg: RunConfig, corpus_dir: Path, run_index: int, gpus_per_worker: float) -> float:
    run = with_settings(cfg, run_index, gpus_per_worker)
    shards = [(run.to_dict(), str(s)) for s in pipeline.pending_feature_shards(run, corpus_dir)]
    started = time.perf_counter()
    images = sum(cluster.map_on_workers(run.cluster, cache_shard, shards, "features"))
    return images / (time.perf_counter() - started)


def cobsat_rate(cfg: RunConfig, run_index: int, gpus_per_worker: float) -> float:
    run = with_settings(cfg, run_index, gpus_per_worker)
    started = time.perf_counter()
    result = stage.evaluate_cobsat(run)
    return result.summary.num_prompts / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on a local 2-worker cluster (CPU)")
    parser.add_argument("--config", default="tiny", help="preset or YAML (its corpus, features and eval settings)")
    parser.add_argument("--address", default="", help='cluster.address ("": a local cluster of --workers)')
    parser.add_argument("--workers", type=int, default=2, help="N: the cluster's GPUs (logical ones for --tiny)")
    parser.add_argument("--root", help="paths.root of the runs (default: a new temporary directory; a cluster "
                                       "joined by --address needs one every node mounts)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    n = args.workers
    root = args.root or tempfile.mkdtemp(prefix="cluster-throughput-")
    overrides = [f"paths.root={root}", "cluster.engine=ray", f"cluster.address={args.address}",
                 "cluster.cpus_per_worker=1", *args.overrides]
    if args.tiny:
        overrides = [*overrides, "corpus.demo_images=32", "corpus.shard_size=8", "corpus.demo_broken=0",
                     "eval.generator=text-bridge", "eval.baselines=[]", "eval.tasks=[1, 2]", "eval.limit=2",
                     "eval.batch_size=2"]
    cfg = load_config(args.config, overrides)
    # The corpus on this machine: what is measured is the GPU stages.
    corpus_dir = pipeline.build_corpus(dataclasses.replace(
        cfg, cluster=dataclasses.replace(cfg.cluster, engine="local"))).path
    import ray

    init = cluster.init_kwargs(cfg.cluster)
    if not args.address:
        init |= {"num_cpus": n, "num_gpus": n}
    ray.init(**init, log_to_driver=False)
    try:
        features_rate(cfg, corpus_dir, 1, 1)  # the warm-up
        one = features_rate(cfg, corpus_dir, 2, n)
        many = features_rate(cfg, corpus_dir, 3, 1)
        print(f"features: 1 worker {one:.2f} images/s, {n} workers {many:.2f} images/s ({many / one:.2f}x)")
        cobsat_rate(cfg, 1, 1)
        one = cobsat_rate(cfg, 2, n)
        many = cobsat_rate(cfg, 3, 1)
        print(f"cobsat: 1 worker {one:.3f} prompts/s, {n} workers {many:.3f} prompts/s ({many / one:.2f}x)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
