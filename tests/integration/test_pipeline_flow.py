"""Covers: the thinkdiff-pipeline flow under Prefect's test harness on the tiny preset, against the
loopback demo corpus with broken urls and a file that is not an image: corpus shards and stats,
feature schema and manifest, trained checkpoint, library log lines in the Prefect run logs, and a
second run that skips every stage without touching a file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from thinkdiff import registry
from thinkdiff.config import load_config
from thinkdiff.data.features import ARROW_SCHEMA, FeatureStore
from thinkdiff.models.aligner import Aligner
from thinkdiff.train.checkpoint import read_meta

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def snapshot(root: Path) -> dict[str, int]:
    """Every stage output file and its mtime (MLflow's own database is a store, not an output)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for p in root.rglob("*") if p.is_file() and p.name != "mlflow.db"}


def test_pipeline_flow_end_to_end_then_skipped(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import thinkdiff_pipeline_flow

    overrides = [f"paths.root={tmp_path}", "corpus.demo_images=40", "corpus.shard_size=16",
                 "train.max_steps=30", "train.warmup_steps=5", "train.checkpoint_every=10", "train.log_every=10",
                 "eval.limit=1", "eval.tasks=[1, 2]", "eval.shots=[2, 4]"]
    out = thinkdiff_pipeline_flow(config="tiny", overrides=overrides)

    # Corpus: img2dataset shards with per-shard stats; the 3 broken urls are counted, not fatal.
    corpus = json.loads((Path(out["corpus"]) / "manifest.json").read_text())
    assert (corpus["count"], corpus["successes"]) == (43, 40)
    assert len(corpus["shards"]) == 3 and all((Path(out["corpus"]) / f"{i:05d}_stats.json").is_file() for i in range(3))
    assert corpus["errors"] and sum(s["failed_to_resize"] for s in corpus["shards"]) == 1

    # Features: one shard per corpus shard, the documented schema, a manifest written last.
    store = FeatureStore(out["features"], expect_model_id="tiny")
    assert store.num_samples == 40 and [p.name for p in store.shards] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_schema(store.shards[0]).remove_metadata() == ARROW_SCHEMA

    # Training through accelerate launch: the final checkpoint loads, its meta ties it to the features.
    checkpoint = Path(out["checkpoint"])
    assert checkpoint.name == "step_000030"
    assert Path(out["aligner"]) == checkpoint / "aligner"
    meta = read_meta(checkpoint)
    assert tmp_path / meta["features_dir"] == Path(out["features"]) and meta["config"]["train"]["max_steps"] == 30
    assert (checkpoint.parents[1] / "config.yaml").is_file() and Path(out["loss curve"]).is_file()
    # Registered in the local MLflow store as the candidate, then evaluated on the synthetic CoBSAT set.
    assert out["model"] == "models:/thinkdiff-aligner-tiny/1"
    registered = registry.Registry(load_config("tiny", overrides)).load_aligner(out["model"]).state_dict()
    trained = Aligner.from_pretrained(out["aligner"]).state_dict()
    assert registered.keys() == trained.keys() and all(torch.equal(registered[k], v) for k, v in trained.items())
    summary = json.loads((Path(out["cobsat"]) / "summary.json").read_text())
    assert Path(out["accuracy"]).is_file() and Path(out["samples"]).is_file()  # the charts the summary points to
    assert summary["num_prompts"] == 4 and set(summary["mean"]) == {"2", "4"}
    mlflow_client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    eval_run = mlflow_client.get_run(out["cobsat run"])
    assert eval_run.data.tags["thinkdiff.model_version"] == "1" and "cobsat.4shot.mean" in eval_run.data.metrics
    assert {a.path for a in mlflow_client.list_artifacts(out["cobsat run"])} >= {
        "results", "samples.png", "accuracy.png", "comparison.md"}
    # The text bridge beside it, as the table and the chart the summary names.
    assert "| text-bridge | tiny | 4 |" in Path(out["comparison table"]).read_text()
    assert Path(out["comparison"]).is_file()

    # Library log lines reach the Prefect run logs (sent in batches: flush, then poll briefly).
    wanted = {"thinkdiff.data.corpus", "thinkdiff.data.extract", "thinkdiff.train.launch"}
    for handler in logging.getLogger("thinkdiff").handlers:
        handler.flush()
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            names = {log.name for log in client.read_logs(limit=200)}
            if wanted <= names or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert wanted <= names

    # The flow run's artifacts, read back from the Prefect API: the CoBSAT table, links to MLflow, the
    # corpus success rate per shard and the loss curve.
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts() if a.key}
    assert {"cobsat-table", "mlflow-cobsat-run", "mlflow-training-run", "mlflow-model-version", "loss-curve",
            "corpus-success-rates"} <= set(artifacts)
    assert artifacts["cobsat-table"].type == "markdown"
    assert "| text-bridge | tiny | 4 |" in artifacts["cobsat-table"].data
    experiment = eval_run.info.experiment_id
    assert f"(http://127.0.0.1:5000/#/experiments/{experiment}/runs/{out['cobsat run']})" in artifacts[
        "mlflow-cobsat-run"].data
    assert "/#/models/thinkdiff-aligner-tiny/versions/1)" in artifacts["mlflow-model-version"].data
    training_run = mlflow_client.get_model_version("thinkdiff-aligner-tiny", "1").run_id
    assert f"/#/experiments/{experiment}/runs/{training_run})" in artifacts["mlflow-training-run"].data
    assert artifacts["loss-curve"].type == "image"
    assert "/get-artifact?path=loss_curve.png&run_uuid=" in artifacts["loss-curve"].data
    shards = json.loads(artifacts["corpus-success-rates"].data)
    assert [s["shard"] for s in shards] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert sum(s["downloaded"] for s in shards) == 40 and sum(s["urls"] for s in shards) == 43

    # A second run is skipped stage by stage: same outputs, not one file rewritten.
    before = snapshot(tmp_path)
    again = thinkdiff_pipeline_flow(config="tiny", overrides=overrides)
    assert again == out
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) == set(before)
