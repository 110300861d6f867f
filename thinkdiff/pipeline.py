"""Stage entry points with their default locations derived from the config.

Each function runs one stage (or one unit of it) into `{paths.root}/{stage}/{fingerprint}/`, is
skipped when that work is complete, and returns where its output is. The CLI and the Prefect
tasks call these; neither holds stage logic of its own.
"""

from __future__ import annotations

from pathlib import Path

from thinkdiff import registry
from thinkdiff.config import RunConfig, fingerprint
from thinkdiff.data import corpus, extract
from thinkdiff.eval import dataset, harness
from thinkdiff.storage import read_manifest, stage_dir
from thinkdiff.train import launch, loop


def build_corpus(cfg: RunConfig, out_dir: Path | None = None) -> Path:
    return corpus.build_corpus(cfg.corpus, out_dir or stage_dir(cfg, "corpus"))


def _corpus_dir(cfg: RunConfig, corpus_dir: Path | None) -> Path:
    corpus_dir = corpus_dir or stage_dir(cfg, "corpus")
    if read_manifest(corpus_dir) is None and not list(corpus_dir.glob("*_stats.json")):
        raise FileNotFoundError(
            f"no corpus at {corpus_dir}: run `thinkdiff corpus --config {cfg.preset}` or pass --corpus DIR "
            "(img2dataset parquet output)"
        )
    return corpus_dir


def extract_features(cfg: RunConfig, corpus_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """The whole features stage in this process."""
    return extract.extract_features(cfg, _corpus_dir(cfg, corpus_dir), out_dir or stage_dir(cfg, "features"))


def pending_feature_shards(cfg: RunConfig, corpus_dir: Path | None = None) -> list[Path]:
    """Corpus shards still to extract: the units a distributed features stage maps over."""
    return extract.pending_feature_shards(_corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features"))


def extract_feature_shard(cfg: RunConfig, corpus_shard: Path) -> Path:
    return extract.extract_feature_shard(cfg, corpus_shard, stage_dir(cfg, "features"))


def finalize_features(cfg: RunConfig, corpus_dir: Path | None = None) -> Path:
    return extract.finalize_features(cfg, _corpus_dir(cfg, corpus_dir), stage_dir(cfg, "features"))


def train_aligner(cfg: RunConfig, features_dir: Path | None = None, run_dir: Path | None = None) -> loop.TrainResult:
    """Train in this process (what each `accelerate launch` process runs)."""
    return loop.train_aligner(cfg, features_dir or stage_dir(cfg, "features"), run_dir or stage_dir(cfg, "train"))


def launch_training(cfg: RunConfig, features_dir: Path | None = None) -> Path:
    """Train through `accelerate launch` subprocesses; returns the final checkpoint directory."""
    return launch.launch_training(cfg, features_dir or stage_dir(cfg, "features"), stage_dir(cfg, "train"))


def register_checkpoint(cfg: RunConfig) -> registry.ModelVersionRef:
    """Log the finished training run of `cfg` to MLflow and register its aligner (idempotent)."""
    return registry.register_checkpoint(cfg, stage_dir(cfg, "train"))


def promote(cfg: RunConfig, version: str, reason: str = "manual promotion") -> registry.ModelVersionRef:
    return registry.promote(cfg, version, reason)


def evaluate_cobsat(cfg: RunConfig) -> tuple[Path, harness.Summary]:
    """CoBSAT with `eval.generator` and `eval.judge` into {paths.root}/eval/{fingerprint}/ (resumable)."""
    e = cfg.eval
    if e.dataset == "synthetic":
        data = dataset.make_synthetic_dataset(Path(cfg.paths.root) / "cobsat-synthetic", e.synthetic_image_size)
    else:
        data = dataset.open_dataset(e.dataset)
    out_dir = Path(cfg.paths.root) / "eval" / fingerprint({"eval": e.__dict__, "dataset": str(data.root.resolve())})
    summary = harness.evaluate(data, harness.BASELINES[e.generator], harness.synthetic_judge, out_dir,
                               tasks=e.tasks, shots=e.shots, limit=e.limit)
    harness.save_samples(out_dir, data)
    return out_dir, summary
