"""CoBSAT generation throughput: FLUX eager at batch 1 and 4 vs the project's path, same run.

    .venv/bin/python benchmarks/flux_generate.py            # FLUX.1-dev shapes, 512 px, 28 steps: a GPU
    .venv/bin/python benchmarks/flux_generate.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: `Flux.draw_embeds`, the call `thinkdiff cobsat eval` makes, with random weights at
FLUX.1-dev transformer and VAE shapes, 128 prompt-embedding rows of width 4096 (the aligner
output), a pooled embedding, guidance 3.5, 28 steps, 512x512 (1024 latent tokens), VAE decode
included.
- naive: the pipeline as loaded (eager bf16, SDPA) at batch 1 and at batch 4.
- project: what eval.batch_size / eval.compile set: a larger batch, the attention projections
  fused and the transformer's repeated blocks compiled (CUDA). Its VAE decode is timed on its own
  too (the part of the time the transformer does not take).
The project's first image is compared with the naive batch-1 image of the same embeddings and seed
(max and mean absolute pixel difference, 0..255). `--variants` then times the project path again
with one change each, its blocks recompiled (`VARIANTS`), candidates for the fast path measured
before any is adopted. Last, SDPA alone at FLUX's attention shape (batch 8, 24 heads, 1,152
tokens, head dim 128) per backend, against flash attention's output: PyTorch tries flash first,
cuDNN's kernel last.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from compile_counters import changed_since, snapshot
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from timing import sync
from torch.nn.attention import SDPBackend, sdpa_kernel

from thinkdiff.models.flux import Flux, wrap_flux
from thinkdiff.models.tiny import build_tiny_flux_pipeline

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VARIANTS = {
    # Alone at FLUX's shape cuDNN's kernel is faster than flash's, but diffusers' `_native_cudnn`
    # backend first makes q, k and v contiguous, which costs that back (docs/performance.md). This
    # keeps diffusers' native backend and only puts cuDNN first in PyTorch's choice.
    # The other backends stay as fallbacks: the VAE's attention (head dim 512) has neither kernel.
    "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True),
    # Inductor tunes the launch parameters of the kernels it generates (norms, modulation, GELU);
    # costs compile time only.
    "coordinate-descent": lambda: torch._inductor.config.patch(coordinate_descent_tuning=True),
}
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                          use_dynamic_shifting=True)


def paper_pipeline(device: torch.device) -> FluxPipeline:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_DEV_VAE)
    torch.set_default_dtype(torch.float32)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae,
                        transformer=transformer, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None)


def timed(flux: Flux, embeds: torch.Tensor, pooled: torch.Tensor, batch: int, n_batches: int, draw: dict):
    """Seconds per image over `n_batches` batches after one warm-up batch, the first image, and the
    VAE decode's seconds per image within them."""
    flux.draw_embeds(embeds[:batch], pooled, seeds=list(range(batch)), **draw)
    warm = snapshot()
    first, seconds, vae = None, 0.0, {"s": 0.0}
    vae_decode = flux.pipe.vae.decode

    def timed_decode(*args, **kwargs):
        started = sync(flux.device)
        out = vae_decode(*args, **kwargs)
        vae["s"] += sync(flux.device) - started
        return out

    flux.pipe.vae.decode = timed_decode
    try:
        for k in range(n_batches):
            rows = slice(k * batch, (k + 1) * batch)
            started = sync(flux.device)
            out = flux.draw_embeds(embeds[rows], pooled, seeds=list(range(rows.start, rows.stop)), **draw)
            seconds += sync(flux.device) - started
            first = out[0] if first is None else first
    finally:
        flux.pipe.vae.decode = vae_decode
    print(f"batch {batch}: compile counters changed over the timed batches: {changed_since(warm)}", flush=True)
    return seconds / (batch * n_batches), np.asarray(first, dtype=np.int16), vae["s"] / (batch * n_batches)


