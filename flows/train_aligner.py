from __future__ import annotations

from prefect import flow

from flows import on_ray, run_from_command_line, task_runner
from flows.cache_features import cache_features_flow
from tasks.registry import register_aligner_task
from tasks.train import train_aligner_task


@flow(name="train-aligner")
def train_aligner_flow(
    config: str = "tiny", overrides: list[str] | None = None, features_dir: str | None = None
) -> dict[str, str]:
    """Train the aligner through `accelerate launch` and register it in MLflow as a `candidate`.

    With cluster.engine=ray the launch is a Ray task on a worker holding train.num_processes x
    cluster.gpus_per_worker GPUs. Without `features_dir`, the cache-features flow runs first (a no-op
    when its output is complete).
    """
    overrides = overrides or []
    features_dir = features_dir or cache_features_flow(config, overrides)
    if on_ray(config, overrides):
        with task_runner(config, overrides, training=True) as runner:
            trained = runner.submit(train_aligner_task, {"config": config, "overrides": overrides,
                                                         "features_dir": features_dir}).result()
    else:
        trained = train_aligner_task(config, overrides, features_dir)
    return {**trained, "model": register_aligner_task(config, overrides, trained["run"])}


if __name__ == "__main__":
    run_from_command_line(train_aligner_flow, "python -m flows.train_aligner")
