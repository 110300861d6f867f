"""Covers: the README's main job (`thinkdiff run --config tiny`) end to end in a subprocess, offline:
demo corpus -> features -> training, printed output locations, and a second run that skips every
stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def run_cli(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "thinkdiff", "run", "--config", "tiny", f"paths.root={tmp_path}", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


def test_tiny_run_end_to_end_then_skipped(tmp_path):
    first = run_cli(tmp_path, "train.max_steps=40", "train.warmup_steps=5")
    assert first.returncode == 0, first.stderr[-3000:]
    outputs = dict(line.strip().split(": ", 1) for line in first.stdout.strip().splitlines())
    assert set(outputs) == {"corpus", "features", "run", "aligner", "curve"}
    assert (tmp_path / "corpus").exists() and outputs["features"].startswith(str(tmp_path))
    features = json.loads((open(os.path.join(outputs["features"], "manifest.json"))).read())
    assert sum(s["num_samples"] for s in features["shards"]) == 96
    manifest = json.loads(open(os.path.join(outputs["run"], "manifest.json")).read())
    assert manifest["step"] == 40 and manifest["checkpoint"] in outputs["aligner"]
    assert os.path.isfile(os.path.join(outputs["aligner"], "model.safetensors"))
    assert "samples/s" in first.stderr and "ETA" in first.stderr  # progress with rate and ETA

    second = run_cli(tmp_path, "train.max_steps=40", "train.warmup_steps=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == first.stdout
    for stage in ("demo corpus", "features", "training run"):
        assert stage in second.stderr and "skipping" in second.stderr
