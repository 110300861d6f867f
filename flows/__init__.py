"""Prefect flows: composition only; every stage's work is done by `thinkdiff` through `tasks`.

    python -m flows.pipeline --config tiny [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

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
