from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_image_artifact, create_link_artifact

from tasks import retry_on
from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.registry import TrackingUnavailableError


# A tracking server that is down may come back; anything else fails the same way again.
@task(name="register-aligner", retries=1, retry_delay_seconds=15, retry_condition_fn=retry_on(TrackingUnavailableError))
def register_aligner_task(config: str, overrides: list[str], run_dir: str | None = None) -> str:
    """The registered version's URI; the flow run gets links to its MLflow run, its model version and its
    loss curve (in the MLflow UI of tracking.ui_url)."""
    ref = pipeline.register_aligner(load_config(config, overrides), Path(run_dir) if run_dir else None)
    create_link_artifact(ref.links["training run"], link_text=f"MLflow training run of {ref.name} v{ref.version}",
                         key="mlflow-training-run", description="The training run: params, loss, lr and throughput")
    create_link_artifact(ref.links["model version"], link_text=f"{ref.name} version {ref.version}",
                         key="mlflow-model-version", description="The registered aligner, its aliases and tags")
    create_image_artifact(ref.links["loss curve"], key="loss-curve",
                          description=f"Training loss of {ref.name} v{ref.version}")
    return ref.uri


@task(name="promote-aligner")
def promote_aligner_task(config: str, overrides: list[str], version: str, reason: str) -> str:
    return pipeline.promote_aligner(load_config(config, overrides), version, reason).uri
