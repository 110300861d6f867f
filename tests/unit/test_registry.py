"""Covers: a finished training run becomes one MLflow run (flattened config params, metrics over
steps, loss curve and config artifacts, fingerprint and git tags); its aligner becomes a model
version with the `candidate` alias, loadable from models:/name@alias and models:/name/N;
registering again creates no duplicate; `champion` moves only through promote; an unreachable
tracking server fails fast naming the URI (without credentials) and registration succeeds later
from the same checkpoint without retraining; a registration or evaluation logging killed midway
leaves no duplicate run after its rerun, and two processes first using a new store both succeed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient
from servers import free_port

from thinkdiff import generate, pipeline, registry
from thinkdiff.config import load_config
from thinkdiff.errors import ConfigError, DataContractError
from thinkdiff.eval import judge, stage
from thinkdiff.models.aligner import Aligner
from thinkdiff.storage import EVAL_SCHEMA_VERSION, read_manifest, stage_dir, train_fingerprint, write_manifest
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


def test_unreachable_server_fails_fast_and_registration_retries_later(trained):
    cfg, result = trained
    down = load_config("tiny", [f"paths.root={cfg.paths.root}", f"tracking.uri=http://user:s3cret@127.0.0.1:{free_port()}",
                                "train.max_steps=6", "train.warmup_steps=2", "train.log_every=2", "train.batch_size=4"])
    with pytest.raises(registry.TrackingUnavailableError) as err:
        pipeline.register_aligner(down)
    message = str(err.value)
    assert "http://***@127.0.0.1:" in message and "s3cret" not in message
    assert "Checkpoints are kept" in message
    assert (result.aligner_dir / "model.safetensors").is_file()
    # The server is "back" (the local store): the same checkpoint registers, nothing retrains.
    stamp = (result.aligner_dir / "model.safetensors").stat().st_mtime_ns
    ref = pipeline.register_aligner(cfg)
    assert ref.version == "1"
    assert (result.aligner_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_run_is_logged_with_params_metrics_artifacts_and_tags(trained, tiny_store):
    cfg, result = trained
    _, features_dir = tiny_store
    ref = pipeline.register_aligner(cfg)
    client = client_for(cfg)
    run = client.get_run(ref.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["models.vlm.id"] == "tiny"
    # Trained on the session's demo store, not this config's own features: the fingerprints name that store.
    store = read_manifest(features_dir)
    assert run.data.tags[registry.TAG_TRAIN_FP] == train_fingerprint(cfg, features_dir)
    assert run.data.tags[registry.TAG_FEATURES_FP] == store["fingerprint"]
    assert run.data.tags[registry.TAG_CORPUS_FP] == store["corpus_fingerprint"]
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["mlflow.source.name"] == "thinkdiff train"
    # Named from the preset and what differs from it, described, and as long as the training took.
    assert run.data.tags["mlflow.runName"] == "tiny batch_size=4 log_every=2 warmup_steps=2 6 steps"
    assert "6 steps, final loss" in run.data.tags["mlflow.note.content"]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.info.start_time < records[0]["time"] * 1000 and run.info.end_time == int(records[-1]["time"] * 1000)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs table
    history = client.get_metric_history(ref.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("lr", "samples_per_s", "tokens_per_s"):
        assert len(client.get_metric_history(ref.run_id, key)) == 3
    artifacts = {a.path for a in client.list_artifacts(ref.run_id)}
    assert {"loss_curve.png", "config.yaml", "aligner", "metrics.jsonl"} <= artifacts
    assert {a.path for a in client.list_artifacts(ref.run_id, "aligner")} >= {"aligner/MLmodel", "aligner/meta.json"}
    assert {a.path for a in client.list_artifacts(ref.run_id, "aligner/artifacts/aligner")} >= {
        "aligner/artifacts/aligner/model.safetensors", "aligner/artifacts/aligner/config.json"}


def test_version_has_candidate_alias_and_loads(trained):
    cfg, result = trained
    ref = pipeline.register_aligner(cfg)
    client = client_for(cfg)
    assert str(client.get_model_version_by_alias(cfg.tracking.registered_model, "candidate").version) == ref.version
    expected = Aligner.from_pretrained(result.aligner_dir).state_dict()
    for uri in (f"models:/{cfg.tracking.registered_model}@candidate", ref.uri):
        loaded = registry.Registry(cfg).load_aligner(uri).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_registering_twice_creates_no_duplicates(trained):
    cfg, _ = trained
    first = pipeline.register_aligner(cfg)
    second = pipeline.register_aligner(cfg)
    assert first == second
    client = client_for(cfg)
    assert len(client.search_model_versions(f"name='{cfg.tracking.registered_model}'")) == 1
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_registration_stopped_before_the_alias_gets_it_when_run_again(trained, tmp_path, monkeypatch):
    """The version exists but `candidate` was never set (the server went away in between): the rerun
    sets it, unless a newer version holds it by then. An older version found again by its weights
    does not take the alias back."""
    cfg, result = trained
    own = load_config("tiny", [f"paths.root={cfg.paths.root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    set_alias = MlflowClient.set_registered_model_alias
    failing = []

    def fails_when_asked(self, *args):
        if failing:
            failing.pop()
            raise RuntimeError("server went away")
        return set_alias(self, *args)

    def another_run(n):  # the same run with other aligner weights
        run = shutil.copytree(result.run_dir, tmp_path / f"run{n}")
        aligner = run / result.aligner_dir.relative_to(result.run_dir)
        weights = Aligner.from_pretrained(aligner)
        torch.nn.init.constant_(next(weights.parameters()), float(n))
        shutil.rmtree(aligner)
        weights.save_pretrained(aligner)
        write_manifest(run, {**read_manifest(run), "checkpoint": str(aligner.parent), "train_fingerprint": f"{n}" * 16})
        return run

    def register_stopped(run_dir):
        failing.append(True)
        with pytest.raises(RuntimeError, match="server went away"):
            pipeline.register_aligner(own, run_dir)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fails_when_asked)
    candidate = lambda: registry.Registry(own).current_version(registry.CANDIDATE)  # noqa: E731
    register_stopped(result.run_dir)
    assert candidate() is None
    first = pipeline.register_aligner(own, result.run_dir)
    assert candidate().version == first.version == "1"
    assert registry.TAG_CANDIDATE_PENDING not in client_for(own).get_model_version(
        own.tracking.registered_model, "1").tags
    # Version 2 stops before the alias and version 3 becomes the candidate: finishing 2 leaves it on 3.
    second_run, third_run = another_run(2), another_run(3)
    register_stopped(second_run)
    assert candidate().version == "1"
    assert pipeline.register_aligner(own, third_run).version == "3" == candidate().version
    assert pipeline.register_aligner(own, second_run).version == "2" and candidate().version == "3"
    assert pipeline.register_aligner(own, result.run_dir) == first and candidate().version == "3"
    assert registry.TAG_CANDIDATE_PENDING not in client_for(own).get_model_version(
        own.tracking.registered_model, "2").tags


def test_champion_moves_only_by_promotion(trained):
    cfg, _ = trained
    ref = pipeline.register_aligner(cfg)
    client = client_for(cfg)
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    promoted = pipeline.promote_aligner(cfg, "candidate", reason="test")
    assert promoted.version == ref.version == str(
        client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert version.tags["thinkdiff.promotion_reason"] == "test" and version.tags["thinkdiff.promoted_at"]
    with pytest.raises(registry.RegistryError, match=rf"no version or alias '42'; it has versions {ref.version} and "
                                                     rf"aliases @candidate \(version {ref.version}\), @champion"):
        pipeline.promote_aligner(cfg, "42")
    # Promoting the champion again changes nothing: its promotion's reason and time stay.
    assert pipeline.promote_aligner(cfg, ref.version, reason="again").version == ref.version
    again = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert again.tags["thinkdiff.promotion_reason"] == "test"
    assert again.tags["thinkdiff.promoted_at"] == version.tags["thinkdiff.promoted_at"]


def test_a_registry_checks_the_server_once_and_only_when_it_needs_it(trained, monkeypatch):
    """One health check serves all of a Registry's operations; loading an aligner from a directory
    and refusing a run that has not finished need no server, so a server that is down stops neither."""
    cfg, result = trained
    checked = []
    monkeypatch.setattr(registry, "check_reachable", lambda uri, timeout_s=5.0: checked.append(uri))
    reg = registry.Registry(cfg)
    ref = reg.register_checkpoint(result.run_dir)
    assert reg.current_version(registry.CANDIDATE) == ref == reg.resolve_model(ref.uri)
    assert reg.version_with_weights(reg.weights_digest(ref)) == ref
    assert reg.load_aligner(ref.uri) is not None
    assert checked == [registry.tracking_uri(cfg)]
    monkeypatch.undo()
    down = registry.Registry(load_config("tiny", [f"paths.root={cfg.paths.root}",
                                                  f"tracking.uri=http://127.0.0.1:{free_port()}"]))
    assert down.load_aligner(str(result.aligner_dir)) is not None
    with pytest.raises(FileNotFoundError, match="no such directory"):
        down.register_checkpoint(result.run_dir / "nope")


def test_unfinished_run_is_not_logged(tmp_path):
    # a folder of that name above: still a run
    cfg = load_config("tiny", [f"paths.root={tmp_path / 'checkpoints' / 'root'}"])
    stage_dir(cfg, "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        pipeline.register_aligner(cfg)


def test_a_path_named_aligner_is_drawn_while_the_tracking_server_is_down(trained, tmp_path):
    """The registry lookup is skipped with a warning; only the logging at the end waits for the
    server, and the drawn results stay for the rerun that logs them."""
    cfg, result = trained
    down = load_config("tiny", [f"paths.root={tmp_path}", f"tracking.uri=http://127.0.0.1:{free_port()}",
                                "eval.limit=1", "eval.tasks=[1]", "eval.shots=[2]", "eval.baselines=[]"])
    with pytest.raises(registry.TrackingUnavailableError):
        stage.evaluate_cobsat(down, model=str(result.aligner_dir))
    drawn = list((tmp_path / "eval").glob("*/results.jsonl"))
    assert len(drawn) == 1 and len(drawn[0].read_text().splitlines()) == down.eval.batch_size


def test_register_names_a_run_directory_given_wrong(trained, tiny_store, tmp_path):
    cfg, result = trained
    _, features_dir = tiny_store
    with pytest.raises(FileNotFoundError, match=r"training run .*/nope: no such directory"):
        pipeline.register_aligner(cfg, tmp_path / "nope")
    with pytest.raises(FileNotFoundError,
                       match=rf"is inside the training run {result.run_dir}: give the run directory itself"):
        pipeline.register_aligner(cfg, result.aligner_dir)
    with pytest.raises(DataContractError,
                       match=r"holds the output of the features stage; give the directory of a train stage output"):
        pipeline.register_aligner(cfg, features_dir)


def test_register_refuses_a_run_of_other_models_or_a_damaged_aligner(trained, tmp_path):
    """Nothing reaches MLflow: a run trained for other models than the config's (it would join that
    registry), and a run whose aligner weights are damaged (the evaluation would fail on it later)."""
    cfg, result = trained
    other = load_config("tiny", [f"paths.root={cfg.paths.root}", "models.t5.id=google/flan-t5-xxl"])
    with pytest.raises(DataContractError, match=r"trained for other models .*models.t5: run tiny \(revision tiny-v1\), "
                                                r"config google/flan-t5-xxl .*"
                                                r"--config tiny"):
        pipeline.register_aligner(other, result.run_dir)
    # The same weights run in another dtype are the same models.
    assert pipeline.register_aligner(load_config("tiny", [f"paths.root={cfg.paths.root}", "models.t5.dtype=bfloat16"]),
                                        result.run_dir).version
    damaged = shutil.copytree(result.run_dir, tmp_path / "damaged")
    aligner = damaged / result.aligner_dir.relative_to(result.run_dir)
    write_manifest(damaged, {**read_manifest(damaged), "checkpoint": str(aligner.parent),
                             "train_fingerprint": "d" * 16})
    (aligner / "model.safetensors").write_bytes((aligner / "model.safetensors").read_bytes()[:700])
    with pytest.raises(DataContractError, match=rf"{aligner}/model.safetensors is unreadable .* restore it"):
        pipeline.register_aligner(cfg, damaged)
    client = client_for(cfg)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.`thinkdiff.train_fingerprint` = 'dddddddddddddddd'")


def test_cobsat_evaluation_is_logged_against_the_version(trained, monkeypatch):
    cfg, training = trained
    ref = pipeline.register_aligner(cfg)
    eval_cfg = load_config("tiny", [f"paths.root={cfg.paths.root}", "train.max_steps=6", "train.warmup_steps=2",
                                    "train.log_every=2", "train.batch_size=4", "eval.limit=1", "eval.tasks=[1, 4]",
                                    "eval.shots=[2]"])
    result = stage.evaluate_cobsat(eval_cfg, model=f"models:/{cfg.tracking.registered_model}@candidate")
    assert result.model == ref
    client = client_for(cfg)
    run = client.get_run(result.run_id)
    assert run.data.tags["thinkdiff.model_version"] == ref.version
    assert {"cobsat.2shot.C-I", "cobsat.2shot.B-II", "cobsat.2shot.mean", "gen_images_per_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    files = (result.accuracy_png, result.samples_png, result.summary_md, result.results_jsonl, result.comparison_md,
             result.comparison_png)
    assert all(path.parent == result.results_dir and path.is_file() for path in files)
    assert {"results", *(path.name for path in files)} <= artifacts
    # The text bridge, evaluated beside it with the same settings, in its own directory and run.
    bridge = result.baselines["text-bridge"]
    assert bridge.num_prompts == result.summary.num_prompts == 2
    assert result.table == result.comparison_md.read_text().rstrip("\n")
    published, measured = result.table.split("Measured here:")
    # The papers' results first, apart, for the shots evaluated: never in the measured table.
    assert published.startswith("Published (reported by the papers, not measured here):")
    assert "| ThinkDiff-LVLM | Qwen2-VL-7B | 2 | 0.417 |" in published and "| 4 |" not in published
    lines = measured.strip("\n").splitlines()
    assert lines[0].startswith("| generator | VLM | shot | C-I |")
    assert [line.split(" | ")[:3] for line in lines[2:4]] == [["| thinkdiff", "tiny", "2"],
                                                             ["| text-bridge", "tiny", "2"]]
    assert lines[3].endswith(f"| {bridge.mean[2]:.3f} |")
    assert lines[4:] == ["", "2 prompts per generator; judge: synthetic reader (not CoBSAT's judge)"]
    assert run.data.tags["thinkdiff.judge"] == "synthetic reader (not CoBSAT's judge)"
    # The images in CoBSAT's own layout (a folder per task under the shot), for its evaluation code.
    shot_dir = "results/exps/thinkdiff_image/shot_2/default"
    assert [a.path for a in client.list_artifacts(result.run_id, shot_dir)] == [f"{shot_dir}/task_{t}" for t in (1, 4)]
    version = client.get_model_version(cfg.tracking.registered_model, ref.version)
    assert float(version.tags["cobsat.mean.2shot"]) == result.summary.mean[2]
    assert version.description.startswith("ThinkDiff aligner (lvlm variant, preset tiny), trained 6 steps")
    assert version.description.endswith(f"CoBSAT mean accuracy: 2-shot {result.summary.mean[2]:.3f}.")
    name = cfg.tracking.registered_model
    assert run.data.tags["mlflow.runName"] == f"{name} v{ref.version} · CoBSAT 2-shot · 2 prompts"
    # The run lasts as long as drawing and judging its prompts took (the directory may hold other prompts' rows).
    rows = [r for r in map(json.loads, result.results_jsonl.read_text().splitlines())
            if r["task"] in (1, 4) and r["shot"] == 2 and r["index"] == 0]
    assert len(rows) == 2
    assert run.info.end_time - run.info.start_time >= int(1000 * sum(r["gen_s"] + r["judge_s"] for r in rows)) - 1
    # Rerun: the results directory is complete and already logged; no model is loaded for it.
    def fail(*args):
        raise AssertionError("nothing to draw or judge: no model may be loaded")

    monkeypatch.setattr(generate, "build_generator", fail)
    monkeypatch.setattr(judge, "load_judge", fail)
    assert stage.evaluate_cobsat(eval_cfg, model=ref.uri).run_id == result.run_id
    # The same weights named by their path: the same results and run, linked to the version.
    by_path = stage.evaluate_cobsat(eval_cfg, model=str(training.aligner_dir))
    assert (by_path.results_dir, by_path.run_id, by_path.model) == (result.results_dir, result.run_id, ref)


@pytest.fixture
def two_versions(tiny_store, tmp_path):
    _, features_dir = tiny_store
    refs = []
    for seed in (0, 1):
        cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=4", "train.warmup_steps=1",
                                   "train.log_every=2", "train.batch_size=4", f"train.seed={seed}"])
        train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
        refs.append(pipeline.register_aligner(cfg))
    return cfg, refs


def _scored(mean: float) -> stage.CobsatEvaluation:
    return stage.CobsatEvaluation(table="", summary=SimpleNamespace(mean={2: mean, 4: mean}))


def test_a_store_file_that_is_not_sqlite_is_named(trained, tmp_path):
    cfg, result = trained
    elsewhere = load_config("tiny", [f"paths.root={tmp_path}"])
    (tmp_path / "mlflow.db").write_text("not a database")
    with pytest.raises(DataContractError,
                       match=rf"MLflow store {tmp_path}/mlflow.db is not an SQLite database: move it away"):
        pipeline.register_aligner(elsewhere, result.run_dir)
    assert (tmp_path / "mlflow.db").read_text() == "not a database"
    bogus = load_config("tiny", [f"paths.root={tmp_path}", "tracking.uri=bogus://user:s3cret@host/x"])
    with pytest.raises(ConfigError, match=r"tracking.uri='bogus://\*\*\*@host/x': "
                                          r"MLflow cannot open it .*http://host:5000") as err:
        pipeline.register_aligner(bogus, result.run_dir)
    assert "s3cret" not in str(err.value)


def test_a_nightly_with_nothing_registered_says_so(trained, caplog):
    cfg, _ = trained
    typo = load_config("tiny", [f"paths.root={cfg.paths.root}", "tracking.registered_model=thinkdiff-aligner-tiyn"])
    with caplog.at_level(logging.WARNING, logger="thinkdiff.eval.stage"):
        result = stage.evaluate_cobsat_nightly(typo)
    assert result.report() == {"champion": None, "candidate": None, "promoted": None} and result.evaluations == {}
    assert any("thinkdiff-aligner-tiyn has no @champion and no @candidate version" in r.getMessage()
               for r in caplog.records)


def test_nightly_promotes_only_a_better_candidate(two_versions, monkeypatch):
    cfg, (first, second) = two_versions
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    assert str(client.get_model_version_by_alias(name, "candidate").version) == second.version
    scores = {first.uri: 0.2, second.uri: 0.1}
    evaluated = []

    def fake_evaluate(cfg, model):
        assert cfg.eval.limit == cfg.eval.nightly_limit != 1000  # the nightly subset, not the full set
        assert cfg.eval.baselines == []  # the two versions only
        evaluated.append(model)
        return _scored(scores[model])

    monkeypatch.setattr(stage, "evaluate_cobsat", fake_evaluate)
    # No champion yet: the candidate becomes the first one.
    result = stage.evaluate_cobsat_nightly(cfg)
    assert result.promoted == second.version and evaluated == [second.uri]
    assert "no champion yet" in client.get_model_version(name, second.version).tags["thinkdiff.promotion_reason"]
    assert result.report() == {"champion": None, "candidate": second.version, "candidate_mean": 0.1,
                               "promoted": second.version}
    # Champion v2 (0.1); make v1 the candidate again, better: it is not newer, so not evaluated.
    client.set_registered_model_alias(name, "candidate", first.version)
    evaluated.clear()
    assert stage.evaluate_cobsat_nightly(cfg).promoted is None and evaluated == [second.uri]
    # A newer candidate that scores lower is evaluated and not promoted; one that scores higher is.
    pipeline.promote_aligner(cfg, first.version, "reset")
    client.set_registered_model_alias(name, "candidate", second.version)
    assert stage.evaluate_cobsat_nightly(cfg).promoted is None
    tags = client.get_model_version(name, second.version).tags
    assert tags["thinkdiff.promotion"] == "not promoted"
    assert tags["thinkdiff.promotion_reason"] == ("nightly CoBSAT: candidate mean 0.1000 <= champion v1 mean 0.2000 "
                                                  "on the same prompts (a tie keeps the champion)")
    scores[second.uri] = 0.2  # a tie keeps the champion
    assert stage.evaluate_cobsat_nightly(cfg).promoted is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    assert "0.2000 <= champion v1 mean 0.2000" in client.get_model_version(name, second.version).tags[
        "thinkdiff.promotion_reason"]
    scores[second.uri] = 0.3
    report = stage.evaluate_cobsat_nightly(cfg).report()
    assert report == {"champion": first.version, "candidate": second.version, "champion_mean": 0.2,
                      "candidate_mean": 0.3, "promoted": second.version}
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == second.version
    assert version.tags["thinkdiff.promotion"] == "promoted"
    assert "candidate mean 0.3000 > champion v1 mean 0.2000" in version.tags["thinkdiff.promotion_reason"]


def test_each_version_and_prompt_set_gets_its_own_evaluation_run(two_versions):
    """Two versions never share results or a run; a larger run, or one of more tasks, in the same
    directory is logged as a run of its own without drawing its prompts again, and a nightly subset
    afterwards does not replace the version's full-run tags."""
    cfg, (first, second) = two_versions
    client = client_for(cfg)

    def evaluate(ref, limit, tasks="[1]"):
        eval_cfg = load_config("tiny", [f"paths.root={cfg.paths.root}", "train.max_steps=4", "train.warmup_steps=1",
                                        "train.log_every=2", "train.batch_size=4", f"eval.limit={limit}",
                                        f"eval.tasks={tasks}", "eval.shots=[2]", "eval.batch_size=2",
                                        "eval.baselines=[]"])
        return stage.evaluate_cobsat(eval_cfg, model=ref.uri)

    one, two = evaluate(first, 1), evaluate(second, 1)
    assert one.results_dir != two.results_dir and one.run_id != two.run_id
    for ref, result in ((first, one), (second, two)):
        tags = client.get_run(result.run_id).data.tags
        assert tags["thinkdiff.model_version"] == ref.version and tags["mlflow.parentRunId"] == ref.run_id

    larger = evaluate(first, 3)
    assert larger.results_dir == one.results_dir and larger.run_id != one.run_id and larger.summary.num_prompts == 3
    subset = evaluate(first, 2)  # a prompt count not logged before: a run of its own, after the larger one
    assert subset.run_id not in (one.run_id, larger.run_id) and subset.summary.num_prompts == 2
    assert evaluate(first, 1).run_id == one.run_id  # already logged: no new run
    drawn = one.results_jsonl.read_text()
    both = evaluate(first, 1, tasks="[1, 4]")  # one more task: only its prompts are drawn
    assert both.results_dir == one.results_dir and both.run_id not in (one.run_id, larger.run_id, subset.run_id)
    assert one.results_jsonl.read_text().startswith(drawn)
    rows = [json.loads(line) for line in one.results_jsonl.read_text().splitlines()]
    assert sorted((r["task"], r["index"]) for r in rows) == [(1, 0), (1, 1), (1, 2), (1, 3), (4, 0), (4, 1)]
    assert client.get_run(both.run_id).data.tags["thinkdiff.eval_set"] == "tasks 1,4; shots 2; 2 prompts"
    tags = client.get_model_version(cfg.tracking.registered_model, first.version).tags
    assert tags["cobsat.prompts"] == "3" and tags["cobsat.eval_run"] == larger.run_id
    assert tags["cobsat.judge"] == "synthetic reader (not CoBSAT's judge)"
    assert tags["cobsat.mean.2shot"] == f"{larger.summary.mean[2]:.4f}"
    # Tags from verdicts of an older schema give way to the next evaluation, whatever its size.
    client.set_model_version_tag(cfg.tracking.registered_model, first.version, "cobsat.eval_schema", "1")
    assert evaluate(first, 1).run_id == one.run_id
    tags = client.get_model_version(cfg.tracking.registered_model, first.version).tags
    assert tags["cobsat.prompts"] == "1" and tags["cobsat.eval_run"] == one.run_id
    assert tags["cobsat.eval_schema"] == str(EVAL_SCHEMA_VERSION)


