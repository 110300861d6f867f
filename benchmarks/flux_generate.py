"""CoBSAT generation throughput: the FLUX pipeline as loaded vs the project's path, each at its own
best batch, same run.

    .venv/bin/python benchmarks/flux_generate.py            # FLUX.1-dev shapes, 512 px, 28 steps: a GPU
    .venv/bin/python benchmarks/flux_generate.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: `Flux.draw_embeds`, the call `thinkdiff cobsat eval` makes, with random weights at
FLUX.1-dev transformer and VAE shapes, 128 prompt-embedding rows of width 4096 (the aligner
output), a pooled embedding, guidance 3.5, 28 steps, 512x512 (1024 latent tokens), VAE decode
included. The embeddings are on the device, in the pipeline's dtype, before any timer.
- naive: the pipeline as loaded, with diffusers' defaults (eager bf16, PyTorch's SDPA).
- project: what eval.batch_size / eval.compile set: the attention projections fused and the
  transformer's repeated blocks compiled (CUDA). Its VAE decode is timed on its own too (the part
  of the time the transformer does not take).
Each path runs at batches doubling from its start (`timing.search`: until the card runs out of
memory, a larger batch is no faster, or the list ends), one warm-up batch of 2 steps (the compile,
the allocator) before each batch's timed ones; the summary gives the ratio at the largest batch
both ran and best vs best. Useful TFLOP/s: the FLOPs of one image, counted by PyTorch's
FlopCounterMode on the naive path at batch 1 (the same work on both paths; fusing the projections
changes no FLOP count), times images/s.
The project's first image is compared with the naive path's first image of the same embeddings and
seed (max and mean absolute pixel difference, 0..255). `--variants` times the project path at its
first batch again with one change each, its blocks recompiled (`VARIANTS`), candidates for the
fast path measured before any is adopted; they run right after that batch, before the larger ones.
Last, SDPA alone at FLUX's attention shape (the project's best batch, 24 heads, 1,152 tokens, head
dim 128) per backend, against flash attention's output: PyTorch tries flash first, cuDNN's kernel
last.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from compile_counters import changed_since, snapshot
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from timing import (
    Rate,
    count_flops,
    ladder,
    matmul_peak,
    peak_gib,
    print_summary,
    rate_line,
    reset_peak,
    search,
    set_time_box,
    sync,
)
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
    # backend first makes q, k and v contiguous, which costs that back (benchmarks/README.md,
    # flux_generate.py's history). This keeps diffusers' native backend and only puts cuDNN first
    # in PyTorch's choice.
    # The other backends stay as fallbacks: the VAE's attention (head dim 512) has neither kernel.
    "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True),
    # Inductor tunes the launch parameters of the kernels it generates (norms, modulation, GELU);
    # costs compile time only.
    "coordinate-descent": lambda: torch._inductor.config.patch(coordinate_descent_tuning=True),
}
COMPILE_S = 60
"""About what compiling the project path (or a variant) and its warm-up batch take at paper shapes:
a guess for an H200, the time a search under a time box leaves for each."""
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


def timed(flux: Flux, path: str, embeds: torch.Tensor, pooled: torch.Tensor, batch: int, n_batches: int,
          draw: dict) -> tuple[float, np.ndarray, float]:
    """Seconds per image over `n_batches` batches after one warm-up batch of 2 steps (same shapes:
    the compile, the allocator and the kernels' choices), the first image, and the VAE decode's
    seconds per image within them."""
    flux.draw_embeds(embeds[:batch], pooled, seeds=list(range(batch)), **(draw | {"steps": 2}))
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
    print(f"{path} batch {batch}: compile counters changed over the timed batches: {changed_since(warm)}", flush=True)
    return seconds / (batch * n_batches), np.asarray(first, dtype=np.int16), vae["s"] / (batch * n_batches)


def flops_per_image(flux: Flux, embeds: torch.Tensor, pooled: torch.Tensor, draw: dict) -> float:
    """One image's FLOPs at `draw`'s steps: counted at 1 and 2 steps (batch 1), the difference being
    one step's, the rest the VAE decode and the pipeline's other work."""
    one, two = (count_flops(lambda n=n: flux.draw_embeds(embeds[:1], pooled, seeds=[0], **(draw | {"steps": n})))
                for n in (1, 2))
    return one + (draw["steps"] - 1) * (two - one)


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


def variant_names(spec: str) -> list[str]:
    names = spec.split("+")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown}: choose from {sorted(VARIANTS)}, joined by '+'")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--naive-batches", type=int, nargs="+", default=None,
                        help="the naive path's batches, searched in turn (default 1 doubling to 16; tiny 1 2 4)")
    parser.add_argument("--project-batches", type=int, nargs="+", default=None,
                        help="the project path's batches, searched in turn; the variants run at the first "
                             "(default 8, paper-lvlm's eval.batch_size, doubling to 32; tiny 2 4)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny 4)")
    parser.add_argument("--batches", type=int, default=1, help="timed batches per batch size, after a warm-up")
    parser.add_argument("--variants", nargs="*", type=variant_names, default=[],
                        help=f"time the project path again with each of these changes (blocks recompiled); "
                             f"one of {sorted(VARIANTS)}, or several joined by '+' to apply together")
    parser.add_argument("--time-box", type=float, default=None,
                        help="seconds this run may take: no batch is started that would likely end later")
    args = parser.parse_args()
    set_time_box(args.time_box)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    draw = dict(steps=args.steps or (4 if args.tiny else 28), guidance=3.5, size=64 if args.tiny else 512)
    naive_sizes = args.naive_batches or ([1, 2, 4] if args.tiny else ladder(1, 16))
    project_sizes = args.project_batches or ([2, 4] if args.tiny else ladder(8, 32))
    peak = matmul_peak(device)
    if args.tiny:
        make = lambda: build_tiny_flux_pipeline()  # noqa: E731
    else:
        pipe = paper_pipeline(device)
        make = lambda: pipe  # noqa: E731  one set of weights for every path
    naive = wrap_flux(make(), "random", device=device, compile=False)
    g = torch.Generator().manual_seed(0)
    rows = max(naive_sizes + project_sizes) * args.batches
    embeds = torch.randn(rows, 128, naive.joint_dim, generator=g).to(device, naive.dtype)
    pooled = torch.randn(1, naive.pipe.transformer.config.pooled_projection_dim, generator=g).to(device, naive.dtype)
    per_image = flops_per_image(naive, embeds, pooled, draw)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {naive.dtype}, "
          f"{sum(p.numel() for p in naive.pipe.transformer.parameters()) / 1e9:.2f}B transformer params, {draw}, "
          f"{per_image / 1e12:.4g} TFLOP per image; naive batches {naive_sizes}, project batches {project_sizes}",
          flush=True)
    first_images: dict[str, np.ndarray] = {}
    vae_share: dict[tuple[str, int], float] = {}

    def measure(flux: Flux, path: str, batch: int) -> Rate:
        s_per_image, image, vae_s = timed(flux, path, embeds, pooled, batch, args.batches, draw)
        reference = first_images.setdefault("naive", image)
        d = np.abs(image - reference)
        vae_share[path, batch] = vae_s
        print(f"{path} batch {batch}: {s_per_image:.4g} s/image, VAE decode {vae_s:.4g} s/image; first image vs "
              f"naive: max |diff| {d.max()}, mean {d.mean():.3f} (0..255)", flush=True)
        return Rate(str(batch), 1 / s_per_image, per_image / s_per_image / 1e12, peak_gib(device))

    # Under a time box on a GPU, the naive search leaves time for the project's first batch and the
    # variants, each a compile (the tiny runs need none).
    on_gpu = device.type == "cuda"
    naive_rates = search("naive", lambda b: measure(naive, "naive", b), naive_sizes, device, peak, "images/s",
                         leave=(1 + len(args.variants)) * COMPILE_S if on_gpu else 0)
    compile = on_gpu
    project = wrap_flux(naive.pipe if not args.tiny else make(), "random", device=device, compile=compile)
    path = "project" + (" (fused qkv, compiled blocks)" if compile else "")
    first_rates = search(path, lambda b: measure(project, path, b), project_sizes[:1], device, peak, "images/s")
    # The variants now: the figures still undecided come before the larger batches' compiles.
    for variant in args.variants:
        name = f"project, {'+'.join(variant)}"
        torch._dynamo.reset()  # the backend choice and kernel tuning are fixed when a graph compiles
        reset_peak(device)
        try:
            with contextlib.ExitStack() as changes:
                for change in variant:
                    changes.enter_context(VARIANTS[change]())
                rate = measure(project, name, project_sizes[0])
        except RuntimeError as error:  # out of memory included: the lines of the other paths still count
            print(f"{name} batch {project_sizes[0]}: failed: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        print(rate_line(name, rate, peak, "images/s"), flush=True)
        print(f"{'+'.join(variant)} / project at batch {project_sizes[0]}: "
              f"{rate.per_s / first_rates[project_sizes[0]].per_s:.3g}x", flush=True)
    if args.variants:
        torch._dynamo.reset()  # the larger batches compile without the last variant's settings
    project_rates = search(path, lambda b: measure(project, path, b), project_sizes[1:], device, peak, "images/s",
                           known=first_rates, leave=10 if on_gpu else 0)  # 10 s: the SDPA lines
    print_summary("images/s", naive_rates, project_rates, peak)
    best_batch = max(project_rates, key=lambda b: project_rates[b].per_s)
    print(f"project: VAE decode {vae_share[path, best_batch]:.3f} s/image of {1 / project_rates[best_batch].per_s:.3f} "
          f"at batch {best_batch}; compile {compile}", flush=True)
    config = project.pipe.transformer.config
    shape = (best_batch, config.num_attention_heads, (draw["size"] // 16) ** 2 + 128, config.attention_head_dim)
    print(f"SDPA alone at {shape} (B, H, L, D), {naive.dtype}:")
    for line in attention_backends(device, naive.dtype, shape):
        print("  " + line)


if __name__ == "__main__":
    main()
