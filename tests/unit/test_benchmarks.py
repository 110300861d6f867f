"""Covers: the benchmark scripts keep working (their --tiny mode runs the same code at small shapes);
their numbers are not asserted here: timing belongs in benchmarks/README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_feature_store_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feature_store.py"), "--tiny"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| storage")]
    assert [line.split("|")[1].strip() for line in lines] == ["bfloat16", "float8_e4m3"]
    bf16_kb, fp8_kb = (float(line.split("|")[2]) for line in lines)
    assert fp8_kb < bf16_kb  # the compact store is smaller on disk
    # samples/s, GB/s
    assert all(float(line.split("|")[k].replace(",", "")) > 0 for line in lines for k in (3, 4, 5, 6))


def test_train_step_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--tiny", "--steps", "3",
                          "--project-batch", "8", "16", "--profile"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [(r[0], r[1]) for r in rows] == [("naive", "8"), ("project", "8"), ("project", "16")]
    assert rows[0][-2] == "1.00x" and all(float(r[2]) > 0 for r in rows)
    # the project's first loss is the naive path's
    assert rows[0][-1] == "-" and all(float(r[-1]) < 1e-4 for r in rows[1:])
    assert out.count("Self CPU time total") == 1 and "aten::mm" in out  # the profile of batch 16's steps
    share = int(out.split("attention (forward and backward): ")[1].split("%")[0])
    assert 0 < share < 100


def _table_rows(out: str) -> dict[str, list[str]]:
    table = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in table if cells[1].strip() != "path"}


def test_extract_features_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "extract_features.py"), "--tiny", "--batches", "1",
                          "--batch", "8", "2", "--cobsat-shots", "2", "4"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [(r[0], r[1]) for r in rows] == [("naive", "4"), ("project", "8"), ("project", "2")]
    assert all(float(r[2]) > 0 for r in rows) and "ratio project (whole stage, batch 8) / naive generate-only:" in out
    assert "vision tower" in out and "prefill (vision included)" in out and "sort-based top-p instead" in out
    # CoBSAT's own prompts through eval's VLM call: 4 demo images make a longer prompt than 2.
    cobsat = {int(line.split(" shots")[0].split()[-1]): line
              for line in out.splitlines() if line.startswith("CoBSAT's VLM")}
    tokens = {shot: int(line.split("(")[-1].split("-token")[0]) for shot, line in cobsat.items()}
    assert set(cobsat) == {2, 4} and tokens[4] > tokens[2]
    assert all(float(line.split(": ")[-1].split(" s/prompt")[0]) > 0 for line in cobsat.values())


def test_flux_generate_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "flux_generate.py"), "--tiny", "--batches", "1",
                          "--variants", "cudnn", "cudnn+coordinate-descent"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = _table_rows(out)
    assert set(rows) == {"naive b1", "naive b4", "project b8", "project b8, cudnn",
                         "project b8, cudnn+coordinate-descent"}
    assert "ratio project / naive b4:" in out
    # Each path's line comes as it is measured. Batching alone changes no picture: the project's
    # first image is the naive batch-1 image (CPU, fp32).
    lines = {line.split(":")[0]: line for line in out.splitlines() if "first image vs naive b1" in line}
    assert set(lines) == set(rows) - {"naive b1", "naive b4"}
    assert "naive b4; first image vs naive b1: max |diff| 0," in lines["project b8"]
    assert "project: VAE decode" in out and "FLASH_ATTENTION:" in out


def test_decode_attention_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_attention.py"), "--tiny", "--repeats", "2"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = _table_rows(out)
    assert set(rows) == {"repeat_kv", "packed"} and all(float(r[0]) > 0 for r in rows.values())


def test_decoder_attention_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decoder_attention.py"), "--tiny",
                          "--repeats", "2"], capture_output=True, text=True, check=True, timeout=300).stdout
    rows = _table_rows(out)
    assert set(rows) == {"training path (sdpa)", "flex"}  # cuDNN and efficient attention are CUDA-only
    self_ms, cross_ms, difference, stress = rows["training path (sdpa)"]
    assert float(self_ms) > 0 and float(cross_ms) > 0 and float(difference) < 1e-4 and stress == "0, 0 / 0, 0"
    assert rows["flex"][-1].startswith("unsupported: FlexAttention does not support backward on CPU")


def test_cobsat_judge_benchmark_tiny():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cobsat_judge.py"), "--tiny", "--batches", "1"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = _table_rows(out)
    assert set(rows) == {"naive", "project"} and all(float(r[1]) > 0 for r in rows.values())
    # fp32 on a CPU: batching the judge changes no reply.
    assert "replies equal to the image-by-image ones: 16/16" in out