def test_an_evaluation_made_before_registration_is_linked_to_the_version_later(tiny_store, tmp_path):
    _, features_dir = tiny_store
    overrides = [f"paths.root={tmp_path}", "train.max_steps=2", "train.warmup_steps=1", "train.batch_size=4",
                 "eval.limit=1", "eval.tasks=[1]", "eval.shots=[2]", "eval.baselines=[]"]
    cfg = load_config("tiny", overrides)
    trained = train_aligner(cfg, features_dir, stage_dir(cfg, "train"))
    by_path = stage.evaluate_cobsat(cfg, model=str(trained.aligner_dir))
    assert by_path.model is None  # not registered yet
    ref = pipeline.register_aligner(cfg)
    by_version = stage.evaluate_cobsat(cfg, model=ref.uri)
    # Nothing drawn or logged again.
    assert (by_version.results_dir, by_version.run_id) == (by_path.results_dir, by_path.run_id)
    client = client_for(cfg)
    tags = client.get_run(by_path.run_id).data.tags
    assert (tags["thinkdiff.model_version"], tags["mlflow.parentRunId"]) == (ref.version, ref.run_id)
    version = client.get_model_version(cfg.tracking.registered_model, ref.version)
    assert version.tags["cobsat.eval_run"] == by_path.run_id and version.tags["cobsat.prompts"] == "1"


