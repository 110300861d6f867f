"""Covers: the README's deployment path against real servers on 127.0.0.1: `prefect server start`,
work pools, `prefect deploy --all` from flows/prefect.yaml, a process worker, and
`prefect deployment run train-aligner/train-aligner` on the tiny preset. The first run's processes
are killed (as a lost machine would be): its heartbeats stop and the automation of
flows/automations.yaml marks it Crashed; the rerun completes. Then, through MLflow's own client,
one training run, its metrics and a registered version with the `candidate` alias that loads back
into an Aligner. Worker and server are stopped by PID, also when the test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from servers import api, free_port, stop, wait_healthy

from thinkdiff import registry
from thinkdiff.config import load_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def kill_flow_run_processes(flow_run_id: str) -> int:
    """SIGKILL every process of one flow run (the engine and what it started carry its id in their
    environment), as the loss of its machine would end them; the number killed."""
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def wait_for(what: str, check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(2)
    raise TimeoutError(f"{what}: not after {timeout_s}s")


def test_train_aligner_deployment_registers_a_candidate(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "HF_HUB_OFFLINE": "1"}
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    root = tmp_path / "data"
    started: list[subprocess.Popen] = []

    def prefect(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    try:
        started.append(subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                        env=server_env, cwd=tmp_path, start_new_session=True,
                                        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT))
        wait_healthy(f"http://127.0.0.1:{port}/api/health", 120)
        prefect("work-pool", "create", "thinkdiff-process", "--type", "process")
        prefect("work-pool", "create", "thinkdiff-gpu", "--type", "process")
        deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file", "flows/prefect.yaml")
        for name in ("build-corpus/build-corpus", "cache-features/cache-features", "train-aligner/train-aligner",
                     "thinkdiff-pipeline/thinkdiff-pipeline", "train-aligner/paper-lvlm"):
            assert f"'{name}'" in deployed.stdout
        # The shipped automation, with heartbeats every 30 s (Prefect's least) and a 60 s silence, not
        # 60 s and 5 minutes, to keep the test short.
        automations = yaml.safe_load((REPO / "flows" / "automations.yaml").read_text())
        (automation,) = automations["automations"]
        automation["trigger"]["within"] = 60
        prefect("automation", "create", "--from-json", json.dumps(automation))
        job_env = json.dumps({"NO_ALBUMENTATIONS_UPDATE": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})

        def start_worker(log_name: str) -> subprocess.Popen:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "thinkdiff-process", "--limit", "1"],
                                      env=env, cwd=REPO, start_new_session=True,
                                      stdout=open(tmp_path / log_name, "w"), stderr=subprocess.STDOUT)
            started.append(worker)
            return worker

        mlflow_url = f"http://127.0.0.1:{free_port()}"  # the MLflow UI the flow run's artifacts link to
        params = {"overrides": [f"paths.root={root}", "corpus.demo_images=24", "corpus.shard_size=12",
                                "corpus.min_success_rate=0.8", "train.max_steps=12", "train.warmup_steps=2",
                                "train.log_every=4", f"tracking.ui_url={mlflow_url}"]}
        run_args = ["deployment", "run", "train-aligner/train-aligner", "--params", json.dumps(params),
                    "--job-variable", f"env={job_env}"]
        worker = start_worker("worker.log")
        first = prefect(*run_args)
        flow_run_id = str(uuid.UUID(first.stdout.split("UUID:")[1].split()[0]))
        base = env["PREFECT_API_URL"]
        heartbeats = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                                 "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}}
        wait_for("a heartbeat of the first run", lambda: api(f"{base}/events/filter", heartbeats)["events"], 300)
        # The machine is lost: the worker, the flow run and everything it started die at once.
        os.killpg(worker.pid, signal.SIGKILL)
        assert kill_flow_run_processes(flow_run_id) >= 1
        crashed = wait_for("the first run marked Crashed",
                           lambda: (state := api(f"{base}/flow_runs/{flow_run_id}")["state"])["type"] == "CRASHED"
                           and state, 240)
        assert "heartbeat" in crashed["message"]
        start_worker("worker-rerun.log")
        run = prefect(*run_args, "--watch", "--watch-timeout", "800")
        assert "Completed" in run.stdout

        # What the pages show, read through the servers' REST APIs: the flow run's artifacts, the
        # deployments' descriptions, and the MLflow UI (`mlflow ui`, as docs/deploy.md runs it) they link to.
        rerun_id = str(uuid.UUID(run.stdout.split("UUID:")[1].split()[0]))
        started.append(subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", f"sqlite:///{root.resolve()}/mlflow.db",
                                         "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1]],
                                        env=server_env, cwd=tmp_path, start_new_session=True,
                                        stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT))
        wait_healthy(f"{mlflow_url}/health", 120)
        mlflow_api = f"{mlflow_url}/api/2.0/mlflow"
        experiment = api(f"{mlflow_api}/experiments/get-by-name?experiment_name=thinkdiff-tiny")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        (training,) = api(f"{mlflow_api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert training["info"]["run_name"].startswith("tiny ") and training["info"]["run_name"].endswith(" 12 steps")
        version = api(f"{mlflow_api}/model-versions/get?name=thinkdiff-aligner-tiny&version=1")["model_version"]
        assert version["description"].startswith("ThinkDiff aligner (lvlm variant, preset tiny), trained 12 steps")
        artifacts = {a["key"]: a for a in api(f"{base}/artifacts/filter",
                                              {"artifacts": {"flow_run_id": {"any_": [rerun_id]}}})}
        run_link = f"{mlflow_url}/#/experiments/{experiment['experiment_id']}/runs/{training['info']['run_id']}"
        assert f"({run_link})" in artifacts["mlflow-training-run"]["data"]
        assert f"({mlflow_url}/#/models/thinkdiff-aligner-tiny/versions/1)" in artifacts["mlflow-model-version"]["data"]
        with urllib.request.urlopen(artifacts["loss-curve"]["data"], timeout=10) as image:  # the link serves the PNG
            assert image.read(4) == b"\x89PNG"
        (shards,) = api(f"{base}/artifacts/filter", {"artifacts": {"key": {"any_": ["corpus-success-rates"]}},
                                                     "sort": "CREATED_DESC", "limit": 1})
        rows = json.loads(shards["data"])  # 24 images and the demo's broken urls, 12 a shard
        assert [row["shard"] for row in rows] == ["00000.parquet", "00001.parquet", "00002.parquet"]
        assert sum(row["downloaded"] for row in rows) == 24
        nightly_paper = api(f"{base}/deployments/name/evaluate-cobsat/nightly-paper")
        assert nightly_paper["description"].startswith("Schedule INACTIVE")
        assert [s["active"] for s in nightly_paper["schedules"]] == [False]
        assert api(f"{base}/deployments/name/evaluate-cobsat/nightly")["description"].startswith("Schedule ACTIVE")
    finally:
        for proc in reversed(started):  # the worker before the server
            stop(proc)

    cfg = load_config("tiny", params["overrides"])
    uri = registry.tracking_uri(cfg)
    assert uri == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["train.max_steps"] == "12"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [4, 8, 12]
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "candidate")
    assert version.run_id == mlflow_run.info.run_id
    aligner = registry.Registry(cfg).load_aligner(f"models:/{cfg.tracking.registered_model}@candidate")
    assert aligner.config.in_dim == 64 and aligner.config.out_dim == 32
