from __future__ import annotations

from pathlib import Path

from prefect import task

from thinkdiff import pipeline
from thinkdiff.config import load_config


@task(name="train-aligner", tags=["gpu"], timeout_seconds=48 * 3600)
def train_aligner_task(config: str, overrides: list[str], features_dir: str | None) -> str:
    cfg = load_config(config, overrides)
    return str(pipeline.launch_training(cfg, Path(features_dir) if features_dir else None))
