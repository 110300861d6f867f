"""Stage entry points with their default locations derived from the config.

Each function runs one stage into `{paths.root}/{stage}/{fingerprint}/` (or an explicit directory),
is skipped when that stage is complete, and returns where its output is. The CLI and the Prefect
tasks call these; `run_all` chains them for the offline demo.
"""

from __future__ import annotations

import logging
from pathlib import Path

from thinkdiff.config import RunConfig
from thinkdiff.data import corpus, extract
from thinkdiff.storage import read_manifest, stage_dir
from thinkdiff.train import loop

log = logging.getLogger(__name__)


def build_corpus(cfg: RunConfig, out_dir: Path | None = None) -> Path:
    return corpus.build_corpus(cfg.corpus, out_dir or stage_dir(cfg, "corpus"))


def extract_features(cfg: RunConfig, corpus_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    corpus_dir = corpus_dir or stage_dir(cfg, "corpus")
    if read_manifest(corpus_dir) is None and not list(corpus_dir.glob("*_stats.json")):
        raise FileNotFoundError(
            f"no corpus at {corpus_dir}: run `thinkdiff corpus --config {cfg.preset}` or pass --corpus DIR "
            "(img2dataset parquet output)"
        )
    return extract.extract_features(cfg, corpus_dir, out_dir or stage_dir(cfg, "features"))


def train_aligner(cfg: RunConfig, features_dir: Path | None = None, run_dir: Path | None = None) -> loop.TrainResult:
    return loop.train_aligner(cfg, features_dir or stage_dir(cfg, "features"), run_dir or stage_dir(cfg, "train"))


def run_all(cfg: RunConfig) -> dict[str, Path]:
    """corpus -> features -> train; each stage skipped when its manifest exists."""
    corpus_dir = build_corpus(cfg)
    features_dir = extract_features(cfg, corpus_dir)
    result = train_aligner(cfg, features_dir)
    return {
        "corpus": corpus_dir,
        "features": features_dir,
        "run": result.run_dir,
        "aligner": result.aligner_dir,
        "curve": result.run_dir / loop.LOSS_CURVE_FILE,
    }
