"""Covers: the features stage killed with SIGKILL mid-way never exposes a partial shard to readers,
and a rerun finishes without recomputing the shards that were complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from thinkdiff.data.features import FeatureStore

pytestmark = pytest.mark.integration


def command(cfg, corpus_dir, out):
    # Longer captions make each shard take a second or two, so the kill lands between shards.
    return [sys.executable, "-m", "thinkdiff", "features", "--config", "tiny", f"paths.root={cfg.paths.root}",
            "features.max_new_tokens=160", "--corpus", str(corpus_dir), "--out", str(out)]


def test_sigkill_then_rerun(demo_corpus, tmp_path):
    cfg, corpus_dir = demo_corpus
    out = tmp_path / "features"
    proc = subprocess.Popen(command(cfg, corpus_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 300
    try:
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            for shard in out.glob("part-*.parquet"):
                # Every visible shard is complete and readable, even while the writer is running.
                assert pq.read_table(shard).num_rows > 0
                seen[shard.name] = shard.stat().st_mtime_ns
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(out.glob("part-*.parquet"))
    assert 1 <= len(done) < 3, "the kill should land after the first shard and before the last"
    assert not (out / "manifest.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in done}

    rerun = subprocess.run(command(cfg, corpus_dir, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{3 - len(done)} corpus shards to extract" in rerun.stderr
    for name, stamp in stamps.items():
        assert (out / name).stat().st_mtime_ns == stamp  # not recomputed
    assert FeatureStore(out).num_samples == 40
    assert not list(out.glob(".*.tmp"))
