"""Covers: a registered aligner version is an MLflow Model (models from code, safetensors weights, a
tensor signature, an input example, pinned requirements): `mlflow.pyfunc.load_model` predicts what
the aligner computes, `mlflow models serve` answers a scoring request on loopback, our own loader
reads the same artifacts, and a version registered before (the bare aligner files) still loads with
our loader while pyfunc names the missing MLmodel file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.types.schema import TensorSpec
from servers import free_port, stop

from thinkdiff import pipeline, registry
from thinkdiff.aligner_pyfunc import pinned_requirements
from thinkdiff.config import load_config
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.storage import stage_dir
from thinkdiff.train.loop import train_aligner


@pytest.fixture(scope="module")
def registered(tiny_store, tmp_path_factory):
    """A tiny trained run, logged and registered: (cfg, training result, version, store URI)."""
    _, features_dir = tiny_store
    root = tmp_path_factory.mktemp("mlflow-model")
    cfg = load_config("tiny", [f"paths.root={root}", "train.max_steps=4", "train.warmup_steps=2",
                               "train.log_every=2", "train.batch_size=4"])
    result = train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    return cfg, result, pipeline.register_aligner(cfg), registry.tracking_uri(cfg)


@pytest.fixture
def store(registered, monkeypatch):
    """MLflow's own functions (pyfunc, the CLI) pointed at the registered store, for this test only."""
    uri = registered[3]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return uri


def batch(aligner: Aligner) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, aligner.config.in_dim, generator=generator).numpy()


def aligned(aligner: Aligner, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return aligner(torch.from_numpy(features)).numpy()


def test_pyfunc_predicts_what_the_aligner_computes(registered, store):
    cfg, result, _, _ = registered
    aligner = Aligner.from_pretrained(result.aligner_dir).eval()
    features = batch(aligner)
    uri = f"models:/{cfg.tracking.registered_model}@candidate"
    model = mlflow.pyfunc.load_model(uri)
    predicted = model.predict(features)
    assert isinstance(predicted, np.ndarray) and predicted.dtype == np.float32
    assert predicted.shape == (3, 5, aligner.config.out_dim)
    np.testing.assert_allclose(predicted, aligned(aligner, features), rtol=0, atol=1e-6)
    in_dim, out_dim = aligner.config.in_dim, aligner.config.out_dim
    [inputs], [outputs] = model.metadata.get_input_schema().inputs, model.metadata.get_output_schema().inputs
    assert isinstance(inputs, TensorSpec) and isinstance(outputs, TensorSpec)
    assert (inputs.type, inputs.shape) == (np.dtype(np.float32), (-1, -1, in_dim))
    assert (outputs.type, outputs.shape) == (np.dtype(np.float32), (-1, -1, out_dim))
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    # Models from code: MLflow runs the saved source to load it, nothing is unpickled.
    assert model.metadata.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert set(pinned_requirements()) <= set(requirements)
    assert f"mlflow=={mlflow.__version__}" in requirements
    # Our loader reads the same artifacts.
    loaded = registry.Registry(cfg).load_aligner(uri)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in aligner.state_dict().items())
    np.testing.assert_allclose(aligned(loaded, features), predicted, rtol=0, atol=1e-6)


def test_a_served_model_answers_a_scoring_request(registered, store, tmp_path):
    cfg, result, _, _ = registered
    aligner = Aligner.from_pretrained(result.aligner_dir).eval()
    features = batch(aligner)
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m",
                                 f"models:/{cfg.tracking.registered_model}@candidate",
                                 "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"],
                                # The server runs `uvicorn` from PATH: the venv's, as after `source .venv/bin/activate`.
                                env={**os.environ, "MLFLOW_TRACKING_URI": store,
                                     "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                                cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow models serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping answer in 120 s: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": features.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        predicted = np.asarray(answer["predictions"], dtype=np.float32)
        assert predicted.shape == (3, 5, aligner.config.out_dim)
        np.testing.assert_allclose(predicted, aligned(aligner, features), rtol=0, atol=1e-6)
    finally:
        stop(proc)


def test_a_version_registered_before_loads_with_our_loader_only(registered, store, tmp_path):
    """Its `aligner` folder holds config.json + model.safetensors, no MLmodel."""
    cfg, _, _, uri = registered
    aligner = Aligner(AlignerConfig(in_dim=8, out_dim=16))
    saved = aligner.save_pretrained(tmp_path / "aligner")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(saved), "aligner")
    client.set_terminated(run.info.run_id)
    name = f"{cfg.tracking.registered_model}-bare"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/aligner", run_id=run.info.run_id)
    loaded = registry.Registry(cfg).load_aligner(f"models:/{name}/{version.version}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in aligner.state_dict().items())
    with pytest.raises(MlflowException, match="MLmodel"):
        mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
