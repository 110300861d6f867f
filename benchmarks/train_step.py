"""Aligner training step throughput: a naive training step as a competent user would write it vs
the project's training path, each at its own best batch, same run.

    .venv/bin/python benchmarks/train_step.py               # paper shapes (flan-t5-xxl, 3584 -> 4096): a GPU
    .venv/bin/python benchmarks/train_step.py --tiny        # tiny shapes on a CPU in seconds (a test runs it)

Workload: per sample a source length uniform in 1..128 and a target length
uniform in 8..128, random weights, random features and labels.
- naive: the whole T5ForConditionalGeneration resident with transformers' defaults (SDPA
  attention), source and target padded to 128, full (B, 128, vocab) logits and transformers' own
  loss, the aligner under bf16 autocast and AdamW. Its batches are made before the timer, on the
  device and in the dtype the project's batches have (bf16 features), and its timed steps run
  back to back with no host sync between them.
- project: what `thinkdiff train` runs: the decoder alone (load_t5 never reads the encoder), the same
  kind of samples grouped by target length over a pool of `--steps` batches (train.bucket_window in
  a run), source rows packed (the aligner and the cross-attention keys and values see no padding)
  and targets padded to each batch's longest, the loop's own `train_step` (logits only for real
  target tokens, no host sync), batches made by the loop's own `pad` from bf16 store bytes (the
  paper preset's storage dtype) and handed over pinned, copied to the GPU inside the timer as the
  loop's prefetch thread hands them over, and on a GPU the decoder blocks compiled with dynamic
  shapes (train.compile; an untimed pass over the same batches pays the compile). Making the
  batches from the feature store (read, decode, split, tokenize, pad) runs on that thread, beside
  the GPU; its rate per core is `feature_store.py`'s "batches" column.
Each path runs at batches doubling from its start (`timing.search`) until the card runs out of
memory or a larger batch is no faster; the summary gives the ratio at the largest batch both ran
and best vs best. `--flex` then times the project path at its best batch again on FlexAttention
(`train.decoder_attention: flex`, CUDA only).
Useful TFLOP/s counts real tokens only (`step_flops`): decoder forward + activation backward (4 x
params x tokens: target tokens, and source rows for the cross-attention keys and values, plus
attention) and the aligner's forward + backward (6 x params x source rows). "FLOPs on padding":
the share of the FLOPs that run spent on padded positions (project: targets at each batch's
longest, attention over each batch's longest source; naive: 128 and 128, its full logits included).
"First loss vs naive": the relative difference between the project path's first loss and the
naive path's on the same batch from the same aligner (bf16 noise is about 1e-3; a wrong kernel or
mask shows as 1e-2 or more), and whether any loss of the timed pass was not finite.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from compile_counters import changed_since, graphs_since, snapshot
from timing import (
    Peak,
    Rate,
    free_memory,
    host_syncs,
    ladder,
    matmul_peak,
    peak_gib,
    print_summary,
    rate_line,
    reset_peak,
    search,
    set_time_box,
    sync,
    time_left,
)
from torch.autograd import DeviceType
from transformers import T5Config, T5ForConditionalGeneration

from thinkdiff.config import load_config
from thinkdiff.data.features import StoredFeatures
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.t5 import IGNORE_INDEX, T5DecoderLM, T5Parts
from thinkdiff.models.tiny import build_tiny_t5
from thinkdiff.train.data import Prepared, length_buckets, pad
from thinkdiff.train.engine import make_accelerator
from thinkdiff.train.loop import lr_multiplier, param_groups, train_step

XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
           pad_token_id=0, eos_token_id=1)
WARMUP_STEPS = 2
PROJECT_COMPILE_S = 90
"""About what compiling the decoder blocks takes at paper shapes (an H200 guess: a time-box margin)."""
PROJECT_S = 120
"""Time kept for the project path's search when the naive one runs under a time box."""
FLEX_S = PROJECT_COMPILE_S + 30
"""Time kept for the FlexAttention run (its compile, then two passes over a pool)."""
ATTENTION_KERNEL = re.compile("attention|fmha|sdpa", re.IGNORECASE)
"""SDPA's kernels: efficient (fmha_cutlass*), flash, cuDNN (*_sdpa_*), and their CPU operators."""


