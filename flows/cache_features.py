from __future__ import annotations

from prefect import flow, unmapped

from flows import run_from_command_line, task_runner
from flows.build_corpus import build_corpus_flow
from tasks.features import cache_feature_shard_task, finalize_features_task, plan_feature_shards_task


@flow(name="cache-features")
def cache_features_flow(config: str = "tiny", overrides: list[str] | None = None, corpus_dir: str | None = None) -> str:
    """Caption every corpus shard with the VLM and cache its generated-token states (one task per shard).

    With cluster.engine=ray each shard is a Ray task on a worker of its own (docs/cluster.md).
    Without `corpus_dir`, the build-corpus flow runs first (a no-op when its output is complete).
    """
    overrides = overrides or []
    corpus_dir = corpus_dir or build_corpus_flow(config, overrides)
    shards = plan_feature_shards_task(config, overrides, corpus_dir)
    if shards:  # a complete store starts no cluster
        with task_runner(config, overrides) as runner:
            runner.map(cache_feature_shard_task, {"config": unmapped(config), "overrides": unmapped(overrides),
                                                  "corpus_shard": shards}).result()
    return finalize_features_task(config, overrides, corpus_dir)


if __name__ == "__main__":
    run_from_command_line(cache_features_flow, "python -m flows.cache_features")
