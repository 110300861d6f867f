"""Stage entry points with their default locations derived from the config.

Each function runs one stage (or one unit of it) into `{paths.root}/{stage}/{fingerprint}/`, is
skipped when that work is complete, and returns where its output is. The CLI and the Prefect
tasks call these; neither holds stage logic of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkdiff import registry
from thinkdiff.config import RunConfig, fingerprint
from thinkdiff.data import corpus, extract
from thinkdiff.errors import ConfigError
from thinkdiff.eval import dataset, harness, judge
from thinkdiff.models.aligner import WEIGHTS_NAME, weights_sha256
from thinkdiff.storage import EVAL_SCHEMA_VERSION, read_manifest, stage_dir
from thinkdiff.train import launch, loop

log = logging.getLogger(__name__)


def build_corpus(cfg: RunConfig, out_dir: Path | None = None) -> Path:
    return corpus.build_corpus(cfg.corpus, out_dir or stage_dir(cfg, "corpus"))


def _corpus_dir(cfg: RunConfig, corpus_dir: Path | None) -> Path:
    """The corpus the features stage reads: the config's own only once its stage completed (its
    manifest is written after the download passed `corpus.min_success_rate`), and only while its
    success rate clears this config's bar too; a directory given by hand may also be any
    img2dataset output (its shards' stats files)."""
    own_dir = stage_dir(cfg, "corpus")
    own = corpus_dir is None or corpus_dir.resolve() == own_dir.resolve()
    corpus_dir = corpus_dir or own_dir
    manifest = read_manifest(corpus_dir, "corpus")
    if manifest is not None:
        corpus.check_accepted_rate(corpus_dir, manifest, cfg.corpus)
    else:
        rerun = "run `thinkdiff corpus` with the same --config and overrides"
        if own and corpus_dir.is_dir():
            raise FileNotFoundError(f"the corpus at {corpus_dir} has not completed (no manifest.json: its download stopped or "
                                    f"failed the corpus.min_success_rate check): {rerun}; it resumes where it stopped, and "
                                    "a lower corpus.min_success_rate accepts the shards already downloaded")
        if own or not list(corpus_dir.glob("*_stats.json")):
            raise FileNotFoundError(f"no corpus at {corpus_dir}: {rerun}, or pass --corpus DIR (img2dataset parquet output)")
    return corpus_dir


def extract_features(cfg: RunConfig, corpus_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """The whole features stage in this process."""
    return extract.extract_features(cfg, _corpus_dir(cfg, corpus_dir), out_dir or stage_dir(cfg, "features", corpus_dir))


def pending_feature_shards(cfg: RunConfig, corpus_dir: Path | None = None) -> list[Path]:
    """Corpus shards still to extract: the units a distributed features stage maps over."""
    return extract.pending_feature_shards(_corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features", corpus_dir))


def extract_feature_shard(cfg: RunConfig, corpus_shard: Path) -> Path:
    return extract.extract_feature_shard(cfg, corpus_shard, stage_dir(cfg, "features", corpus_shard.parent))


def finalize_features(cfg: RunConfig, corpus_dir: Path | None = None) -> Path:
    return extract.finalize_features(cfg, _corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features", corpus_dir))


def train_aligner(cfg: RunConfig, features_dir: Path | None = None, run_dir: Path | None = None) -> loop.TrainResult:
    """Train in this process (what each `accelerate launch` process runs)."""
    return loop.train_aligner(cfg, features_dir or stage_dir(cfg, "features"), run_dir or stage_dir(cfg, "train", features_dir))


def launch_training(cfg: RunConfig, features_dir: Path | None = None) -> Path:
    """Train through `accelerate launch` subprocesses; returns the final checkpoint directory."""
    return launch.launch_training(cfg, features_dir or stage_dir(cfg, "features"), stage_dir(cfg, "train", features_dir))


def register_checkpoint(cfg: RunConfig, run_dir: Path | None = None) -> registry.ModelVersionRef:
    """Log a finished training run (by default this config's) to MLflow and register its aligner
    (idempotent)."""
    return registry.register_checkpoint(cfg, run_dir or stage_dir(cfg, "train"))


def promote(cfg: RunConfig, version: str, reason: str = "manual promotion") -> registry.ModelVersionRef:
    return registry.promote(cfg, version, reason)


def trained_aligner_dir(cfg: RunConfig) -> Path:
    """The final aligner of this config's finished training run."""
    run_dir = stage_dir(cfg, "train")
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise FileNotFoundError(f"no finished training run at {run_dir}: train first (`thinkdiff train` "
                                "with the same --config and overrides) "
                                "or name an aligner (eval.aligner / --aligner / --model)")
    return Path(manifest["checkpoint"]) / loop.ALIGNER_DIR


def aligner_spec(cfg: RunConfig, explicit: str | None = None) -> str:
    """Which aligner to draw with: the one asked for, else `eval.aligner`, else this config's own.
    A local path is checked here, before any model loads or any result file is made."""
    spec = explicit or cfg.eval.aligner or str(trained_aligner_dir(cfg))
    if spec.startswith("models:/"):
        return spec
    path = Path(spec)
    named_by = "--model / --aligner" if explicit else "eval.aligner" if cfg.eval.aligner else "this config's training run"
    forms = "give models:/NAME@ALIAS, models:/NAME/N, an aligner directory (config.json + model.safetensors) or the official .pth"
    if not path.exists():
        raise FileNotFoundError(f"aligner {spec} ({named_by}): no such file or directory; {forms}")
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        run = read_manifest(path)
        inside = f"; this training run's aligner is {Path(run['checkpoint']) / loop.ALIGNER_DIR}" if run and run.get("stage") == "train" else ""
        raise FileNotFoundError(f"aligner {spec} ({named_by}): no {WEIGHTS_NAME} in this directory{inside}; {forms}")
    if path.is_file() and path.suffix not in (".pth", ".pt"):
        raise ValueError(f"aligner {spec} ({named_by}): not an official .pth checkpoint; {forms}")
    return spec


def clip_scorer(cfg: RunConfig):
    """CoBSAT's CLIP metric with `eval.clip_model`, loaded once per process."""
    from thinkdiff.eval.clip_score import load_clip_scorer
    from thinkdiff.models.common import shared

    return shared(load_clip_scorer, cfg.eval.clip_model)


def built_on_first_call(build: Callable[[], Callable]) -> Callable:
    """A stand-in for the callable `build()` makes, made at its first call."""
    made = functools.cache(build)
    return lambda *args: made()(*args)


def evaluate_cobsat(cfg: RunConfig, model: str | None = None) -> dict[str, Any]:
    """CoBSAT with `eval.generator` into {paths.root}/eval/{fingerprint}/ (resumable), logged to MLflow.

    For the thinkdiff generator the aligner is `model` (e.g. models:/name@champion), else
    `eval.aligner`, else this config's own trained aligner; a registry alias is pinned to the
    version it names now, so results are logged against that version. Beside it, each of
    `eval.baselines` is evaluated with the same settings (in its own directory, so drawn once
    whatever the aligner) and `comparison.md` / `comparison.png` show them side by side. The
    generators and the judge are loaded at their first call: a run whose results are all there
    loads no model, and the models are shared with the rest of the process
    (`thinkdiff.models.common.shared`).
    """
    from thinkdiff import generate  # FLUX (diffusers) only when something is drawn

    e = cfg.eval
    if model is not None and e.generator != "thinkdiff":
        raise ConfigError(f"an aligner was named ({model}), but eval.generator={e.generator} draws without one: set "
                          "eval.generator=thinkdiff, or leave the aligner out")
    if cfg.variant == "clip":
        note = "CoBSAT scores ThinkDiff-LVLM; skipped for variant clip (use `thinkdiff compose`)"
        log.info(note)
        return {"dir": None, "summary": None, "run_id": None, "model": None, "baselines": {}, "table": note, "skipped": note}
    ref = None
    if e.generator in harness.BASELINES:
        generator, identity = harness.BASELINES[e.generator], e.generator
        label = identity
    elif e.generator == "text-bridge":
        generator, identity = built_on_first_call(lambda: generate.build_generator(cfg, None)), "text-bridge"
        label = identity
    else:
        spec = aligner_spec(cfg, model)
        if spec.startswith("models:/"):
            ref = registry.resolve_model(spec, cfg)
            spec, digest = ref.uri, registry.weights_digest(ref, cfg)
        else:
            digest = weights_sha256(spec)
            try:  # a registered aligner named by its path is logged against its version
                ref = registry.version_with_weights(cfg, digest)
            except registry.TrackingUnavailableError as err:  # draw now; the logging at the end waits for the server
                log.warning("%s; evaluating %s without looking up its registry version", err, spec)
        generator = built_on_first_call(lambda: generate.build_generator(cfg, spec))
        # Results are keyed by the weights: one aligner named by path or by version is drawn once.
        identity = f"aligner-sha256:{digest}" if digest else spec
        label = ref.uri if ref is not None else spec
    if e.dataset == "synthetic":
        # One set per image size: a changed eval.synthetic_image_size draws its own set.
        data = dataset.make_synthetic_dataset(Path(cfg.paths.root) / f"cobsat-synthetic-{e.synthetic_image_size}px",
                                              e.synthetic_image_size)
    else:
        data = dataset.open_dataset(e.dataset)
    # Which prompts, how fast they are drawn and what is drawn beside them do not change a prompt's
    # result: the same directory.
    settings = {k: v for k, v in e.__dict__.items()
                if k not in ("aligner", "tasks", "shots", "limit", "nightly_limit", "compile", "baselines")}
    # The VLM (generator and qwen2-vl judge) has the features stage's system prompt (its pixel limits
    # at inference are eval settings).
    vlm_inputs = {"system_prompt": cfg.features.system_prompt}
    # A synthetic set is the same images wherever it lies (its size is in `settings`); a real one is
    # keyed by its directory.
    dataset_key = "synthetic" if e.dataset == "synthetic" else str(data.root.resolve())
    out_dir = Path(cfg.paths.root) / "eval" / fingerprint({
        "schema": EVAL_SCHEMA_VERSION, "eval": settings, "generator": identity, "dataset": dataset_key,
        "features": vlm_inputs, "models": {k: v.__dict__ for k, v in cfg.models.__dict__.items()},
    })
    scorer = built_on_first_call(lambda: clip_scorer(cfg)) if e.clip_score else None
    summary = harness.evaluate(data, generator, built_on_first_call(lambda: judge.load_judge(cfg)), out_dir, tasks=e.tasks,
                               shots=e.shots, limit=e.limit, batch_size=e.batch_size, name=e.generator,
                               judge_label=judge.judge_label(cfg), clip_scorer=scorer)
    # Logged before the baselines are drawn: a run cut off while drawing them keeps the aligner's.
    run_id = registry.log_evaluation(cfg, out_dir, summary, ref, label)
    baselines, table = {}, summary.table()
    if e.generator == "thinkdiff" and e.baselines:
        for name in e.baselines:
            alone = dataclasses.replace(cfg, eval=dataclasses.replace(e, generator=name, baselines=[]))
            baselines[name] = evaluate_cobsat(alone)["summary"]
        written = harness.compare(out_dir, {"thinkdiff": summary, **baselines})
        registry.log_comparison(cfg, run_id, [out_dir / name for name in harness.COMPARISON], replace=written)
        table = (out_dir / harness.COMPARISON[0]).read_text().rstrip("\n")
    log.info("CoBSAT (%s): mean accuracy %s over %d prompts; per task in %s", label,
             ", ".join(f"{shot}-shot {m:.3f}" for shot, m in sorted(summary.mean.items())), summary.num_prompts,
             out_dir / ("comparison.md" if baselines else "summary.md"))
    return {"dir": out_dir, "summary": summary, "run_id": run_id, "model": ref, "baselines": baselines, "table": table}


def nightly_evaluation(cfg: RunConfig) -> dict[str, Any]:
    """Evaluate `@champion`, and `@candidate` when it is a newer version; promote the candidate when
    its mean accuracy (over the configured shots) is higher, or when there is no champion yet.

    Each model is evaluated on the first `eval.nightly_limit` prompts of every (task, shot); a model
    already evaluated with the same settings is not drawn again (its results directory is reused).
    """
    # Promotion compares the two versions; baselines would cost the night's budget to say nothing new.
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=cfg.eval.nightly_limit, baselines=[]))
    champion = registry.current_version(cfg, registry.CHAMPION)
    candidate = registry.current_version(cfg, registry.CANDIDATE)
    report: dict[str, Any] = {"champion": champion and champion.version, "candidate": candidate and candidate.version}
    if champion is None and candidate is None:  # a fresh store, or a mistyped tracking.registered_model
        log.warning("nightly evaluation: %s has no @%s and no @%s version in %s, nothing to evaluate; register one with "
                    "`thinkdiff registry register`", cfg.tracking.registered_model, registry.CHAMPION, registry.CANDIDATE,
                    registry.tracking_uri(cfg))
    scores = {}
    for role, ref in (("champion", champion), ("candidate", candidate)):
        if ref is None or (role == "candidate" and champion is not None and int(ref.version) <= int(champion.version)):
            continue
        result = evaluate_cobsat(cfg, model=ref.uri)
        scores[role] = sum(result["summary"].mean.values()) / len(result["summary"].mean)
        report[f"{role}_mean"] = scores[role]
    if "candidate" in scores and (champion is None or scores["candidate"] > scores.get("champion", float("-inf"))):
        reason = (f"nightly CoBSAT: candidate mean {scores['candidate']:.4f} > champion mean {scores['champion']:.4f}"
                  if champion else f"nightly CoBSAT: first champion (mean {scores['candidate']:.4f})")
        report["promoted"] = registry.promote(cfg, candidate.version, reason).version
    else:
        report["promoted"] = None
    log.info("nightly evaluation: %s", report)
    return report
