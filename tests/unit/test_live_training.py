"""Covers: a training logged to MLflow as it trains (`tracking.live_training`): the run shows params,
rows and checkpoints before training ends, and registration completes that same run, which then
holds exactly the metrics of a run logged only afterwards; a tracking server stopped mid-run and
started again leaves one complete run; system metrics are logged beside the training's."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import free_port, stop, wait_healthy

from thinkdiff import pipeline, registry
from thinkdiff.config import load_config
from thinkdiff.storage import stage_dir
from thinkdiff.train.loop import train_aligner

MLFLOW = str(Path(sys.executable).parent / "mlflow")
TRAIN = ["train.warmup_steps=2", "train.log_every=2", "train.batch_size=4", "train.checkpoint_every=4"]


def client_for(cfg) -> MlflowClient:
    uri = registry.tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_live_run_is_completed_by_registration_with_the_metrics_of_a_run_logged_afterwards(tiny_store, tmp_path):
    _, features_dir = tiny_store
    live = load_config("tiny", [f"paths.root={tmp_path / 'live'}", "train.max_steps=8", *TRAIN,
                                "tracking.live_training=true"])
    result = train_aligner(live, features_dir, stage_dir(live, "train"))
    client = client_for(live)
    experiment = client.get_experiment_by_name(live.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    # Before registration: the run is there, RUNNING, with every row and checkpoint so far.
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.info.status == "RUNNING" and run.data.params["train.max_steps"] == "8"
    assert [(m.step, m.timestamp) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (r["step"], int(r["time"] * 1000)) for r in rows]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {
        "checkpoint/aligner", "checkpoint/meta.json"}  # the newest only
    meta = Path(client.download_artifacts(run.info.run_id, "checkpoint/meta.json", str(tmp_path)))
    assert json.loads(meta.read_text())["step"] == 8
    ref = pipeline.register_aligner(live)
    assert ref.run_id == run.info.run_id  # the same run, completed
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "8 steps, final loss" in run.data.tags["mlflow.note.content"]

    later = load_config("tiny", [f"paths.root={tmp_path / 'later'}", "train.max_steps=8", *TRAIN])
    train_aligner(later, features_dir, stage_dir(later, "train"))
    logged_later = pipeline.register_aligner(later)
    for key in ("loss", "lr"):
        assert history(client, ref.run_id, key) == history(client_for(later), logged_later.run_id, key)
    for key in ("samples_per_s", "tokens_per_s"):
        assert [s for s, _ in history(client, ref.run_id, key)] == [2, 4, 6, 8]


def test_a_resumed_training_does_not_continue_a_live_run_holding_rows_it_logs_again(tiny_store, tmp_path):
    """Killed after a row its last checkpoint does not cover, a training logs that row again: the live
    run holding the first one is ended as KILLED, and the run registered holds each point once."""
    _, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=8", *TRAIN, "tracking.live_training=true"])
    run_dir = stage_dir(cfg, "train")
    train_aligner(cfg, features_dir, run_dir, stop_after_steps=6)
    shutil.rmtree(run_dir / "checkpoints" / "step_000006")  # as if killed just before it was written
    train_aligner(cfg, features_dir, run_dir)
    ref = pipeline.register_aligner(cfg)
    client = client_for(cfg)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    (finished,) = [r for r in runs if r.info.status == "FINISHED"]
    assert finished.info.run_id == ref.run_id
    assert [s for s, _ in history(client, ref.run_id, "loss")] == [2, 4, 6, 8]


def _start_server(port: int, workdir: Path) -> subprocess.Popen:
    server = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=workdir, start_new_session=True,
                              stdout=open(workdir / "server.log", "a"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
    except TimeoutError:
        stop(server, signal.SIGKILL)
        raise
    return server


def test_a_server_stopped_mid_run_and_started_again_leaves_one_complete_run(tiny_store, tmp_path, monkeypatch):
    _, features_dir = tiny_store
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the live thread gives up at once
    port = free_port()
    cfg = load_config("tiny", [f"paths.root={tmp_path / 'data'}", "train.max_steps=80", *TRAIN,
                               f"tracking.uri=http://127.0.0.1:{port}", "tracking.live_training=true"])
    run_dir = stage_dir(cfg, "train")
    server = _start_server(port, tmp_path)
    try:
        training = threading.Thread(target=train_aligner, args=(cfg, features_dir, run_dir))
        training.start()
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text()):
            assert training.is_alive(), "training ended before it logged"
            time.sleep(0.02)
        stop(server, signal.SIGKILL)  # mid-run: training goes on without it
        rows_when_stopped = len(metrics.read_text().splitlines())
        training.join(300)
        assert rows_when_stopped < 40 == len(metrics.read_text().splitlines())
        server = _start_server(port, tmp_path)
        ref = pipeline.register_aligner(cfg)
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.run_id == ref.run_id and run.info.status == "FINISHED"
        for key in ("loss", "lr", "samples_per_s", "tokens_per_s"):
            assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(2, 81, 2))
    finally:
        stop(server)


def test_system_metrics_are_logged_in_the_live_run(tiny_store, tmp_path, monkeypatch):
    _, features_dir = tiny_store
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=160", *TRAIN, "tracking.live_training=true",
                               "tracking.system_metrics=true"])
    train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    client = client_for(cfg)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert "loss" in run.data.metrics


@pytest.mark.parametrize("setting", ["tracking.live_training=true"])
def test_an_unreachable_server_never_stops_training(tiny_store, tmp_path, setting, caplog):
    _, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=4", *TRAIN, setting,
                               f"tracking.uri=http://127.0.0.1:{free_port()}"])
    with caplog.at_level("WARNING", logger="thinkdiff.train.live"):
        result = train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    assert result.step == 4
    assert any("MLflow is not logging this training live" in r.getMessage() for r in caplog.records)


def test_an_evaluation_with_system_metrics_is_one_run_holding_them_and_its_scores(tiny_store, tmp_path, monkeypatch):
    from thinkdiff.eval import stage

    _, features_dir = tiny_store
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=2", *TRAIN, "tracking.system_metrics=true",
                               "eval.limit=2", "eval.tasks=[1, 4]", "eval.shots=[2]", "eval.baselines=[]"])
    train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    ref = pipeline.register_aligner(cfg)
    result = stage.evaluate_cobsat(cfg, model=ref.uri)
    client = client_for(cfg)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              "tags.`thinkdiff.kind` = 'cobsat-eval'")
    assert [r.info.run_id for r in runs] == [result.run_id]
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["thinkdiff.eval_set"] == "tasks 1,4; shots 2; 4 prompts"
    assert "system/cpu_utilization_percentage" in run.data.metrics and "cobsat.2shot.mean" in run.data.metrics
    assert run.data.tags["mlflow.runName"] == f"{ref.name} v{ref.version} · CoBSAT 2-shot · 4 prompts"


def test_a_monitored_evaluation_that_fails_ends_its_run_as_failed(tmp_path, monkeypatch):
    from thinkdiff.eval import harness, stage

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle", "eval.limit=1", "eval.tasks=[1]",
                               "eval.shots=[2]", "eval.baselines=[]", "tracking.system_metrics=true"])

    def interrupted(*args, **kwargs):
        time.sleep(0.5)
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.evaluate_cobsat(cfg)
    client = client_for(cfg)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["thinkdiff.eval_set"] == "tasks 1; shots 2; 1 prompts"
    monkeypatch.undo()  # the rerun draws, and logs one finished run beside the failed one
    result = stage.evaluate_cobsat(cfg)
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([run.info.experiment_id])}
    assert statuses == {run.info.run_id: "FAILED", result.run_id: "FINISHED"}
