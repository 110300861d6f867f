"""Shared fixtures. Every test is offline and on CPU: the environment below is set before any
library (transformers, prefect, mlflow) is imported, so nothing reaches for the network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="thinkdiff-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(_SCRATCH / "hf"),
    "PREFECT_HOME": str(_SCRATCH / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value

import pytest  # noqa: E402

from thinkdiff.config import RunConfig, load_config  # noqa: E402


@pytest.fixture
def make_cfg(tmp_path):
    """The tiny preset rooted in a temp dir, plus overrides."""

    def make(*overrides: str, root: Path | None = None) -> RunConfig:
        return load_config("tiny", [f"paths.root={root or tmp_path / 'data'}", *overrides])

    return make


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The demo corpus through the real stage (loopback HTTP + img2dataset), built once:
    40 images and 3 broken urls in 3 shards."""
    from thinkdiff import pipeline

    root = tmp_path_factory.mktemp("corpus")
    cfg = load_config("tiny", [f"paths.root={root}", "corpus.demo_images=40", "corpus.shard_size=16",
                               "corpus.demo_broken=3"])
    return cfg, pipeline.build_corpus(cfg).path


@pytest.fixture(scope="session")
def tiny_store(demo_corpus):
    """A small feature store made by the real extraction path on the demo corpus (built once)."""
    from thinkdiff import pipeline

    cfg, corpus_dir = demo_corpus
    return cfg, pipeline.cache_features(cfg, corpus_dir)