# A registration (spec `run_dir`) or an evaluation's logging (spec `out_dir`) in a process of its own.
# With `stop_after` [method, n] it touches `signal` after its n-th call of that MlflowClient method and
# waits to be killed; with `barrier` it starts once the folder holds `go`.
_CHILD = """
import json, os, sys, time
from pathlib import Path
from pathlib import Path
from types import SimpleNamespace
from mlflow import MlflowClient
from thinkdiff import registry
from thinkdiff.config import load_config

spec = json.loads(sys.argv[1])
if spec.get("stop_after"):
    method, nth = spec["stop_after"]
    original, calls = getattr(MlflowClient, method), []

    def stopping(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(method)
        if len(calls) == nth:
            Path(spec["signal"]).touch()
            time.sleep(120)
        return result

    setattr(MlflowClient, method, stopping)
reg = registry.Registry(load_config("tiny", spec["overrides"]))
if spec.get("barrier"):
    Path(spec["barrier"], f"ready-{os.getpid()}").touch()
    while not Path(spec["barrier"], "go").exists():
        time.sleep(0.01)
if "run_dir" in spec:
    print(reg.register_checkpoint(Path(spec["run_dir"])).version)
else:
    def keyed(value):  # JSON made the shots' and tasks' numbers strings
        return {int(k): keyed(v) for k, v in value.items()} if isinstance(value, dict) else value

    summary = SimpleNamespace(**{k: keyed(v) for k, v in spec["summary"].items()})
    print(reg.log_evaluation(Path(spec["out_dir"]), summary, None, "thinkdiff"))
"""
_SUMMARY = {"accuracy": {2: {1: 0.5}}, "mean": {2: 0.5}, "clip_accuracy": {2: {1: 0.5}},
            "clip_similarity": {2: {1: 0.25}}, "num_prompts": 2, "judge": "synthetic reader",
            "gen_images_per_s": 1.0, "gen_s_per_prompt": 1.0, "judge_s_per_prompt": 1.0}


