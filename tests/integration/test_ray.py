"""Covers: cluster.engine=ray on a local Ray cluster of this machine (2 CPUs, 2 logical GPUs, on
127.0.0.1; no CUDA, so every model falls back to the CPU): the features flow writes the same shard
bytes as the local engine and CoBSAT the same rows; a worker killed while it holds a shard leaves a
complete store once Ray has run the shard again; two shards run at once, each on its own GPU id, and
a worker stays for later shards; the corpus downloads through img2dataset's ray distributor with the
same stats and gate; a CoBSAT (task, shot) unit resumes on its own and the merged units equal one
local evaluation."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from thinkdiff.config import load_config
from thinkdiff.data.corpus import CorpusError
from thinkdiff.data.features import FeatureStore

pytestmark = pytest.mark.integration
# Ray's clusters listen on this machine's address; this (read when ray is first imported, here in the
# fixture) keeps the test cluster on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CORPUS = ["corpus.demo_images=40", "corpus.shard_size=16", "corpus.demo_broken=3"]  # as the demo_corpus fixture
RAY = ["cluster.engine=ray", "cluster.gpus_per_worker=1", "cluster.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module, joined by the flows and stages as their running Ray."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, namespace="thinkdiff-tests",
             log_to_driver=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("part-*.parquet"))}


def result_rows(results: Path) -> list[dict]:
    """A results.jsonl's rows, in order, without their timings (which differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("gen_s", "judge_s")}
            for line in results.read_text().splitlines()]


def holders(directory: Path) -> dict[int, str]:
    """pid -> the shard lock it holds open (a shard is claimed while it is extracted), read from /proc."""
    held = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith(str(directory)) and target.endswith(".parquet.lock"):
                    held[int(fd_dir.parent.name)] = Path(target).name
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return held


