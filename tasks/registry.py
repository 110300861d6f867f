from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks import retry_on
from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.registry import TrackingUnavailableError


# A tracking server that is down may come back; anything else fails the same way again.
@task(name="register-aligner", retries=1, retry_delay_seconds=15, retry_condition_fn=retry_on(TrackingUnavailableError))
def register_aligner_task(config: str, overrides: list[str], run_dir: str | None = None) -> str:
    return pipeline.register_aligner(load_config(config, overrides), Path(run_dir) if run_dir else None).uri


@task(name="promote-aligner")
def promote_aligner_task(config: str, overrides: list[str], version: str, reason: str) -> str:
    return pipeline.promote_aligner(load_config(config, overrides), version, reason).uri
