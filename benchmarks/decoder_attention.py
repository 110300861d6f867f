"""The T5 decoder's attention in a training step, forward and backward, per SDPA backend: what the
training path runs (`DECODER_SDPA_BACKENDS`, no cuDNN) against cuDNN and against FlexAttention
(`train.decoder_attention: flex`, compiled), and whether each backward stays finite where cuDNN's
is reported not to.

    .venv/bin/python benchmarks/decoder_attention.py           # flan-t5-xxl heads (64 x 64), batch 128: a GPU
    .venv/bin/python benchmarks/decoder_attention.py --tiny    # small shapes on a CPU in seconds (a test runs it)

Per backend, ms per layer for one self-attention (T5's relative position bias with the causal
mask, a (1, H, T, T) bias) and one cross-attention (a (B, 1, 1, S) key mask over the source slots),
forward and backward, at the target length of the average bucket (64) and the widest source slots
(128, as target-sorted batches have). "vs math": the largest difference of the outputs and
gradients from the math backend. "Stress": the same two calls with every logit near -120 (T5 does
not scale its logits) and key lengths of 64, where cuDNN's backward is reported to return NaN query
gradients (pytorch/pytorch#196678), and 72, the width a batch of 64 would be widened to if cuDNN
came back with that workaround; the count of non-finite query gradients at each.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from thinkdiff.models.attention import DECODER_SDPA_BACKENDS

STRESS_WIDTHS = (64, 72)
COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)


def attention_inputs(batch: int, heads: int, dim: int, target: int, source: int, device, dtype, *,
                     stress: bool = False):
    """(query, key, value, mask) for the self-attention and for the cross-attention."""
    g = torch.Generator().manual_seed(0)

    def qkv(length_k: int):
        q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for n in (target, length_k, length_k))
        if stress:  # every logit about -120: each row's logsumexp far below ln(FLT_MAX) = 88.7
            q, k = q * 0.1, k * 0.1
            q[..., 0], k[..., 0] = 1.0, -120.0
        return [x.to(device, dtype) for x in (q, k, v)]

    causal = torch.ones(target, target, dtype=torch.bool).tril()
    bias = torch.randn(1, heads, target, target, generator=g).masked_fill(~causal, torch.finfo(dtype).min)
    rows = torch.randint(1, source + 1, (batch, 1), generator=g)
    key_mask = (torch.ones(batch, 1, 1, source, dtype=torch.bool) if stress
                else (torch.arange(source) < rows)[:, None, None, :])
    return {"self": (*qkv(target), bias.to(device, dtype)), "cross": (*qkv(source), key_mask.to(device))}


def forward_backward(backends, q, k, v, mask) -> list[torch.Tensor]:
    """Output and query/key/value gradients of one attention call on `backends`."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        out.backward(torch.ones_like(out))
    return [out.detach(), q.grad, k.grad, v.grad]


def flex_forward_backward(q, k, v, mask) -> list[torch.Tensor]:
    """`forward_backward` on FlexAttention (`train.decoder_attention: flex`), compiled as the
    training path compiles it: the self-attention's bias (causal mask folded in) added and the
    cross-attention's key mask applied by the score function."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    if mask.dtype == torch.bool:
        keep_BK = mask[:, 0, 0]
        score_mod = lambda score, b, h, i, j: torch.where(keep_BK[b, j], score, -float("inf"))  # noqa: E731
    else:
        score_mod = lambda score, b, h, i, j: score + mask[0, h, i, j]  # noqa: E731
    out = COMPILED_FLEX(q, k, v, score_mod=score_mod, scale=1.0)
    out.backward(torch.ones_like(out))
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (tiny 2)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, dim, target, source = (4, 8, 64, 128) if args.tiny else (64, 64, 64, 128)
    batch = args.batch or (2 if args.tiny else 128)
    inputs = attention_inputs(batch, heads, dim, target, source, device, dtype)
    stress = {width: attention_inputs(batch, heads, dim, width, width, device, dtype, stress=True)
              for width in STRESS_WIDTHS}
    candidates = {"training path (sdpa)": DECODER_SDPA_BACKENDS}
    if device.type == "cuda":
        candidates |= {"efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION]}
    candidates["flex"] = "flex"  # no backward on a CPU: its row then says so
    reference = {kind: forward_backward([SDPBackend.MATH], *x) for kind, x in inputs.items()}
    print(f"device {device}, {dtype}, batch {batch}, {heads} heads x {dim}, target {target}, source slots {source}")
    print(f"| path | self ms | cross ms | vs math | stress: non-finite query gradients (self, cross) at keys "
          f"{' / '.join(map(str, STRESS_WIDTHS))} |")
    print("|---|---|---|---|---|")
    for name, backends in candidates.items():
        run = flex_forward_backward if backends == "flex" else lambda *x, b=backends: forward_backward(b, *x)
        try:
            cells = []
            for x in inputs.values():
                run(*x)  # warm-up (flex: its compile)
                started = sync(device)
                for _ in range(args.repeats):
                    run(*x)
                cells.append(f"{(sync(device) - started) / args.repeats * 1e3:.3f}")
            difference = max((a.float() - b.float()).abs().max().item() for kind, x in inputs.items()
                             for a, b in zip(run(*x), reference[kind], strict=True))
            nonfinite = " / ".join(", ".join(str((~run(*x)[1].isfinite()).sum().item())
                                             for x in calls.values()) for calls in stress.values())
            print(f"| {name} | {cells[0]} | {cells[1]} | {difference:.2e} | {nonfinite} |", flush=True)
        except RuntimeError as error:  # a backend that takes no such input (NotImplementedError included)
            print(f"| {name} | - | - | - | unsupported: {str(error).splitlines()[0][:80]} |", flush=True)


if __name__ == "__main__":
    main()
