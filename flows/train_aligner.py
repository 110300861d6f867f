from __future__ import annotations

from prefect import flow

from flows import run_from_command_line
from flows.cache_features import cache_features_flow
from tasks.registry import register_aligner_task
from tasks.train import train_aligner_task


@flow(name="train-aligner")
def train_aligner_flow(
    config: str = "tiny", overrides: list[str] | None = None, features_dir: str | None = None
) -> dict[str, str]:
    """Train the aligner through `accelerate launch` and register it in MLflow as a `candidate`.

    Without `features_dir`, the cache-features flow runs first (a no-op when its output is complete).
    """
    overrides = overrides or []
    features_dir = features_dir or cache_features_flow(config, overrides)
    trained = train_aligner_task(config, overrides, features_dir)
    return {**trained, "model": register_aligner_task(config, overrides, trained["run"])}


if __name__ == "__main__":
    run_from_command_line(train_aligner_flow, "python -m flows.train_aligner")