def make_batches(n: int, batch: int, d_in: int, vocab: int,
                 seed: int = 0) -> list[tuple[list[int], list[int], torch.Tensor, list[torch.Tensor]]]:
    """`n` batches of random lengths and labels; every batch shares one random feature tensor (the
    values do not matter for timing, and a pool of 64 batches of 128 would hold 15 GB)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, 128, d_in, generator=g)
    out = []
    for _ in range(n):
        src = torch.randint(1, 129, (batch,), generator=g).tolist()
        tgt = torch.randint(8, 129, (batch,), generator=g).tolist()
        labels = [torch.randint(2, vocab, (t,), generator=g) for t in tgt]
        out.append((src, tgt, feats, labels))
    return out


def bucketed(batches):
    """The project path's batching: the same samples, all the batches one pool, grouped by length
    as the training loop's batcher groups a pool of `train.bucket_window` batches (`length_buckets`),
    padding only to each batch's longest."""
    samples = [(s, t, f, lab) for src, tgt, feats, labels in batches
               for s, t, f, lab in zip(src, tgt, feats, labels, strict=True)]
    groups = length_buckets([(x[1], x[0]) for x in samples], len(batches[0][0]))
    return [([samples[i][0] for i in g], [samples[i][1] for i in g], torch.stack([samples[i][2] for i in g]),
             [samples[i][3] for i in g]) for g in groups]


