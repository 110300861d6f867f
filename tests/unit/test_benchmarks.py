"""Covers: the benchmark scripts keep working and keep reporting what a fair comparison needs. Each
part of `TINY=1 bash benchmarks/gpu_checks.sh` runs once (every benchmark at tiny shapes on the
CPU), and their lines are parsed: each naive-vs-project benchmark prints the measured matmul peak,
each path's best batch with its rate, useful TFLOP/s, share of that peak and peak memory, and the
same-batch and best-vs-best ratios, consistent with the rates it printed. The batch search and the
summary of benchmarks/timing.py are also checked on made-up rates. Timings themselves are not
asserted: they belong in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9][0-9.e+-]*"
RATE = re.compile(rf"^(?P<path>.+?) batch (?P<batch>.+?): (?P<rate>{NUMBER}) (?:samples|images)/s, "
                  rf"(?P<tflops>{NUMBER}) useful TFLOP/s, (?P<share>{NUMBER})% of the matmul peak, "
                  rf"(?P<gib>{NUMBER}) GiB peak$")
RATIOS = re.compile(rf"^ratios \(project / naive, (?:samples|images)/s\): same batch (?P<same_batch>\d+): "
                    rf"(?P<same>{NUMBER})x; best vs best \(project at (?P<project>.+?), naive at (?P<naive>.+?)\): "
                    rf"(?P<best>{NUMBER})x$")


def _load_timing():
    spec = importlib.util.spec_from_file_location("benchmark_timing", REPO / "benchmarks" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


timing = _load_timing()


def _run_part(part: str, out: Path) -> dict[str, str]:
    env = os.environ | {"TINY": "1", "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh", part], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {p.stem: p.read_text() for p in out.glob("*.txt")}


@pytest.fixture(scope="module")
def part1(tmp_path_factory) -> dict[str, str]:
    return _run_part("1", tmp_path_factory.mktemp("gpu_checks_1"))


@pytest.fixture(scope="module")
def part2(tmp_path_factory) -> dict[str, str]:
    return _run_part("2", tmp_path_factory.mktemp("gpu_checks_2"))


@pytest.fixture(scope="module")
def part3(tmp_path_factory) -> dict[str, str]:
    return _run_part("3", tmp_path_factory.mktemp("gpu_checks_3"))


def _rates(out: str) -> dict[str, dict[str, dict[str, float]]]:
    """Every rate line: path -> batch -> its numbers (the last line of a path and batch wins)."""
    rates: dict[str, dict[str, dict[str, float]]] = {}
    for line in out.splitlines():
        if m := RATE.match(line):
            numbers = {k: float(m[k]) for k in ("rate", "tflops", "share", "gib")}
            rates.setdefault(m["path"], {})[m["batch"]] = numbers
    return rates


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 0.01 * max(abs(a), abs(b))  # the lines round to 3 or 4 significant digits


def _check_fair_report(out: str, naive_paths: tuple[str, ...]) -> tuple[dict, re.Match]:
    """The fields every naive-vs-project benchmark prints, all positive, and its two ratios
    consistent with the rates of the same run."""
    peaks = [float(line.split()[2]) for line in out.splitlines() if line.startswith("matmul peak: ")]
    assert len(peaks) == 1 and peaks[0] > 0
    rates = _rates(out)
    assert {"best naive:", "best project:", "project", *naive_paths} <= set(rates), sorted(rates)
    for path in rates.values():
        for numbers in path.values():
            assert all(v > 0 for v in numbers.values()), numbers
            assert _close(numbers["share"], 100 * numbers["tflops"] / peaks[0])
    [ratios] = [m for line in out.splitlines() if (m := RATIOS.match(line))]
    best_naive, best_project = rates["best naive:"], rates["best project:"]
    assert list(best_naive) == [ratios["naive"]] and list(best_project) == [ratios["project"]]
    assert _close(float(ratios["best"]), best_project[ratios["project"]]["rate"] / best_naive[ratios["naive"]]["rate"])
    # The project's best is the fastest of its rows.
    project_rows = rates["project"]
    assert best_project[ratios["project"]]["rate"] == max(r["rate"] for r in project_rows.values())
    assert ratios["same_batch"] in project_rows and float(ratios["same"]) > 0
    return rates, ratios


def test_train_step_reports_both_ratios(part1):
    out = part1["train_step"]
    rates, ratios = _check_fair_report(out, ("naive",))
    same = ratios["same_batch"]
    assert _close(float(ratios["same"]), rates["project"][same]["rate"] / rates["naive"][same]["rate"])
    assert rates["best naive:"][ratios["naive"]]["rate"] == max(r["rate"] for r in rates["naive"].values())
    # The project's first loss is the naive path's (CPU, fp32): same batch, same aligner.
    difference = float(re.search(r"relative difference ([0-9.e+-]+)\)", out)[1])
    assert difference < 1e-4
    assert "project (flex): not timed, FlexAttention has no backward on a CPU" in out
    assert out.count("Self CPU time total") == 1 and "aten::mm" in out  # the profile of the best batch
    share = int(out.split("attention (forward and backward): ")[1].split("%")[0])
    assert 0 < share < 100


def test_flux_generate_reports_both_ratios_and_variants(part2):
    out = part2["flux_generate"]
    rates, ratios = _check_fair_report(out, ("naive", "project"))
    same = ratios["same_batch"]
    assert _close(float(ratios["same"]), rates["project"][same]["rate"] / rates["naive"][same]["rate"])
    # Both variants at the project's first batch, each against the project at that batch.
    first = min(rates["project"], key=int)
    for variant in ("cudnn", "cudnn+coordinate-descent"):
        assert first in rates[f"project, {variant}"]
        assert re.search(rf"^{re.escape(variant)} / project at batch {first}: {NUMBER}x$", out, re.M)
    # Batching and the variants change no picture beyond rounding: a row drawn from another seed
    # would differ by tens of levels.
    diffs = [int(d) for d in re.findall(r"first image vs naive: max \|diff\| (\d+),", out)]
    assert len(diffs) >= len(rates["naive"]) + len(rates["project"]) + 2 and max(diffs) <= 2
    assert "project: VAE decode" in out and "FLASH_ATTENTION:" in out


def test_extract_features_reports_both_ratios(part2):
    out = part2["extract_features"]
    rates, ratios = _check_fair_report(out, ("naive generate", "naive states pass"))
    # The naive path's seconds per image are its generate's plus its states pass's, each at its best.
    generate, states = rates["naive generate"], rates["naive states pass"]
    g = max(generate, key=lambda b: generate[b]["rate"])
    s = max(states, key=lambda b: states[b]["rate"])
    assert ratios["naive"] == f"generate {g} + states {s}"
    naive = 1 / (1 / generate[g]["rate"] + 1 / states[s]["rate"])
    assert _close(rates["best naive:"][ratios["naive"]]["rate"], naive)
    same = ratios["same_batch"]
    same_naive = 1 / (1 / generate[same]["rate"] + 1 / states[same]["rate"])
    assert _close(float(ratios["same"]), rates["project"][same]["rate"] / same_naive)
    assert "vision tower" in out and "prefill (vision included)" in out and "sort-based top-p instead" in out


def test_cobsat_vlm_timing(part3):
    # CoBSAT's own prompts through eval's VLM call: 4 demo images make a longer prompt than 2.
    out = part3["cobsat_vlm"]
    cobsat = {int(line.split(" shots")[0].split()[-1]): line
              for line in out.splitlines() if line.startswith("CoBSAT's VLM")}
    tokens = {shot: int(line.split("(")[-1].split("-token")[0]) for shot, line in cobsat.items()}
    assert set(cobsat) == {2, 4} and tokens[4] > tokens[2]
    assert all(float(line.split(": ")[-1].split(" s/prompt")[0]) > 0 for line in cobsat.values())


def test_tbdn_decode_benchmark(part3):
    # The three decoding paths of TBDN's generator, each with s/prompt and prompts/s, and both ratios
    # consistent with them.
    out = part3["tbdn_decode"]
    line = re.compile(rf"^(?P<path>text-bridge|tbdn|tbdn, re-run per step): (?P<s>{NUMBER}) s/prompt, "
                      rf"(?P<rate>{NUMBER}) prompts/s, (?P<gib>{NUMBER}) GiB peak; ")
    paths = {m["path"]: m for row in out.splitlines() if (m := line.match(row))}
    assert set(paths) == {"text-bridge", "tbdn", "tbdn, re-run per step"}, out
    s = {path: float(m["s"]) for path, m in paths.items()}
    assert all(float(m[k]) > 0 for m in paths.values() for k in ("s", "rate", "gib"))
    assert all(_close(float(m["rate"]), 1 / s[path]) for path, m in paths.items())
    ratios = {m[1]: float(m[2]) for m in re.finditer(rf"^ratio (tbdn / text-bridge|re-run / tbdn) .*: ({NUMBER})x$",
                                                    out, re.M)}
    assert _close(ratios["tbdn / text-bridge"], s["tbdn"] / s["text-bridge"])
    assert _close(ratios["re-run / tbdn"], s["tbdn, re-run per step"] / s["tbdn"])
    assert "temperature 0.7, top_p 0.9" in out
    # fp32 on a CPU: the re-run path samples the tbdn path's tokens from the same seed.
    assert "equal to the tbdn path's (same seed): 2/2 prompts" in out


def _table_rows(out: str) -> dict[str, list[str]]:
    table = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in table if cells[1].strip() != "path"}


def test_feature_store_benchmark(part3):
    lines = [line for line in part3["feature_store"].splitlines()
             if line.startswith("| ") and not line.startswith("| storage")]
    assert [line.split("|")[1].strip() for line in lines] == ["bfloat16", "float8_e4m3"]
    bf16_kb, fp8_kb = (float(line.split("|")[2]) for line in lines)
    assert fp8_kb < bf16_kb  # the compact store is smaller on disk
    # samples/s, GB/s
    assert all(float(line.split("|")[k].replace(",", "")) > 0 for line in lines for k in (3, 4, 5, 6))


def test_decode_attention_benchmark(part3):
    rows = _table_rows(part3["decode_attention"])
    assert set(rows) == {"repeat_kv", "packed"} and all(float(r[0]) > 0 for r in rows.values())


def test_decoder_attention_benchmark(part1):
    rows = _table_rows(part1["decoder_attention"])
    assert set(rows) == {"training path (sdpa)", "flex"}  # cuDNN and efficient attention are CUDA-only
    self_ms, cross_ms, difference, stress = rows["training path (sdpa)"]
    assert float(self_ms) > 0 and float(cross_ms) > 0 and float(difference) < 1e-4 and stress == "0, 0 / 0, 0"
    assert rows["flex"][-1].startswith("unsupported: FlexAttention does not support backward on CPU")


def test_cobsat_judge_benchmark(part1):
    out = part1["cobsat_judge"]
    rows = _table_rows(out)
    assert set(rows) == {"naive", "project"} and all(float(r[1]) > 0 for r in rows.values())
    # fp32 on a CPU: batching the judge changes no reply.
    assert "replies equal to the image-by-image ones: 16/16" in out  # 8 images, 2 questions each


def _fake(rates: dict[int, float], oom_at: int | None = None):
    """A measure function with made-up rates; out of memory from `oom_at` up."""
    tried = []

    def measure(batch: int):
        tried.append(batch)
        if oom_at is not None and batch >= oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return timing.Rate(str(batch), rates[batch], rates[batch] / 100, 1.0)

    return measure, tried


def test_search_stops_at_out_of_memory_and_when_no_faster(capsys):
    peak, cpu = timing.Peak(10.0, "made up"), torch.device("cpu")
    measure, tried = _fake({1: 10.0, 2: 18.0, 4: 30.0, 8: 31.0}, oom_at=8)
    rates = timing.search("naive", measure, [1, 2, 4, 8, 16], cpu, peak, "images/s")
    assert tried == [1, 2, 4, 8] and list(rates) == [1, 2, 4]
    assert "naive batch 8: out of memory" in capsys.readouterr().out
    measure, tried = _fake({1: 10.0, 2: 18.0, 4: 17.0, 8: 40.0})
    rates = timing.search("project", measure, [1, 2, 4, 8], cpu, peak, "images/s")
    assert tried == [1, 2, 4] and timing.best(rates).batch == "2"  # 4 was slower: 8 is not tried
    assert "no faster than a smaller batch" in capsys.readouterr().out


def test_search_leaves_the_time_box_for_the_summary(capsys):
    measure, tried = _fake({1: 10.0, 2: 18.0, 4: 30.0})
    timing.set_time_box(-1.0)  # already over: a path still gets its first batch, and no more
    try:
        rates = timing.search("naive", measure, [1, 2, 4], torch.device("cpu"), timing.Peak(1.0, "made up"),
                              "images/s")
    finally:
        timing.set_time_box(None)
    assert tried == [1] and list(rates) == [1]
    assert "naive batch 2: not tried" in capsys.readouterr().out


def test_search_fails_when_even_the_first_batch_does_not_fit():
    measure, _ = _fake({1: 10.0}, oom_at=1)
    with pytest.raises(SystemExit, match="even batch 1 does not fit"):
        timing.search("naive", measure, [1, 2], torch.device("cpu"), timing.Peak(1.0, "made up"), "images/s")


def test_summary_ratios(capsys):
    peak = timing.Peak(10.0, "made up")
    rate = lambda b, r: timing.Rate(str(b), r, r / 10, 2.0)  # noqa: E731
    naive = {1: rate(1, 10.0), 2: rate(2, 16.0), 4: rate(4, 20.0)}
    project = {2: rate(2, 40.0), 4: rate(4, 50.0), 8: rate(8, 90.0)}
    timing.print_summary("images/s", naive, project, peak)
    out = capsys.readouterr().out
    [m] = [m for line in out.splitlines() if (m := RATIOS.match(line))]
    # Same batch: the largest both ran (4: 50 / 20); best vs best: 90 at 8 / 20 at 4.
    assert (m["same_batch"], m["same"], m["project"], m["naive"], m["best"]) == ("4", "2.5", "8", "4", "4.5")
    assert _rates(out)["best project:"]["8"] == {"rate": 90.0, "tflops": 9.0, "share": 90.0, "gib": 2.0}


def test_cluster_throughput_reports_one_and_n_workers(tmp_path):
    """benchmarks/cluster_throughput.py --tiny: a local Ray cluster of 2 logical GPUs; both stages'
    rates with 1 and 2 workers, and their ratio consistent with them."""
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the cluster on 127.0.0.1 (tests/integration/test_ray.py).
    done = subprocess.run([sys.executable, "benchmarks/cluster_throughput.py", "--tiny", "--root", str(tmp_path)],
                          cwd=REPO, env=os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage, unit in (("features", "images/s"), ("cobsat", "prompts/s")):
        [m] = [m for line in done.stdout.splitlines() if (m := re.match(
            rf"^{stage}: 1 worker (?P<one>{NUMBER}) {unit}, 2 workers (?P<two>{NUMBER}) {unit} \((?P<x>{NUMBER})x\)$",
            line))]
        one, two = float(m["one"]), float(m["two"])
        assert one > 0 and two > 0 and abs(float(m["x"]) - two / one) <= 0.01 + 0.01 * two / one
