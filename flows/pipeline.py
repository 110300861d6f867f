from __future__ import annotations

from prefect import flow

from flows import run_from_command_line
from flows.build_corpus import build_corpus_flow
from flows.cache_features import cache_features_flow
from flows.evaluate_cobsat import evaluate_cobsat_flow
from flows.train_aligner import train_aligner_flow


@flow(name="thinkdiff-pipeline", log_prints=True)
def thinkdiff_pipeline_flow(config: str = "tiny", overrides: list[str] | None = None) -> dict[str, str]:
    """corpus -> features -> train -> register -> CoBSAT of the new version; every stage is skipped
    when its output is complete."""
    corpus_dir = build_corpus_flow(config, overrides)
    features_dir = cache_features_flow(config, overrides, corpus_dir)
    trained = train_aligner_flow(config, overrides, features_dir)
    evaluation = evaluate_cobsat_flow(config, overrides, model=trained["model"])
    print("\n" + evaluation["table"])  # the CoBSAT table (or why there is none), also in the run logs and MLflow
    outputs = {
        "corpus": corpus_dir,
        "features": features_dir,
        "checkpoint": trained["checkpoint"],
        "aligner": trained["aligner"],
        "loss curve": trained["loss curve"],
        "model": trained["model"],
    }
    if evaluation["results"]:  # none for ThinkDiff-CLIP, which CoBSAT does not score
        outputs |= {"cobsat": evaluation["results"], "accuracy": evaluation["accuracy"],
                    "samples": evaluation["samples"], "cobsat run": evaluation["mlflow_run"]}
        if evaluation["comparison"]:  # beside eval.baselines, e.g. the text bridge: the chart and the table
            outputs |= {"comparison": evaluation["comparison"], "comparison table": evaluation["comparison table"]}
    return outputs


if __name__ == "__main__":
    run_from_command_line(thinkdiff_pipeline_flow, "python -m flows.pipeline")