def padded_to_128(src, tgt, feats, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive path's batch: features, source mask and labels padded to the longest possible length."""
    mask = torch.zeros(len(src), 128, dtype=torch.long)
    lab = torch.full((len(src), 128), IGNORE_INDEX)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        mask[i, :s] = 1
        lab[i, :t] = labels[i]
    return feats * mask[..., None], mask, lab


def step_flops(cfg: T5Config, aligner_params: int, src: list[int], tgt: list[int], *, rows: int | None = None,
               keys: int | None = None, targets: int | None = None, head_over_padding: bool = False) -> float:
    """FLOPs of one training step over a batch: the decoder's forward and activation backward
    (2 x 2 x params per token: projections and FFN per target token, cross-attention keys and
    values per source row, plus attention) and the aligner's forward and backward (6 x params per
    source row). Real lengths by default (the useful FLOPs); what runs, every sample at: `rows`
    source rows, `keys` cross-attention keys, `targets` target tokens, the vocabulary head over
    padding too only where `head_over_padding` (the naive path's full logits)."""
    d, layers = cfg.d_model, cfg.num_decoder_layers
    per_target = layers * (4 * d * d + 2 * d * d + 3 * d * cfg.d_ff)  # self-attention q/k/v/o, cross q/o, FFN
    per_source = layers * 2 * d * d  # cross-attention k/v
    head = 2 * 2 * d * cfg.vocab_size * (len(tgt) * targets if head_over_padding else sum(tgt))
    total = 0.0
    for s, t in zip(src, tgt, strict=True):
        k, s, t = keys or s, rows or s, targets or t
        attention = layers * (4 * t * t * d + 4 * t * k * d)
        total += 2 * (2 * (per_target * t + per_source * s) + 2 * attention) + 6 * aligner_params * s
    return total + head


def padding_share(cfg: T5Config, aligner_params: int, batches, *, naive: bool = False) -> float:
    """The share of a pass's FLOPs spent on padding: the project's batches (source rows packed,
    attention over each batch's longest source, targets padded to their longest), or the naive
    path's (everything at 128, full logits)."""
    useful = sum(step_flops(cfg, aligner_params, src, tgt) for src, tgt, _, _ in batches)
    run = sum(step_flops(cfg, aligner_params, src, tgt, rows=128, keys=128, targets=128, head_over_padding=True)
              if naive else step_flops(cfg, aligner_params, src, tgt, keys=max(src), targets=max(tgt))
              for src, tgt, _, _ in batches)
    return 1 - useful / run


def naive_inputs(batches, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The naive path's batches as a user would have them ready: padded to 128, on the device, the
    features in the project's storage dtype (bf16 on a GPU)."""
    out = []
    for src, tgt, feats, labels in batches:
        features, mask, labels_BT = padded_to_128(src, tgt, feats, labels)
        out.append((features.to(device, dtype), mask.to(device), labels_BT.to(device)))
    return out


def naive_loss(model: T5ForConditionalGeneration, aligner: Aligner, inputs, device, dtype) -> torch.Tensor:
    """The naive path's loss: transformers' whole model on the batch padded to 128, full logits."""
    features, mask, labels_BT = inputs
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(encoder_outputs=(aligner(features.float()),), attention_mask=mask, labels=labels_BT).loss


def naive_run(model: T5ForConditionalGeneration, aligner_state: dict, batches, device, dtype) -> Rate:
    """A plain loop over batches ready on the device: the whole model, padded to 128, full logits;
    the first WARMUP_STEPS steps untimed (allocator, kernels), the rest back to back with one sync
    at each end."""
    aligner = Aligner(AlignerConfig(in_dim=batches[0][2].shape[-1], out_dim=model.config.d_model)).to(device)
    aligner.load_state_dict(aligner_state)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4)
    inputs = naive_inputs(batches, device, dtype)

    def step(batch) -> torch.Tensor:
        loss = naive_loss(model, aligner, batch, device, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for batch in inputs[:WARMUP_STEPS]:
        step(batch)
    syncs = host_syncs(lambda: step(inputs[0])) if device.type == "cuda" else "-"
    started = sync(device)
    losses = [step(batch) for batch in inputs[WARMUP_STEPS:]]
    seconds = sync(device) - started
    timed = batches[WARMUP_STEPS:]
    aligner_params = sum(p.numel() for p in aligner.parameters())
    flops = sum(step_flops(model.config, aligner_params, src, tgt) for src, tgt, _, _ in timed)
    padding = padding_share(model.config, aligner_params, timed, naive=True)
    print(f"naive batch {len(batches[0][0])}: FLOPs on padding {100 * padding:.1f}%, host syncs in one step: "
          f"{syncs}, all losses finite: {bool(torch.stack(losses).isfinite().all())}", flush=True)
    return Rate(str(len(batches[0][0])), sum(len(b[0]) for b in timed) / seconds, flops / seconds / 1e12,
                peak_gib(device))


def project_run(decoder: T5DecoderLM, batches, device, aligner_state: dict, reference_loss: float | None,
                label: str = "project", profile: bool = False) -> Rate:
    """`thinkdiff train`'s step (`train_step`: accelerate autocast, the loss over real target tokens,
    AdamW, the LR schedule) on bucketed batches, handed over pinned and copied asynchronously as the
    loop's prefetch thread hands them over. The loop makes the CPU wait for the GPU only when it
    logs, so the timed steps run back to back with one sync at each end. The aligner starts from
    `aligner_state`, so the first step's loss can be compared with `reference_loss`, the naive
    path's on the same first batch (the kernels of a GPU are not the CPU's that the tests check)."""
    train_cfg = load_config("paper-lvlm").train
    accelerator = make_accelerator(train_cfg)
    aligner = Aligner(AlignerConfig(in_dim=batches[0][2].shape[-1], out_dim=decoder.d_model)).to(device)
    aligner.load_state_dict(aligner_state)
    optimizer = torch.optim.AdamW(param_groups(aligner, train_cfg.weight_decay), lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(train_cfg))
    model, optimizer = accelerator.prepare(aligner, optimizer)
    t5 = T5Parts(decoder_lm=decoder, tokenizer=None, encoder_final_norm=None, encoder=None, model_id="random",
                 revision="random")
    on_gpu = device.type == "cuda"
    size = len(batches[0][0])
    began = time.monotonic()
    # The loop's own padding, from the bf16 store bytes of the paper preset into page-locked memory
    # on a GPU, as its prefetch thread does it.
    stored = lambda f: StoredFeatures.encode(f, "bfloat16")  # noqa: E731
    ready = [pad([Prepared(features=stored(f[:s]), source_rows=s, target_ids=lab.tolist())
                  for s, f, lab in zip(src, feats, labels, strict=True)],
                 decoder.config.pad_token_id, pin_memory=on_gpu) for src, _, feats, labels in batches]
    step = lambda b: train_step(model, t5, b.to(device, non_blocking=on_gpu), optimizer, scheduler, accelerator)  # noqa: E731
    # Warm-up: one untimed pass over the very batches timed below. The compiled blocks need a few
    # graphs, not one per shape: on CUDA, inductor guards on whether the target and source lengths
    # keep SDPA's attention bias 8-aligned (else it copies the bias into an aligned buffer), so
    # lengths on each side make their own variant. A training run compiles them once in its first
    # steps; a warm-up of a few steps may miss one.
    before_warmup, started = snapshot(), time.perf_counter()
    first_loss = torch.stack([step(b) for b in ready])[0].item()
    warmup_s = time.perf_counter() - started
    agreement = "" if reference_loss is None else (
        f"; first step's loss {first_loss:.5f}, the naive path's {reference_loss:.5f} (relative difference "
        f"{abs(first_loss - reference_loss) / reference_loss:.1e})")
    print(f"{label} batch {size}: warm-up pass {warmup_s:.1f} s, "
          f"graphs compiled: {graphs_since(before_warmup)}{agreement}", flush=True)
    syncs = host_syncs(lambda: step(ready[0])) if on_gpu else "-"
    reset_peak(device)
    aligner_params = sum(p.numel() for p in aligner.parameters())
    warm = snapshot()
    started = sync(device)
    losses = torch.stack([step(b) for b in ready])
    finite = bool(losses.isfinite().all())  # also the wait for the last step
    seconds = sync(device) - started
    flops = sum(step_flops(decoder.config, aligner_params, src, tgt) for src, tgt, _, _ in batches)
    print(f"{label} batch {size}: compile counters changed over the timed steps: {changed_since(warm)}; "
          f"FLOPs on padding {100 * padding_share(decoder.config, aligner_params, batches):.1f}%, host syncs in one "
          f"step: {syncs}, all losses finite: {finite}", flush=True)
    # Measuring a larger batch repeats all of this but the compile: its warm-up pass takes about
    # what its timed pass does (the compiled blocks take any length and batch).
    again = time.monotonic() - began - warmup_s + seconds
    rate = Rate(str(size), sum(len(b[0]) for b in batches) / seconds, flops / seconds / 1e12, peak_gib(device),
                seconds=again)
    if profile:
        # Every 4th batch of the pool: every length bucket, at a quarter of the profiler's cost in
        # time and events.
        print_profile(lambda: [step(b) for b in ready[::4]], device)
    return rate


def print_profile(fn, device: torch.device) -> None:
    """Where the time of `fn` (steps over batches of every length bucket) goes: the
    kernels (operators on a CPU) taking the most time, self time only, so the rows add up to the
    steps; the attention's share of that time; on a GPU also the share of the wall time some
    kernel ran (the rest is the GPU waiting)."""
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    started = sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        wall = sync(device) - started
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=25,
                         max_name_column_width=70), flush=True)
    # The kernels themselves (on a GPU the operators that launch them carry their time too).
    kernels = [(e.key, e.self_device_time_total if on_gpu else e.self_cpu_time_total) for e in averages
               if e.device_type == (DeviceType.CUDA if on_gpu else DeviceType.CPU)]
    total = sum(t for _, t in kernels)
    if total == 0:  # a profiler that attributes no time to kernels: the table above is all there is
        print("no kernel time recorded", flush=True)
        return
    attention = sum(t for name, t in kernels if ATTENTION_KERNEL.search(name))
    print(f"attention (forward and backward): {attention / total:.0%} of the {'kernel' if on_gpu else 'operator'} time",
          flush=True)
    if on_gpu:
        print(f"profiled pass: kernels {total / 1e6:.2f} s in {wall:.2f} s of wall time "
              f"(GPU busy {total / 1e6 / wall:.0%}, profiler overhead included)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--naive-batches", type=int, nargs="+", default=None,
                        help="the naive path's batches, searched in turn (default 32 doubling to 1024; tiny 4 8)")
    parser.add_argument("--project-batches", type=int, nargs="+", default=None,
                        help="the project path's batches, searched in turn, one compiled decoder for all "
                             "(default 32 doubling to 1024; tiny 4 8 16)")
    parser.add_argument("--steps", type=int, default=None,
                        help="the project path's batches per batch size: one bucketing pool, timed after an "
                             "untimed pass (default 16, a quarter of paper-lvlm's train.bucket_window, so a "
                             "search fits its time box: a little more padding than a run's; tiny 3)")
    parser.add_argument("--naive-steps", type=int, default=None,
                        help=f"the naive path's timed steps per batch size, after {WARMUP_STEPS} untimed "
                             f"(default 8; tiny 2)")
    parser.add_argument("--flex", action="store_true",
                        help="then the project path at its best batch on FlexAttention "
                             "(train.decoder_attention=flex; CUDA only)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a pass over every 4th batch of the project path's best batch size")
    parser.add_argument("--time-box", type=float, default=None,
                        help="seconds this run may take: no batch is started that would likely end later")
    args = parser.parse_args()
    set_time_box(args.time_box)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    naive_sizes = args.naive_batches or ([4, 8] if args.tiny else ladder(32, 1024))
    project_sizes = args.project_batches or ([4, 8, 16] if args.tiny else ladder(32, 1024))
    steps = args.steps or (3 if args.tiny else 16)
    naive_steps = args.naive_steps or (2 if args.tiny else 8)
    peak = matmul_peak(device)
    torch.manual_seed(0)
    if args.tiny:
        d_in, full = 64, build_tiny_t5()
    else:
        d_in = 3584
        torch.set_default_dtype(dtype)  # build the 11B model directly in bf16 on the GPU
        with torch.device(device):
            full = T5ForConditionalGeneration(T5Config(**XXL))
        torch.set_default_dtype(torch.float32)
    full.to(device).eval().requires_grad_(False)
    vocab = full.config.vocab_size
    initial = Aligner(AlignerConfig(in_dim=d_in, out_dim=full.config.d_model)).state_dict()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"d_model {full.config.d_model}, decoder layers {full.config.num_decoder_layers}, attention "
          f"{full.config._attn_implementation}; naive batches {naive_sizes} ({naive_steps} timed steps each), "
          f"project batches {project_sizes} ({steps}-batch pools)", flush=True)
    # Under a time box on a GPU, each search leaves time for what comes after it: the project's
    # search, and the FlexAttention run, which recompiles the decoder (the tiny runs need none).
    on_gpu = device.type == "cuda"
    leave = FLEX_S if args.flex and on_gpu else 0.0
    naive = search("naive", lambda b: naive_run(full, initial, make_batches(WARMUP_STEPS + naive_steps, b, d_in, vocab),
                                                device, dtype),
                   naive_sizes, device, peak, "samples/s", leave=leave + (PROJECT_S if on_gpu else 0.0))
    # The first project pool's first batch through transformers' own path from the initial aligner,
    # before T5DecoderLM sets the decoder's attention to its own.
    pools = {project_sizes[0]: bucketed(make_batches(steps, project_sizes[0], d_in, vocab, seed=1))}
    aligner = Aligner(AlignerConfig(in_dim=d_in, out_dim=full.config.d_model)).to(device)
    aligner.load_state_dict(initial)
    with torch.no_grad():
        first = pools[project_sizes[0]][0]
        reference = naive_loss(full, aligner, naive_inputs([first], device, dtype)[0], device, dtype).item()
    del aligner
    decoder = T5DecoderLM(full)
    del full.encoder  # the project path never holds the encoder (load_t5 never reads it)
    free_memory(device)
    if on_gpu:
        torch._logging.set_logs(recompiles=True)  # why each graph after the first was compiled
        decoder.compile_decoder()

    def project(size: int, label: str = "project", profile: bool = False) -> Rate:
        pool = pools.pop(size, None) or bucketed(make_batches(steps, size, d_in, vocab, seed=size))
        return project_run(decoder, pool, device, initial, reference if size == project_sizes[0] else None,
                           label, profile)

    projects = search("project", project, project_sizes, device, peak, "samples/s", leave=leave)
    best_size = max(projects, key=lambda b: projects[b].per_s)
    print_summary("samples/s", naive, projects, peak)
    if args.flex:
        flex_line(decoder, device, peak, lambda: project(best_size, "project (flex)"), projects[best_size])
    if args.profile:
        # After the flex run the decoder compiles again: on a GPU, worth it only with time to spare.
        if time_left() > 2 * projects[best_size].seconds + (PROJECT_COMPILE_S if args.flex and on_gpu else 0):
            project(best_size, "project (profiled)", profile=True)
        else:
            print(f"project (profiled): not run, {time_left():.0f} s left in the time box", flush=True)


def flex_line(decoder: T5DecoderLM, device: torch.device, peak: Peak, measure, sdpa: Rate) -> None:
    """The project path at its best batch on FlexAttention, against the same batch on SDPA."""
    if device.type != "cuda":
        print("project (flex): not timed, FlexAttention has no backward on a CPU", flush=True)
        return
    if time_left() < sdpa.seconds + PROJECT_COMPILE_S:
        print(f"project (flex) batch {sdpa.batch}: not run, {time_left():.0f} s left in the time box", flush=True)
        return
    torch._dynamo.reset()  # the blocks trace again, now with the flex attention
    decoder.set_attention("flex")
    try:
        flex = measure()
    except (torch.OutOfMemoryError, RuntimeError) as error:  # a failing candidate must not hide the lines above
        print(f"project (flex) batch {sdpa.batch}: failed: {str(error).splitlines()[0][:120]}", flush=True)
        return
    finally:
        torch._dynamo.reset()
        decoder.set_attention("sdpa")
    print(rate_line("project (flex)", flex, peak, "samples/s"), flush=True)
    print(f"flex / sdpa at batch {sdpa.batch}: {flex.per_s / sdpa.per_s:.3g}x", flush=True)


if __name__ == "__main__":
    main()
