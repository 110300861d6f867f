from __future__ import annotations

from prefect import flow

from flows import run_from_command_line
from tasks.corpus import build_corpus_task


@flow(name="build-corpus")
def build_corpus_flow(config: str = "tiny", overrides: list[str] | None = None) -> str:
    """Download the url list with img2dataset (tiny: the generated demo served on 127.0.0.1)."""
    return build_corpus_task(config, overrides or [])


if __name__ == "__main__":
    run_from_command_line(build_corpus_flow, "python -m flows.build_corpus")
