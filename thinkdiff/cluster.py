"""The Ray cluster the stages spread over when `cluster.engine` is `ray` (docs/cluster.md).

Ray schedules; this module only says where the cluster is and what each unit of work holds. The
Prefect flows hand feature shards and training to prefect-ray's task runner; the corpus stage hands
its shards to img2dataset's own ray distributor (`driver_address`); CoBSAT hands its (task, shot)
units to Ray tasks (`map_on_workers`). Ray is imported only here and only when a stage asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from thinkdiff.config import ClusterConfig, RunConfig

log = logging.getLogger(__name__)

LOCAL = "local"
"""Ray's address for a new local cluster, even where this machine already is a node of one."""
SYSTEM_FAILURE_RETRIES = 3
"""How often Ray runs a unit again whose worker process died (Ray's default for tasks, stated)."""


def init_kwargs(cluster: ClusterConfig) -> dict[str, Any]:
    """`ray.init` arguments: the configured address, or a temporary local cluster (its dashboard off:
    it would listen on a port for nothing; Ray's token authentication guards the ports it opens)."""
    if cluster.address:
        return {"address": cluster.address}
    return {"address": LOCAL, "include_dashboard": False}


def remote_options(cluster: ClusterConfig) -> dict[str, float]:
    """What each unit of work (a feature shard, a CoBSAT unit, the training launch) holds on a worker;
    that the worker process stays for the next unit (Ray ends a worker after one task that held a GPU
    by default, and its models would then be loaded again for every shard); and that a unit whose
    worker died is run again (each resumes what it had written). Ray gives a task with GPUs its own
    CUDA_VISIBLE_DEVICES; on a node without CUDA the models fall back to the CPU
    (thinkdiff.models.common.default_device)."""
    return {"num_gpus": cluster.gpus_per_worker, "num_cpus": cluster.cpus_per_worker, "max_calls": 0,
            "max_retries": SYSTEM_FAILURE_RETRIES}


@contextlib.contextmanager
def connected(cluster: ClusterConfig) -> Iterator[None]:
    """This process as a driver of the cluster; one that already is (a flow's task runner, a test)
    stays connected, and a temporary local cluster started here stops at exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(**init_kwargs(cluster))
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def driver_address(cluster: ClusterConfig) -> Iterator[str]:
    """An address another process of this machine joins the cluster by (as RAY_ADDRESS): the
    configured one, or that of the local cluster this process drives, started here if need be."""
    if cluster.address:
        yield cluster.address
        return
    import ray

    with connected(cluster):
        yield ray.get_runtime_context().gcs_address


def map_on_workers(cluster: ClusterConfig, fn: Callable[..., Any], units: Sequence[tuple], what: str) -> list[Any]:
    """`fn(*unit)` for every unit as Ray tasks holding `remote_options(cluster)` each, in the order of
    `units`. A unit whose worker dies is run again by Ray, so `fn` must resume what it had written;
    an exception a unit raises ends the map with it (the others keep what they wrote)."""
    import ray

    with connected(cluster):
        remote = ray.remote(**remote_options(cluster))(fn)
        refs = [remote.remote(*unit) for unit in units]
        pending, started = list(refs), time.perf_counter()
        log.info("%s: %d units on the Ray cluster (%s)", what, len(refs), _resources())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            done, elapsed = len(refs) - len(pending), time.perf_counter() - started
            log.info("%s: %d/%d units done, %.2f units/min, ETA %.0fs", what, done, len(refs), 60 * done / elapsed,
                     len(pending) * elapsed / done)
        return ray.get(refs)


def _resources() -> str:
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return f"{nodes} nodes, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def worker_description() -> str:
    """Which Ray worker runs this code and the GPU ids Ray gave it ("" outside a Ray worker), for
    the log of a unit of work."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return ""
    context = ray.get_runtime_context()
    return f"Ray node {context.get_node_id()[:8]}, worker {context.get_worker_id()[:8]}, GPU ids {ray.get_gpu_ids()}"


def training_options(cfg: RunConfig) -> dict[str, float]:
    """What the training launch holds on its worker: what one unit holds, once per `accelerate launch`
    process (train.num_processes), all on one node (accelerate's processes of one machine)."""
    c, processes = cfg.cluster, cfg.train.num_processes
    return {**remote_options(c), "num_gpus": c.gpus_per_worker * processes, "num_cpus": c.cpus_per_worker * processes}
