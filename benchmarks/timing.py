"""What every benchmark shares: the clock (wall time after the GPU has finished the work queued so
far), a count of the times a piece of work makes the CPU wait for the GPU, the card's measured
matmul peak, peak memory, FLOP counting, the upward batch search, and the lines that report a
naive path against the project's path.

Each path is timed at several batches (`search`): doubling from a start until the card runs out of
memory, a larger batch is no faster than the best so far (past that point a larger batch only adds
memory), the list given ends, or the run's time box (`set_time_box`) would not hold the next
batch. A benchmark then prints two ratios from that one run
(`print_summary`): at the same batch, and each path at its own best batch ("best vs best"). Every
rate comes with its useful TFLOP/s (FLOPs of the work itself, none spent on padding), the share of
the card's matmul peak that is (`matmul_peak`: measured at the start, not the datasheet's), and the
peak memory.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> float:
    """`time.perf_counter()` once `device` is idle (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def host_syncs(fn) -> int:
    """How many times `fn` makes the CPU wait for the GPU (CUDA's sync debug mode, warning per sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@dataclass(frozen=True)
class Peak:
    tflops: float
    what: str


def matmul_peak(device: torch.device, repeats: int = 20) -> Peak:
    """The best TFLOP/s of one large square matmul: bf16 at 8192 on a GPU (the dtype the benchmarks
    run in; a datasheet's figure is rarely reached, so the fractions printed are of what this card
    does here), float32 at 512 on a CPU (tiny runs: only that a fraction is printed)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):  # the best of a few rounds: clocks ramp up in the first
        a @ b
        started = sync(device)
        for _ in range(repeats):
            a @ b
        best = min(best, (sync(device) - started) / repeats)
    peak = Peak(2 * n**3 / best / 1e12, f"{str(dtype).removeprefix('torch.')} {n} x {n} x {n} matmul")
    print(f"matmul peak: {peak.tflops:.4g} TFLOP/s ({peak.what}, measured on this device)", flush=True)
    return peak


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    """GiB at the peak since `reset_peak`: what PyTorch allocated on the GPU; on a CPU the process's
    peak resident memory so far (no per-path figure exists there; tiny runs only)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs `fn` runs, as PyTorch's FlopCounterMode counts them (matmuls, convolutions, and SDPA's
    fused CUDA kernels; on a CPU its attention is not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def ladder(start: int, cap: int) -> list[int]:
    """`start`, doubled while at most `cap`."""
    batches = [start]
    while batches[-1] * 2 <= cap:
        batches.append(batches[-1] * 2)
    return batches


@dataclass(frozen=True)
class Rate:
    batch: str
    """The batch, or for a path of several parts each part's ("generate 256 + states 64")."""
    per_s: float
    """Samples (images) per second."""
    tflops: float
    """Useful TFLOP/s: the work's own FLOPs per second, none on padding."""
    peak_gib: float
    seconds: float = 0.0
    """What measuring it again would take, one-off work left out: set by a measure function whose
    first batch pays a compile that larger batches do not pay again; else `search` sets the wall
    time of the measurement."""


def rate_line(path: str, rate: Rate, peak: Peak, unit: str) -> str:
    return (f"{path} batch {rate.batch}: {rate.per_s:.4g} {unit}, {rate.tflops:.4g} useful TFLOP/s, "
            f"{100 * rate.tflops / peak.tflops:.3g}% of the matmul peak, {rate.peak_gib:.3g} GiB peak")


def is_out_of_memory(error: BaseException) -> bool:
    # Compiled code and CUDA graphs may report the allocator's failure as a plain RuntimeError.
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_deadline = [float("inf")]


def set_time_box(seconds: float | None) -> None:
    """From now on, `search` starts no batch that would likely end after `seconds`: a benchmark
    whose command has a time limit then stops in time to print its summary."""
    _deadline[0] = time.monotonic() + seconds if seconds else float("inf")


def time_left() -> float:
    return _deadline[0] - time.monotonic()


def search(path: str, measure: Callable[[int], Rate], batches: list[int], device: torch.device, peak: Peak,
           unit: str, known: dict[int, Rate] | None = None, leave: float = 0.0) -> dict[int, Rate]:
    """`measure` at each of `batches` in turn (ascending), each line printed as it is measured,
    until the card runs out of memory, a batch is no faster than the best before it, the list ends,
    or the time box (`set_time_box`), less the `leave` seconds kept for what comes after, has less
    left than twice what the last batch took (a doubled batch takes about twice as long); a path
    with no rate yet always gets its first batch. Returns the rates by batch, `known` (rates of
    smaller batches measured before) first."""
    rates: dict[int, Rate] = dict(known or {})
    took = max((r.seconds for r in rates.values()), default=0.0)
    for batch in batches:
        left = time_left() - leave
        if rates and left <= 2 * took:
            print(f"{path} batch {batch}: not tried, {max(left, 0):.0f} s left in the time box for this search and "
                  f"the last batch took {took:.0f} s; the search stops", flush=True)
            break
        started = time.monotonic()
        free_memory(device)
        reset_peak(device)
        try:
            rate = measure(batch)
            failed = None
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            failed = str(error).splitlines()[0][:100]
        if failed is not None:  # outside the except block, so that its traceback no longer holds tensors
            free_memory(device)
            print(f"{path} batch {batch}: out of memory ({failed}); the search stops", flush=True)
            break
        if not rate.seconds:
            rate = dataclasses.replace(rate, seconds=time.monotonic() - started)
        took = rate.seconds
        best = max((r.per_s for r in rates.values()), default=0.0)
        rates[batch] = rate
        print(rate_line(path, rate, peak, unit), flush=True)
        if rate.per_s <= best:
            print(f"{path} batch {batch}: no faster than a smaller batch; the search stops", flush=True)
            break
    if not rates:
        raise SystemExit(f"{path}: even batch {batches[0]} does not fit this device")
    return rates


def best(rates: dict[int, Rate]) -> Rate:
    return max(rates.values(), key=lambda r: r.per_s)


def print_summary(unit: str, naive: dict[int, Rate], project: dict[int, Rate], peak: Peak, *,
                  naive_best: Rate | None = None) -> None:
    """Each path's best batch, then the two ratios of the project's rate to the naive path's: at the
    largest batch both ran, and each at its best (`naive_best` where the naive path's best combines
    several searches)."""
    naive_best = naive_best or best(naive)
    project_best = best(project)
    print(rate_line("best naive:", naive_best, peak, unit), flush=True)
    print(rate_line("best project:", project_best, peak, unit), flush=True)
    common = sorted(set(naive) & set(project))
    same = (f"{common[-1]}: {project[common[-1]].per_s / naive[common[-1]].per_s:.3g}x" if common
            else "none: no batch measured on both paths")
    print(f"ratios (project / naive, {unit}): same batch {same}; best vs best (project at {project_best.batch}, "
          f"naive at {naive_best.batch}): {project_best.per_s / naive_best.per_s:.3g}x", flush=True)