@pytest.fixture(scope="module")
def new_store(tmp_path_factory):
    """An empty sqlite store, to copy: MLflow's migrations making its tables take seconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_registered_models()
    return path


def _store_in(new_store, directory):
    shutil.copyfile(new_store, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


def _start(spec):
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(child):
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    return out.strip()


def _kill_midway(spec, tmp_path, method, nth):
    """Run `spec` in a child and SIGKILL it after its `nth` call of MlflowClient.`method`."""
    stopped = tmp_path / "stopped"
    child = _start({**spec, "stop_after": [method, nth], "signal": str(stopped)})
    deadline = time.monotonic() + 60
    while not stopped.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the point to kill it at"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()


def _eval_dir(tmp_path, name="0123456789abcdef"):
    out_dir = tmp_path / "eval" / name
    (out_dir / "results").mkdir(parents=True)
    (out_dir / "results" / "0.jpg").write_bytes(b"jpeg")
    return out_dir


def _runs(client, cfg, tag, value):
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([experiment.experiment_id], f"tags.`{tag}` = '{value}'")


@pytest.mark.parametrize("stop_after", [("create_run", 1), ("log_artifact", 2)], ids=["created", "half-logged"])
def test_a_registration_killed_midway_is_completed_by_the_rerun(trained, new_store, tmp_path, stop_after):
    """Killed once its run is made (empty, or with params, metrics and some artifacts): the rerun
    completes that run, logging nothing twice, and registers the version once."""
    cfg, result = trained
    own = load_config("tiny", [f"paths.root={cfg.paths.root}", f"tracking.uri={_store_in(new_store, tmp_path)}"])
    spec = {"overrides": [f"paths.root={cfg.paths.root}", f"tracking.uri={own.tracking.uri}"],
            "run_dir": str(result.run_dir)}
    _kill_midway(spec, tmp_path, *stop_after)
    client = client_for(own)
    fingerprint = read_manifest(result.run_dir)["train_fingerprint"]
    [stale] = _runs(client, own, registry.TAG_TRAIN_FP, fingerprint)
    assert stale.info.status == "RUNNING"
    assert registry.Registry(own).register_checkpoint(result.run_dir).version == "1"
    [run] = _runs(client, own, registry.TAG_TRAIN_FP, fingerprint)
    assert (run.info.run_id, run.info.status) == (stale.info.run_id, "FINISHED")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "loss_curve.png", "aligner"}
    assert [str(v.version) for v in client.search_model_versions(f"name='{own.tracking.registered_model}'")] == ["1"]
    assert registry.Registry(own).current_version(registry.CANDIDATE).run_id == run.info.run_id


def test_a_stale_run_that_cannot_be_completed_is_ended_and_replaced(trained, new_store, tmp_path):
    """A RUNNING run of the fingerprint whose params differ (MLflow keeps a param's first value) is
    ended as KILLED, and the registration logs a run of its own."""
    cfg, result = trained
    own = load_config("tiny", [f"paths.root={cfg.paths.root}", f"tracking.uri={_store_in(new_store, tmp_path)}"])
    reg = registry.Registry(own)
    fingerprint = read_manifest(result.run_dir)["train_fingerprint"]
    other = reg.client.create_run(reg.experiment_id, tags={registry.TAG_TRAIN_FP: fingerprint}).info.run_id
    reg.client.log_param(other, "train.lr", "0.5")
    ref = reg.register_checkpoint(result.run_dir)
    runs = {r.info.run_id: r.info.status for r in _runs(reg.client, own, registry.TAG_TRAIN_FP, fingerprint)}
    assert runs == {other: "KILLED", ref.run_id: "FINISHED"}


def test_an_evaluation_logging_killed_midway_is_replaced_by_the_rerun(new_store, tmp_path):
    """Its metrics carry the time they were logged and its params the evaluation's config, so the
    stale run is ended as KILLED and one new run logged; a further rerun finds that one."""
    out_dir = _eval_dir(tmp_path)
    _store_in(new_store, tmp_path)  # the store under paths.root
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    spec = {"overrides": [f"paths.root={tmp_path}"], "out_dir": str(out_dir), "summary": _SUMMARY}
    _kill_midway(spec, tmp_path, "create_run", 1)
    client = client_for(cfg)
    [stale] = _runs(client, cfg, "thinkdiff.eval_dir", out_dir.name)
    assert stale.info.status == "RUNNING"
    run_id = registry.Registry(cfg).log_evaluation(out_dir, SimpleNamespace(**_SUMMARY), None, "thinkdiff")
    runs = {r.info.run_id: r.info.status for r in _runs(client, cfg, "thinkdiff.eval_dir", out_dir.name)}
    assert runs == {stale.info.run_id: "KILLED", run_id: "FINISHED"}
    assert registry.Registry(cfg).log_evaluation(out_dir, SimpleNamespace(**_SUMMARY), None, "thinkdiff") == run_id


def test_two_processes_first_using_a_new_store_both_succeed(tmp_path):
    """Two processes creating the sqlite store under paths.root at once (MLflow's table migrations,
    the experiment) both succeed, and the store holds both their runs."""
    root, barrier = tmp_path / "root", tmp_path / "barrier"
    barrier.mkdir()
    cfg = load_config("tiny", [f"paths.root={root}"])
    children = [_start({"overrides": [f"paths.root={root}"], "barrier": str(barrier), "summary": _SUMMARY,
                        "out_dir": str(_eval_dir(tmp_path, name))}) for name in ("a" * 16, "b" * 16)]
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < 2:
        assert all(child.poll() is None for child in children), [child.communicate()[1][-3000:] for child in children]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not (root / "mlflow.db").exists()
    (barrier / "go").touch()
    logged = [_finish(child) for child in children]
    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert runs == dict.fromkeys(logged, "FINISHED") and len(runs) == 2


def test_a_copied_or_moved_root_reads_its_own_files(trained, tmp_path):
    """Manifests and tags record paths inside paths.root relative to it, and the sqlite store follows
    its root, so a copy of a root registers and loads its own aligner, not the original's, and a
    moved root works where its old place is gone."""
    cfg, result = trained
    ref = pipeline.register_aligner(cfg)
    expected = Aligner.from_pretrained(result.aligner_dir).state_dict()
    root = Path(cfg.paths.root)
    # Text that merely starts like the old artifact root is not a location: it stays as it is.
    lookalike = f"{(root / 'mlartifacts').resolve()}_old/x"
    client_for(cfg).set_tag(ref.run_id, "note.lookalike", lookalike)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    original_root = cfg.paths.root
    try:
        # The original's files change after the copy: the copy must not see it.
        for weights in root.rglob("model.safetensors"):
            weights.write_bytes(b"changed after the copy")
        copied = load_config("tiny", [f"paths.root={copy}", *cfg_overrides(cfg)])
        assert pipeline.trained_aligner_dir(copied).is_relative_to(copy)
        assert pipeline.register_aligner(copied) == ref  # the same version: the copy's aligner has its sha256
        loaded = registry.Registry(copied).load_aligner(f"models:/{copied.tracking.registered_model}@candidate")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
        run = client_for(copied).get_run(ref.run_id)
        assert run.data.tags["thinkdiff.run_dir"] == str(result.run_dir.relative_to(root))
        assert run.info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
        assert run.data.tags["note.lookalike"] == lookalike
        # Moved: its old place is gone.
        moved = tmp_path / "moved"
        copy.rename(moved)
        there = load_config("tiny", [f"paths.root={moved}", *cfg_overrides(cfg)])
        loaded = registry.Registry(there).load_aligner(ref.uri)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
        assert pipeline.register_aligner(there) == ref
    finally:
        for weights in root.rglob("model.safetensors"):  # the module's later tests use the original
            source = copy if copy.exists() else tmp_path / "moved"
            shutil.copyfile(source / weights.relative_to(root), weights)
    assert cfg.paths.root == original_root


def cfg_overrides(cfg) -> list[str]:
    """The `trained` fixture's training overrides (its root aside)."""
    return [f"train.{k}={getattr(cfg.train, k)}" for k in ("max_steps", "warmup_steps", "log_every", "batch_size")]


def test_an_aligner_trained_on_another_vlm_is_refused_before_any_model_loads(trained, monkeypatch):
    cfg, result = trained
    ref = pipeline.register_aligner(cfg)
    other = load_config("tiny", [f"paths.root={cfg.paths.root}", "models.vlm.id=Qwen/Qwen2-VL-7B-Instruct"])
    monkeypatch.setattr(generate, "build_generator", lambda *a: pytest.fail("no model may load"))
    for spec in (ref.uri, str(result.aligner_dir)):
        with pytest.raises(DataContractError) as err:
            stage.evaluate_cobsat(other, model=spec)
        assert str(err.value) == (f"aligner {spec} was trained on the features of tiny, but models.vlm.id is "
                                  "Qwen/Qwen2-VL-7B-Instruct: set models.vlm.id=tiny, or use an aligner trained for "
                                  "Qwen/Qwen2-VL-7B-Instruct")
