from __future__ import annotations

from prefect import flow

from flows import run_from_command_line
from tasks.evaluate import evaluate_cobsat_nightly_task, evaluate_cobsat_task


@flow(name="evaluate-cobsat")
def evaluate_cobsat_flow(
    config: str = "tiny", overrides: list[str] | None = None, model: str | None = None, nightly: bool = False
) -> dict:
    """CoBSAT: evaluate one aligner (`model`: models:/name@alias, a dir or a .pth; default eval.aligner),
    or, with `nightly`, @champion and a newer @candidate, promoting the candidate when it scores higher."""
    if nightly:
        return evaluate_cobsat_nightly_task(config, overrides or [])
    return evaluate_cobsat_task(config, overrides or [], model)


if __name__ == "__main__":
    run_from_command_line(evaluate_cobsat_flow, "python -m flows.evaluate_cobsat")
