from __future__ import annotations

from pathlib import Path

from prefect import task

from thinkdiff.config import load_config
from thinkdiff.eval import stage


def _text(value: Path | str | None) -> str:
    return "" if value is None else str(value)


# A full paper-scale run is about 6.4 h, and as much again the first time its text-bridge baseline is drawn.
@task(name="evaluate-cobsat", tags=["gpu"], timeout_seconds=24 * 3600)
def evaluate_cobsat_task(config: str, overrides: list[str], model: str | None) -> dict[str, str]:
    """What the evaluation wrote, as strings: "" for what it has not (a skipped evaluation has no files,
    one without baselines no comparison)."""
    result = stage.evaluate_cobsat(load_config(config, overrides), model=model)
    return {"results": _text(result.results_dir), "mlflow_run": _text(result.run_id), "table": result.table,
            "comparison": _text(result.comparison_png), "comparison table": _text(result.comparison_md),
            "summary": _text(result.summary_md), "accuracy": _text(result.accuracy_png),
            "samples": _text(result.samples_png)}


@task(name="evaluate-cobsat-nightly", tags=["gpu"], timeout_seconds=12 * 3600)
def evaluate_cobsat_nightly_task(config: str, overrides: list[str]) -> dict:
    return stage.evaluate_cobsat_nightly(load_config(config, overrides)).report()
