from __future__ import annotations

from prefect import flow, unmapped

from flows import run_from_command_line
from flows.build_corpus import build_corpus_flow
from tasks.features import cache_feature_shard_task, finalize_features_task, plan_feature_shards_task


@flow(name="cache-features")
def cache_features_flow(config: str = "tiny", overrides: list[str] | None = None, corpus_dir: str | None = None) -> str:
    """Caption every corpus shard with the VLM and cache its generated-token states (one task per shard).

    Without `corpus_dir`, the build-corpus flow runs first (a no-op when its output is complete).
    """
    overrides = overrides or []
    corpus_dir = corpus_dir or build_corpus_flow(config, overrides)
    shards = plan_feature_shards_task(config, overrides, corpus_dir)
    cache_feature_shard_task.map(unmapped(config), unmapped(overrides), shards).result()
    return finalize_features_task(config, overrides, corpus_dir)


if __name__ == "__main__":
    run_from_command_line(cache_features_flow, "python -m flows.cache_features")
