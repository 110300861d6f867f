from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks import send_run_logs
from thinkdiff import pipeline
from thinkdiff.config import load_config


@task(name="train-aligner", tags=["gpu"], timeout_seconds=48 * 3600, on_completion=[send_run_logs],
      on_failure=[send_run_logs])
def train_aligner_task(config: str, overrides: list[str], features_dir: str | None) -> dict[str, str]:
    """The finished run's paths: its directory, final checkpoint, aligner and loss curve."""
    result = pipeline.launch_training(load_config(config, overrides), Path(features_dir) if features_dir else None)
    return {"run": str(result.run_dir), "checkpoint": str(result.checkpoint), "aligner": str(result.aligner_dir),
            "loss curve": str(result.loss_curve)}
