"""One decode step's attention, one layer, compiled: K/V repeated to every query head (what
transformers' SDPA does under torch.compile with a mask) vs the packed query heads that the features
stage uses (`thinkdiff.models.attention.packed_gqa_sdpa`).

    .venv/bin/python benchmarks/decode_attention.py            # Qwen2-VL-7B heads (28 over 4), 128 dims,
                                                               # 512 cached positions
    .venv/bin/python benchmarks/decode_attention.py --tiny     # small shapes in seconds (a test runs it)

Batch 256 on a GPU in bf16, batch 64 on a CPU in fp32 (default). Both paths are checked equal.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from thinkdiff.models.attention import packed_gqa_sdpa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=512,
                        help="cached positions (the features stage's static cache for about 290 prompt "
                             "+ 128 generated tokens, rounded up to 256s)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, length, dim = (4, 2, 32, 16) if args.tiny else (28, 4, args.length, 128)
    batch = args.batch or (2 if args.tiny else 256 if device.type == "cuda" else 64)
    groups = heads // kv_heads
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, generator=g).to(device, dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g).to(device, dtype) for _ in range(2))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
    mask[0, ..., : length // 4] = False  # a left-padded row
    module = torch.nn.Module()
    module.num_key_value_groups = groups

    def repeated(q, k, v, m):
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                              attn_mask=m).transpose(1, 2)

    def packed(q, k, v, m):
        return packed_gqa_sdpa(module, q, k, v, m)[0]

    outputs, times = {}, {}
    for name, fn in (("repeat_kv", repeated), ("packed", packed)):
        step = torch.compile(fn)
        outputs[name] = step(query, key, value, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.repeats):
            step(query, key, value, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - started) / args.repeats
    torch.testing.assert_close(outputs["packed"], outputs["repeat_kv"])
    print(f"device {device}, {dtype}, batch {batch}, {heads} query / {kv_heads} key-value heads, "
          f"{length} cached positions")
    print("| path | ms per layer and step |")
    print("|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.3f} |")
    print(f"ratio repeat_kv / packed: {times['repeat_kv'] / times['packed']:.1f}x")


if __name__ == "__main__":
    main()