def test_features_on_ray_equal_the_local_engines_bytes_two_shards_at_once_on_their_own_gpus(
        ray_cluster, prefect_harness, demo_corpus, tmp_path):
    import torch
    from prefect.client.orchestration import get_client

    from flows.cache_features import cache_features_flow
    from thinkdiff import pipeline

    cfg, corpus_dir = demo_corpus
    # On the CPU a feature's bits depend on the thread count: the local reference runs with one
    # thread, as each Ray task holding one CPU does (Ray sets its OMP_NUM_THREADS).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = pipeline.cache_features(load_config("tiny", [f"paths.root={tmp_path / 'local'}", *CORPUS]), corpus_dir)
    finally:
        torch.set_num_threads(threads)
    out = cache_features_flow(config="tiny", overrides=[f"paths.root={tmp_path / 'ray'}", *CORPUS, *RAY],
                              corpus_dir=str(corpus_dir))
    assert Path(out).parent.parent == tmp_path / "ray"
    assert shard_bytes(out) == shard_bytes(local) and len(shard_bytes(out)) == 3
    assert FeatureStore(out).num_samples == 40

    # Each shard task logged which Ray worker and GPU id ran it (workers send their logs in batches:
    # polled briefly); two of them overlapped in time.
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs() if r.name.startswith("cache-feature-shard")]
        while True:
            logs = {log.task_run_id: log.message for log in client.read_logs() if " on Ray node " in log.message}
            if {r.id for r in runs} <= set(logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
    gpus = {r.id: logs[r.id].rsplit("GPU ids ", 1)[1] for r in runs}
    assert set(gpus.values()) <= {"[0]", "[1]"}
    # Two workers for three shards: a worker stays for the next shard, its VLM loaded once.
    workers = {logs[r.id].split(", worker ")[1].split(",")[0] for r in runs}
    assert len(workers) == 2
    overlapping = [(a, b) for a in runs for b in runs
                   if a.id < b.id and a.start_time < b.end_time and b.start_time < a.end_time]
    assert overlapping and all(gpus[a.id] != gpus[b.id] for a, b in overlapping)


def test_a_worker_killed_holding_a_shard_leaves_a_complete_store(ray_cluster, prefect_harness, demo_corpus,
                                                                  tmp_path):
    from flows.cache_features import cache_features_flow

    _, corpus_dir = demo_corpus
    # Longer captions make a shard take a second or two, so the kill lands while one is held.
    overrides = [f"paths.root={tmp_path}", *CORPUS, *RAY, "features.max_new_tokens=96"]
    result: dict[str, object] = {}
    flow = threading.Thread(target=lambda: result.update(out=cache_features_flow(
        config="tiny", overrides=overrides, corpus_dir=str(corpus_dir))))
    flow.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and flow.is_alive() and time.monotonic() < deadline:
        if held := holders(tmp_path / "features"):
            killed = next(iter(held.items()))
            os.kill(killed[0], signal.SIGKILL)
        time.sleep(0.05)
    flow.join(timeout=300)
    assert killed is not None, "no worker was seen holding a shard"
    out = Path(result["out"])
    assert (out / "manifest.json").is_file() and FeatureStore(out).num_samples == 40
    assert all(pq.read_table(p).num_rows > 0 for p in out.glob("part-*.parquet"))
    assert not list(out.glob(".*.tmp")) and killed[1].removeprefix(".").removesuffix(".lock") in {
        p.name for p in out.glob("part-*.parquet")}


def test_corpus_on_ray_downloads_through_img2datasets_ray_distributor(ray_cluster, tmp_path):
    from thinkdiff import pipeline

    cfg = load_config("tiny", [f"paths.root={tmp_path}", "corpus.demo_images=12", "corpus.shard_size=4",
                               "corpus.demo_broken=1", *RAY])
    corpus = pipeline.build_corpus(cfg)
    manifest = json.loads((corpus.path / "manifest.json").read_text())
    assert (manifest["count"], manifest["successes"]) == (13, 12) and len(manifest["shards"]) == 4
    assert [s["downloaded"] for s in corpus.shard_success_rates] == [4, 3, 4, 1]
    # The same success-rate bar as on one machine: this corpus does not clear a higher one.
    with pytest.raises(CorpusError, match=r"accepted with 92.3% of its images downloaded, below this config's "
                                          r"corpus.min_success_rate=95%"):
        pipeline.build_corpus(load_config("tiny", [f"paths.root={tmp_path}", "corpus.demo_images=12",
                                                   "corpus.shard_size=4", "corpus.demo_broken=1",
                                                   "corpus.min_success_rate=0.95", *RAY]))


def test_cobsat_on_ray_writes_the_local_engines_rows(ray_cluster, tmp_path):
    import torch

    from thinkdiff.eval import harness, stage

    def evaluate(root: Path, *engine: str) -> stage.CobsatEvaluation:
        return stage.evaluate_cobsat(load_config("tiny", [
            f"paths.root={root}", "eval.generator=text-bridge", "eval.baselines=[]", "eval.tasks=[1, 2]",
            "eval.limit=2", "eval.batch_size=2", *engine]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task holding one CPU (see the features test)
    try:
        local = evaluate(tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    spread = evaluate(tmp_path / "ray", *RAY)

    def rows(result: stage.CobsatEvaluation) -> list[dict]:
        return result_rows(result.results_jsonl)

    assert rows(spread) == rows(local) and len(rows(local)) == 2 * 2 * 2
    assert [r["vlm_text"] for r in rows(spread)] and not list((spread.results_dir / harness.UNITS_DIR).glob("*.jsonl"))
    assert spread.summary.accuracy == local.summary.accuracy and spread.table == local.table
    for row in rows(local):  # the drawn images, byte for byte
        assert (spread.results_dir / row["image"]).read_bytes() == (local.results_dir / row["image"]).read_bytes()
    assert spread.run_id and spread.run_id != local.run_id
    assert {p.name for p in spread.results_dir.iterdir()} == {p.name for p in local.results_dir.iterdir()}


@pytest.fixture
def drawn_locally(tmp_path):
    """A synthetic set, the random generator, its options, and its evaluation of tasks 1-2 x shots 2, 4
    on the local engine into tmp_path/local (the reference a spread evaluation must equal)."""
    from thinkdiff.eval import dataset, harness, judge

    data = dataset.make_synthetic_dataset(tmp_path / "set", 32)
    draw = harness.BASELINES["random"]
    options = {"limit": 4, "batch_size": 2, "name": "random"}
    local = harness.evaluate(data, draw, judge.synthetic_judge, tmp_path / "local", tasks=[1, 2], shots=[2, 4],
                             judge_label="synthetic", **options)
    return data, draw, options, local


def test_a_cobsat_unit_resumes_on_its_own_and_the_merge_equals_a_local_evaluation(drawn_locally, tmp_path):
    from thinkdiff.eval import harness, judge

    data, draw, options, local = drawn_locally
    out = tmp_path / "spread"
    drawn: list[int] = []

    def cut_off_after_one_batch(prompts, data):
        if drawn:
            raise KeyboardInterrupt  # the worker stops mid-unit
        drawn.append(len(prompts))
        return draw(prompts, data)

    with pytest.raises(KeyboardInterrupt):
        harness.evaluate_unit(data, cut_off_after_one_batch, judge.synthetic_judge, out, task=2, shot=4, **options)
    assert len(harness.unit_results(out, 2, 4).read_text().splitlines()) == 2

    def counted(prompts, data):
        drawn.append(len(prompts))
        return draw(prompts, data)

    for task, shot in [(1, 2), (2, 2), (1, 4), (2, 4)]:  # any order: each unit on its own
        harness.evaluate_unit(data, counted, judge.synthetic_judge, out, task=task, shot=shot, **options)
    assert sum(drawn) == 16  # every prompt drawn once: the unit cut off drew only its missing batch again
    summary = harness.merge_units(data, out, tasks=[1, 2], shots=[2, 4], limit=4, judge_label="synthetic")

    def rows(directory: Path) -> list[dict]:
        return result_rows(directory / harness.RESULTS)

    assert rows(out) == rows(tmp_path / "local") and len(rows(out)) == 16
    assert summary.accuracy == local.accuracy and not (out / harness.UNITS_DIR).exists()
    assert (out / harness.SUMMARY_TABLE).read_text() == (tmp_path / "local" / harness.SUMMARY_TABLE).read_text()


def test_a_local_rerun_takes_up_the_rows_of_a_spread_evaluation_cut_off(drawn_locally, tmp_path):
    """The local engine, run on a directory where a spread evaluation stopped before its merge,
    keeps the rows its units drew and draws only the rest."""
    from thinkdiff.eval import harness, judge

    data, draw, options, local = drawn_locally
    out = tmp_path / "spread"
    harness.evaluate_unit(data, draw, judge.synthetic_judge, out, task=2, shot=4, **options)
    drawn: list[int] = []

    def counted(prompts, data):
        drawn.append(len(prompts))
        return draw(prompts, data)

    rerun = harness.evaluate(data, counted, judge.synthetic_judge, out, tasks=[1, 2], shots=[2, 4],
                             judge_label="synthetic", **options)
    assert sum(drawn) == 12 and not harness.unit_results(out, 2, 4).exists()  # the unit's 4 prompts kept

    def rows(directory: Path) -> list[dict]:  # the unit's rows come first here
        return sorted(result_rows(directory / harness.RESULTS), key=lambda r: (r["task"], r["shot"], r["index"]))

    assert rows(out) == rows(tmp_path / "local") and rerun.accuracy == local.accuracy
