"""Stage entry points with their default locations derived from the config.

Each function runs one stage (or one unit of it) into `{paths.root}/{stage}/{fingerprint}/`, is
skipped when that work is complete, and returns where its output is. The CLI and the Prefect
tasks call these (and CoBSAT's, `thinkdiff.eval.stage`); neither holds stage logic of its own.
Functions are named after the stage's flow (`build-corpus`, `cache-features`, `train-aligner`,
`register-aligner` and `promote-aligner` tasks).
"""

from __future__ import annotations

import logging
from pathlib import Path

from thinkdiff import cluster, registry
from thinkdiff.config import RunConfig
from thinkdiff.data import corpus, extract
from thinkdiff.models.aligner import WEIGHTS_NAME
from thinkdiff.storage import read_manifest, recorded_location, stage_dir
from thinkdiff.train import launch, loop

log = logging.getLogger(__name__)


def build_corpus(cfg: RunConfig, out_dir: Path | None = None) -> corpus.Corpus:
    return corpus.Corpus(corpus.build_corpus(cfg.corpus, out_dir or stage_dir(cfg, "corpus"), cfg.cluster))


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
            raise FileNotFoundError(f"the corpus at {corpus_dir} has not completed (no manifest.json: its download "
                                    f"stopped or failed the corpus.min_success_rate check): {rerun}; it resumes where "
                                    "it stopped, and a lower corpus.min_success_rate accepts the shards already "
                                    "downloaded")
        if own or not list(corpus_dir.glob("*_stats.json")):
            raise FileNotFoundError(f"no corpus at {corpus_dir}: {rerun}, "
                                    "or pass --corpus DIR (img2dataset parquet output)")
    return corpus_dir


def cache_features(cfg: RunConfig, corpus_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """The whole features stage in this process."""
    return extract.extract_features(cfg, _corpus_dir(cfg, corpus_dir),
                                    out_dir or stage_dir(cfg, "features", corpus_dir))


def pending_feature_shards(cfg: RunConfig, corpus_dir: Path | None = None) -> list[Path]:
    """Corpus shards still to cache: the units a distributed features stage maps over."""
    return extract.pending_feature_shards(_corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features", corpus_dir))


def cache_feature_shard(cfg: RunConfig, corpus_shard: Path) -> Path:
    if worker := cluster.worker_description():
        log.info("features: %s on %s", corpus_shard.name, worker)
    return extract.extract_feature_shard(cfg, corpus_shard, stage_dir(cfg, "features", corpus_shard.parent))


def finalize_features(cfg: RunConfig, corpus_dir: Path | None = None) -> Path:
    return extract.finalize_features(cfg, _corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features", corpus_dir))


def train_aligner(cfg: RunConfig, features_dir: Path | None = None, run_dir: Path | None = None, *,
                  wait: bool = False) -> loop.TrainResult:
    """Train in this process (what each `accelerate launch` process runs); `wait`: for another training
    of the same run directory to end, instead of refusing."""
    return loop.train_aligner(cfg, features_dir or stage_dir(cfg, "features"),
                              run_dir or stage_dir(cfg, "train", features_dir), wait=wait)


def launch_training(cfg: RunConfig, features_dir: Path | None = None, *, wait: bool = False) -> loop.TrainResult:
    """Train through `accelerate launch` subprocesses; returns the complete run's result."""
    return launch.launch_training(cfg, features_dir or stage_dir(cfg, "features"),
                                  stage_dir(cfg, "train", features_dir), wait=wait)


def register_aligner(cfg: RunConfig, run_dir: Path | None = None) -> registry.ModelVersionRef:
    """Log a finished training run (by default this config's) to MLflow and register its aligner
    (idempotent)."""
    return registry.Registry(cfg).register_checkpoint(run_dir or stage_dir(cfg, "train"))


def promote_aligner(cfg: RunConfig, version: str, reason: str = "manual promotion") -> registry.ModelVersionRef:
    return registry.Registry(cfg).promote(version, reason)


def trained_aligner_dir(cfg: RunConfig) -> Path:
    """The final aligner of this config's finished training run."""
    run_dir = stage_dir(cfg, "train")
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise FileNotFoundError(f"no finished training run at {run_dir}: train first (`thinkdiff train` "
                                "with the same --config and overrides) "
                                "or name an aligner (eval.aligner / --aligner / --model)")
    return recorded_location(manifest["checkpoint"], run_dir) / loop.ALIGNER_DIR


def aligner_spec(cfg: RunConfig, explicit: str | None = None) -> str:
    """Which aligner to draw with (CoBSAT, `generate`, `compose`): the one asked for, else
    `eval.aligner`, else this config's own. A local path is checked here, before any model loads or
    any result file is made."""
    spec = explicit or cfg.eval.aligner or str(trained_aligner_dir(cfg))
    if spec.startswith("models:/"):
        return spec
    path = Path(spec)
    named_by = ("--model / --aligner" if explicit else "eval.aligner" if cfg.eval.aligner
                else "this config's training run")
    forms = ("give models:/NAME@ALIAS, models:/NAME/N, an aligner directory (config.json + model.safetensors) "
             "or the official .pth")
    if not path.exists():
        raise FileNotFoundError(f"aligner {spec} ({named_by}): no such file or directory; {forms}")
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        run = read_manifest(path)
        inside = (f"; this training run's aligner is {recorded_location(run['checkpoint'], path) / loop.ALIGNER_DIR}"
                  if run and run.get("stage") == "train" else "")
        raise FileNotFoundError(f"aligner {spec} ({named_by}): no {WEIGHTS_NAME} in this directory{inside}; {forms}")
    if path.is_file() and path.suffix not in (".pth", ".pt"):
        raise ValueError(f"aligner {spec} ({named_by}): not an official .pth checkpoint; {forms}")
    return spec

