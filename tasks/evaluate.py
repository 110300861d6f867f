from __future__ import annotations

from prefect import task

from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.eval import harness


# A full paper-scale run is about 6.4 h, and as much again the first time its text-bridge baseline is drawn.
@task(name="evaluate-cobsat", tags=["gpu"], timeout_seconds=24 * 3600)
def evaluate_cobsat_task(config: str, overrides: list[str], model: str | None) -> dict[str, str]:
    result = pipeline.evaluate_cobsat(load_config(config, overrides), model=model)
    if result.get("skipped"):
        return {"results": "", "mlflow_run": "", "table": result["table"], "comparison": ""}
    comparison = str(result["dir"] / harness.COMPARISON[1]) if result["baselines"] else ""  # the chart
    return {"results": str(result["dir"]), "mlflow_run": result["run_id"], "table": result["table"], "comparison": comparison}


@task(name="nightly-cobsat", tags=["gpu"], timeout_seconds=12 * 3600)
def nightly_evaluation_task(config: str, overrides: list[str]) -> dict:
    return pipeline.nightly_evaluation(load_config(config, overrides))
