"""Covers: top-p by threshold keeps exactly the tokens a sort-based top-p keeps (against the
float64 reference, and against transformers' TopPLogitsWarper where no boundary lies within float32
rounding), including suppressed tokens and the edge values of top_p; tied tokens at the boundary
are kept together; compiled, it equals the eager function."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from thinkdiff.models import sampling
from thinkdiff.models.sampling import TopPByThreshold, top_p_keep

TOP_PS = [0.0, 0.001, 0.5, 0.9, 0.99, 1.0]


def sorted_top_p_keep(scores_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper's algorithm (ascending sort, cumulative sum, drop while <= 1 - top_p, keep
    the most probable token) in float64, so no boundary moves with rounding."""
    probs, order = scores_BV.softmax(-1).double().sort(-1)
    drop = probs.cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return ~drop.scatter(1, order, drop)


def random_scores(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    scores[:, :5] = -float("inf")  # suppressed tokens: probability 0
    return scores


@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize(("vocab", "scale"), [(50, 1.0), (4000, 0.05), (4000, 1.0), (4000, 8.0), (152064, 1.0)])
def test_threshold_keeps_the_sorted_nucleus(top_p, vocab, scale):
    scores = random_scores(16 if vocab < 10000 else 4, vocab, scale, seed=vocab + int(100 * scale))
    keep = top_p_keep(scores.softmax(-1), top_p)
    assert torch.equal(keep, sorted_top_p_keep(scores, top_p))
    assert keep.any(-1).all() and not keep[:, :5].any()
    if top_p == 0.0:
        assert torch.equal(keep.sum(-1), torch.ones(len(scores), dtype=torch.long))  # the most probable token only


@pytest.mark.parametrize("top_p", TOP_PS)
def test_threshold_filter_equals_transformers_top_p(top_p, monkeypatch):
    """Peaked rows (as a trained model's, small nuclei): every boundary is far from rounding."""
    monkeypatch.setattr(sampling, "compiled_top_p_keep", lambda: top_p_keep)  # eager here (compiled: below)
    scores = random_scores(32, 4000, 6.0, seed=1)
    filtered = TopPByThreshold(top_p)(None, scores.clone())
    torch.testing.assert_close(filtered, TopPLogitsWarper(top_p)(None, scores.clone()), rtol=0, atol=0)


def test_tied_tokens_at_the_boundary_are_kept_together():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    # Sorted ascending the cumulative sums are 0.2, 0.4, 0.6, 1.0: a sort keeps 0.4 and one 0.2;
    # the three tokens at 0.2 are alike, so the threshold keeps all of them.
    assert top_p_keep(probs, 0.5).tolist() == [[True, True, True, True]]
    assert top_p_keep(probs, 0.3).tolist() == [[True, False, False, False]]


def test_compiled_threshold_equals_eager():
    sampling.compiled_top_p_keep.cache_clear()
    probs = random_scores(8, 3000, 2.0, seed=3).softmax(-1)
    compiled = TopPByThreshold(0.9).keep
    assert compiled is not top_p_keep
    assert torch.equal(compiled(probs, 0.9), top_p_keep(probs, 0.9))


def test_top_p_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="top_p=1.5"):
        TopPByThreshold(1.5)
