"""Covers: a finished training run becomes one MLflow run (flattened config params, metrics over
steps, loss curve and config artifacts, fingerprint and git tags); its aligner becomes a model
version with the `candidate` alias, loadable from models:/name@alias and models:/name/N;
registering again creates no duplicate; `champion` moves only through promote; an unreachable
tracking server fails fast naming the URI (without credentials) and registration succeeds later
from the same checkpoint without retraining."""

from __future__ import annotations

import socket

import pytest
import torch
from mlflow import MlflowClient

from thinkdiff import pipeline, registry
from thinkdiff.config import load_config
from thinkdiff.models.aligner import Aligner
from thinkdiff.storage import stage_dir
from thinkdiff.train.loop import train_aligner


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory):
    _, features_dir = tiny_store
    root = tmp_path_factory.mktemp("registry")
    cfg = load_config("tiny", [f"paths.root={root}", "train.max_steps=6", "train.warmup_steps=2",
                               "train.log_every=2", "train.batch_size=4"])
    result = train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    return cfg, result


def client_for(cfg):
    uri = registry.tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_and_registration_retries_later(trained):
    cfg, result = trained
    down = load_config("tiny", [f"paths.root={cfg.paths.root}", f"tracking.uri=http://user:s3cret@127.0.0.1:{closed_port()}",
                                "train.max_steps=6", "train.warmup_steps=2", "train.log_every=2", "train.batch_size=4"])
    with pytest.raises(registry.TrackingUnavailableError) as err:
        pipeline.register_checkpoint(down)
    message = str(err.value)
    assert "http://***@127.0.0.1:" in message and "s3cret" not in message
    assert "Checkpoints are kept" in message
    assert (result.aligner_dir / "model.safetensors").is_file()
    # The server is "back" (the local store): the same checkpoint registers, nothing retrains.
    stamp = (result.aligner_dir / "model.safetensors").stat().st_mtime_ns
    ref = pipeline.register_checkpoint(cfg)
    assert ref.version == "1"
    assert (result.aligner_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_run_is_logged_with_params_metrics_artifacts_and_tags(trained):
    cfg, result = trained
    ref = pipeline.register_checkpoint(cfg)
    client = client_for(cfg)
    run = client.get_run(ref.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["models.vlm.id"] == "tiny"
    assert run.data.tags[registry.TAG_TRAIN_FP] == result.run_dir.name
    assert run.data.tags[registry.TAG_FEATURES_FP] and run.data.tags[registry.TAG_CORPUS_FP]
    assert run.data.tags["mlflow.source.git.commit"]
    history = client.get_metric_history(ref.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("lr", "samples_per_s", "tokens_per_s"):
        assert len(client.get_metric_history(ref.run_id, key)) == 3
    artifacts = {a.path for a in client.list_artifacts(ref.run_id)}
    assert {"loss_curve.png", "config.yaml", "aligner", "metrics.jsonl"} <= artifacts
    assert {a.path for a in client.list_artifacts(ref.run_id, "aligner")} >= {"aligner/model.safetensors", "aligner/config.json"}


def test_version_has_candidate_alias_and_loads(trained):
    cfg, result = trained
    ref = pipeline.register_checkpoint(cfg)
    client = client_for(cfg)
    assert str(client.get_model_version_by_alias(cfg.tracking.registered_model, "candidate").version) == ref.version
    expected = Aligner.from_pretrained(result.aligner_dir).state_dict()
    for uri in (f"models:/{cfg.tracking.registered_model}@candidate", ref.uri):
        loaded = registry.load_aligner(uri, cfg).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_registering_twice_creates_no_duplicates(trained):
    cfg, _ = trained
    first = pipeline.register_checkpoint(cfg)
    second = pipeline.register_checkpoint(cfg)
    assert first == second
    client = client_for(cfg)
    assert len(client.search_model_versions(f"name='{cfg.tracking.registered_model}'")) == 1
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_champion_moves_only_by_promotion(trained):
    cfg, _ = trained
    ref = pipeline.register_checkpoint(cfg)
    client = client_for(cfg)
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    promoted = pipeline.promote(cfg, "candidate", reason="test")
    assert promoted.version == ref.version == str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert version.tags["thinkdiff.promotion_reason"] == "test" and version.tags["thinkdiff.promoted_at"]
    with pytest.raises(registry.RegistryError, match="no version or alias '42'"):
        pipeline.promote(cfg, "42")


def test_unfinished_run_is_not_logged(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="has not finished"):
        pipeline.register_checkpoint(cfg)
