"""What torch.compile did between two points of a benchmark: the dynamo/inductor counters that
changed (new graphs, recompiles, CUDA-graph skips or re-recordings). After the warm-up, a path whose
graphs are reused changes none of them."""

from __future__ import annotations

from torch._dynamo.utils import counters


def snapshot() -> dict[str, int]:
    return {f"{group}.{key}": value for group, values in counters.items() for key, value in values.items()}


def changed_since(before: dict[str, int]) -> str:
    now = snapshot()
    delta = {key: now[key] - before.get(key, 0) for key in sorted(now) if now[key] != before.get(key, 0)}
    return ", ".join(f"{key} +{value}" for key, value in delta.items()) or "none"


def graphs_since(before: dict[str, int]) -> int:
    """How many graphs dynamo compiled since `before`."""
    return snapshot().get("stats.unique_graphs", 0) - before.get("stats.unique_graphs", 0)
