"""Prefect flows: composition only; every stage's work is done by `thinkdiff` through `tasks`.

    python -m flows.pipeline --config tiny [section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from thinkdiff import cluster
from thinkdiff.config import load_config
from thinkdiff.errors import BAD_INPUT_ERRORS, ConfigError

# A flow run without a server starts a temporary one; on a fresh PREFECT_HOME its database
# migrations can take longer than Prefect's 30 s default on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run_from_command_line(flow_fn: Callable[..., object], prog: str) -> None:
    """`python -m flows.X --config PRESET [overrides]`: run the flow once and print its result."""
    parser = argparse.ArgumentParser(prog=prog, description=flow_fn.__doc__)
    parser.add_argument("--config", "-c", default="tiny", help="preset name in conf/ or a YAML path (default: tiny)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=2e-4")
    args = parser.parse_intermixed_args()  # overrides before or after --config
    try:  # a mistyped preset or override: one line, before any Prefect server starts
        load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    try:
        result = flow_fn(config=args.config, overrides=args.overrides)
    except BAD_INPUT_ERRORS as err:
        # A bad input found while running (a missing url list, a corrupt shard): Prefect has logged
        # it with its traceback; end on the message alone, as `thinkdiff` does.
        parser.exit(1, f"{prog}: error: {err}\n")
    if isinstance(result, dict):
        width = max(map(len, result), default=0)
        print("\n".join(f"{name:>{width}}: {value}" for name, value in result.items()))
    else:
        print(json.dumps(result) if not isinstance(result, str) else result)


def on_ray(config: str, overrides: list[str]) -> bool:
    """Whether the config spreads the stages over a Ray cluster (cluster.engine=ray)."""
    return load_config(config, overrides).cluster.engine == "ray"


@contextlib.contextmanager
def task_runner(config: str, overrides: list[str], *, training: bool = False) -> Iterator[TaskRunner]:
    """Where a flow's per-unit tasks run: the flow run's own task runner (cluster.engine=local), or
    prefect-ray's on the cluster (ray), each task a Ray task holding cluster.gpus_per_worker and
    cluster.cpus_per_worker (`training`: once per accelerate process). Its task runs report to this
    flow run's Prefect API (also a temporary one, which a temporary local cluster reaches)."""
    cfg = load_config(config, overrides)
    if cfg.cluster.engine == "local":
        yield FlowRunContext.get().task_runner
        return
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    options = cluster.training_options(cfg) if training else cluster.remote_options(cfg.cluster)
    with RayTaskRunner(init_kwargs=cluster.init_kwargs(cfg.cluster)) as runner, remote_options(
            **options, runtime_env={"env_vars": {"PREFECT_API_URL": api_url}}):
        yield runner
