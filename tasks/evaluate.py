from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

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
    create_markdown_artifact(f"## CoBSAT accuracy\n\n{result.table}\n", key="cobsat-table",
                             description="Accuracy per task and shot, beside eval.baselines")
    if result.run_url:
        create_link_artifact(result.run_url, link_text="MLflow run of this CoBSAT evaluation",
                             key="mlflow-cobsat-run", description="Metrics, charts, samples and every drawn image")
    return {"results": _text(result.results_dir), "mlflow_run": _text(result.run_id), "table": result.table,
            "comparison": _text(result.comparison_png), "comparison table": _text(result.comparison_md),
            "summary": _text(result.summary_md), "accuracy": _text(result.accuracy_png),
            "samples": _text(result.samples_png)}


@task(name="evaluate-cobsat-nightly", tags=["gpu"], timeout_seconds=12 * 3600)
def evaluate_cobsat_nightly_task(config: str, overrides: list[str]) -> dict:
    report = stage.evaluate_cobsat_nightly(load_config(config, overrides)).report()
    rows = "\n".join(f"| {key} | {value} |" for key, value in report.items())
    create_markdown_artifact(f"## Nightly CoBSAT\n\n| | |\n|---|---|\n{rows}\n", key="cobsat-nightly",
                             description="The versions evaluated, their means and the promotion")
    return report