def attention_backends(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> list[str]:
    """One SDPA call per backend at `shape` (B, H, L, D): ms per call and max |diff| to the first
    backend that runs (flash where there is one)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    lines, reference = [], None
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                started = sync(device)
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v)
                ms = (sync(device) - started) * 100
        except RuntimeError as error:
            lines.append(f"{backend.name}: unavailable ({str(error).splitlines()[0][:80]})")
            continue
        reference = out if reference is None else reference
        lines.append(f"{backend.name}: {ms:.3f} ms, "
                     f"max |diff| {(out.float() - reference.float()).abs().max().item():.2e}")
    return lines


def report(path: str, results: dict[str, float], diffs: dict[str, np.ndarray]) -> None:
    """One measured path's line, printed as soon as it is measured: a later path cut off by the
    call's timeout (the variants compile for minutes) leaves the earlier ones complete."""
    d = diffs[path]
    print(f"{path}: {results[path]:.3f} s/image, {results['naive b4'] / results[path]:.2f}x naive b4; "
          f"first image vs naive b1: max |diff| {d.max()}, mean {d.mean():.3f} (0..255)", flush=True)


def variant_names(spec: str) -> list[str]:
    names = spec.split("+")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown}: choose from {sorted(VARIANTS)}, joined by '+'")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=8, help="the project path's batch (eval.batch_size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny 4)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per path, after one warm-up batch")
    parser.add_argument("--variants", nargs="*", type=variant_names, default=[],
                        help=f"time the project path again with each of these changes (blocks recompiled); "
                             f"one of {sorted(VARIANTS)}, or several joined by '+' to apply together")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    draw = dict(steps=args.steps or (4 if args.tiny else 28), guidance=3.5, size=64 if args.tiny else 512)
    if args.tiny:
        make = lambda: build_tiny_flux_pipeline()  # noqa: E731
    else:
        pipe = paper_pipeline(device)
        make = lambda: pipe  # noqa: E731  one set of weights for every path
    naive = wrap_flux(make(), "random", device=device, compile=False)
    g = torch.Generator().manual_seed(0)
    rows = max(args.batch, 4) * args.batches
    embeds = torch.randn(rows, 128, naive.joint_dim, generator=g).to(device, naive.dtype)
    pooled = torch.randn(1, naive.pipe.transformer.config.pooled_projection_dim, generator=g).to(device, naive.dtype)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {naive.dtype}, "
          f"{sum(p.numel() for p in naive.pipe.transformer.parameters()) / 1e9:.2f}B transformer params, {draw}")
    results = {}
    results["naive b1"], image_b1, _ = timed(naive, embeds, pooled, 1, args.batches, draw)
    results["naive b4"], _, _ = timed(naive, embeds, pooled, 4, args.batches, draw)
    print(f"naive done: {results['naive b1']:.3f} s/image at batch 1, {results['naive b4']:.3f} at batch 4", flush=True)
    compile = device.type == "cuda"
    project = wrap_flux(naive.pipe if not args.tiny else make(), "random", device=device, compile=compile)
    name = f"project b{args.batch}" + (" (fused qkv, compiled blocks)" if compile else "")
    results[name], image_project, vae_s = timed(project, embeds, pooled, args.batch, args.batches, draw)
    diffs = {name: np.abs(image_project - image_b1)}
    report(name, results, diffs)
    for variant in args.variants:
        torch._dynamo.reset()  # the backend choice and kernel tuning are fixed when a graph compiles
        with contextlib.ExitStack() as changes:
            for change in variant:
                changes.enter_context(VARIANTS[change]())
            path = f"{name}, {'+'.join(variant)}"
            results[path], image, _ = timed(project, embeds, pooled, args.batch, args.batches, draw)
        diffs[path] = np.abs(image - image_b1)
        report(path, results, diffs)
    print("| path | s/image | images/s |")
    print("|---|---|---|")
    for path, s in results.items():
        print(f"| {path} | {s:.3f} | {1 / s:.2f} |")
    print(f"ratio project / naive b4: {results['naive b4'] / results[name]:.2f}x (target 1.5x); compile {compile}")
    print(f"project: VAE decode {vae_s:.3f} s/image of {results[name]:.3f}", flush=True)
    config = project.pipe.transformer.config
    shape = (args.batch, config.num_attention_heads, (draw["size"] // 16) ** 2 + 128, config.attention_head_dim)
    print(f"SDPA alone at {shape} (B, H, L, D), {naive.dtype}:")
    for line in attention_backends(device, naive.dtype, shape):
        print("  " + line)

if __name__ == "__main__":
    main()
