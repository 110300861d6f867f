from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks import send_run_logs
from thinkdiff import pipeline
from thinkdiff.config import load_config


@task(name="plan-feature-shards")
def plan_feature_shards_task(config: str, overrides: list[str], corpus_dir: str | None) -> list[str]:
    cfg = load_config(config, overrides)
    return [str(p) for p in pipeline.pending_feature_shards(cfg, Path(corpus_dir) if corpus_dir else None)]


# No timeout: mapped, this task runs in a worker thread, where Prefect cannot enforce one (it would
# only log a warning for every shard).
@task(name="cache-feature-shard", tags=["gpu"], on_completion=[send_run_logs], on_failure=[send_run_logs])
def cache_feature_shard_task(config: str, overrides: list[str], corpus_shard: str) -> str:
    return str(pipeline.cache_feature_shard(load_config(config, overrides), Path(corpus_shard)))


@task(name="finalize-features")
def finalize_features_task(config: str, overrides: list[str], corpus_dir: str | None) -> str:
    cfg = load_config(config, overrides)
    return str(pipeline.finalize_features(cfg, Path(corpus_dir) if corpus_dir else None))
