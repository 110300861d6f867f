from __future__ import annotations

from prefect import flow

from flows import run_from_command_line
from tasks.train import train_aligner_task


@flow(name="train-aligner")
def train_aligner_flow(config: str = "tiny", overrides: list[str] | None = None, features_dir: str | None = None) -> str:
    """Train the aligner through `accelerate launch`; returns the final checkpoint directory."""
    return train_aligner_task(config, overrides or [], features_dir)


if __name__ == "__main__":
    run_from_command_line(train_aligner_flow, "python -m flows.train_aligner")
