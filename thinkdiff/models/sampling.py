"""Top-p (nucleus) filtering without sorting the vocabulary.

transformers' `TopPLogitsWarper` sorts every row of the (batch, vocabulary) scores at every decode
step: for Qwen2-VL's 152k-token vocabulary at batch 256, a segmented radix sort of 39M floats with
their int64 indices. Sorting dominates top-p sampling on GPUs (vLLM replaced it with a pivot search,
Qrita, arXiv 2602.01518; FlashInfer with sorting-free kernels). `TopPByThreshold` keeps the
tokens a sort-based top-p keeps (computed in float64; `top_p_keep` names the two boundary cases
where `TopPLogitsWarper` itself differs), found as a probability threshold by bisection: 30
masked sums per row, each one pass over the probabilities, instead of a sort.

Shape legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import LogitsProcessor

BISECTION_STEPS = 30
"""Probabilities are in [0, 1]: their float32 bit patterns, read as int32, are ordered like the
values and lie below 2**30, so 30 halvings of [0, bits(max)] leave two neighbouring floats."""


def top_p_keep(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) True for the tokens top-p sampling keeps: those whose probability is at least the
    smallest value v with `mass(v) > 1 - top_p`, where mass(v) is the total probability of the
    tokens of probability <= v. `TopPLogitsWarper` keeps the same set (ascending sort, cumulative
    sum, drop while <= 1 - top_p, the most probable token always kept), except among tokens of
    exactly equal probability at the boundary, which it splits in sort order and this keeps
    together; sums in another order can also move a boundary that lies within float rounding.

    The search runs on the bit patterns of float32 probabilities (ordered like the values), so it
    ends on the threshold itself, not near it: `lo` always has mass <= 1 - top_p, `hi` more."""
    probs_BV = probs_BV.float()
    limit = 1.0 - top_p
    lo_B1 = torch.zeros(probs_BV.shape[0], 1, dtype=torch.int32, device=probs_BV.device)
    hi_B1 = probs_BV.amax(-1, keepdim=True).view(torch.int32)
    for _ in range(BISECTION_STEPS):
        mid_B1 = lo_B1 + (hi_B1 - lo_B1) // 2
        mass_B1 = torch.where(probs_BV <= mid_B1.view(torch.float32), probs_BV, 0.0).sum(-1, keepdim=True,
                                                                                        dtype=torch.float64)
        above_B1 = mass_B1 > limit
        hi_B1 = torch.where(above_B1, mid_B1, hi_B1)
        lo_B1 = torch.where(above_B1, lo_B1, mid_B1)
    return probs_BV >= hi_B1.view(torch.float32)


class TopPByThreshold(LogitsProcessor):
    """`TopPLogitsWarper`'s filter (min_tokens_to_keep 1) by `top_p_keep`, compiled: scores outside
    the nucleus become -inf. The 30 passes pay only fused (each one reduction over the
    probabilities); run eagerly, each is a few separate kernels and the sort is cheaper."""

    def __init__(self, top_p: float):
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p={top_p}: use a value in [0, 1]")
        self.top_p = float(top_p)
        self.keep = compiled_top_p_keep()

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(~self.keep(scores.softmax(-1), self.top_p), -float("inf"))


@cache
def compiled_top_p_keep():
    """`top_p_keep` compiled once per process (static shapes: one graph per batch shape and top_p)."""
    return torch.compile(top_p_keep, dynamic=False)
