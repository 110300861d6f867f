"""Feature extraction throughput: HF generate and a teacher-forced states pass, as a competent user
would run them, vs the features stage's path, each at its own best batch, same run.

    .venv/bin/python benchmarks/extract_features.py            # Qwen2-VL-7B shapes, 448 px, 128 tokens: a GPU
    .venv/bin/python benchmarks/extract_features.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: one 448x448 image (256 visual tokens) and one of the preset's 16 instructions per
sample (the stage's seeded choice), random weights, 128 sampled tokens per image (temperature 0.6,
top_p 0.9). The tokenizer is the offline byte-level one with merges learned from the preset's
system prompt, instructions and chat roles, so a prompt has about as many tokens as with Qwen's
own BPE (about 290: 256 visual, the rest text).
- naive: transformers' defaults (SDPA attention for the text and the vision tower, none of the
  project's kernels): `model.generate()` (dynamic KV cache, eager, EOS ignored), then one full
  teacher-forced forward over image + prompt + generated ids for the states (`final_norm_states`).
  Its inputs are preprocessed and on the device before the timer (a batch of distinct images,
  repeated to the batch size), so its rate leaves out the preprocessing that the project's
  includes; the preprocessing's ms/image is printed apart. Generate and the states pass each run
  at their own best batch; the naive path's images/s adds their times per image.
- project: the features stage's own loop (`extract_records` with the paper preset): the next
  batch's images preprocessed on threads while the GPU works, and `decode_with_states`: a reused
  static KV cache, the decode step compiled to a CUDA graph, each step's final-norm state kept as
  it decodes (no states pass). Its batches stop at EOS like the stage's (random weights at Qwen's
  vocabulary practically never sample it; tokens per image are printed).
Each path (and each of the naive path's two parts) runs at batches doubling from its start
(`timing.search`: until the card runs out of memory, a larger batch is no faster, the list ends or
the time box would), after a warm-up batch; the summary gives the ratio at the largest batch all
ran and best vs best. Useful TFLOP/s: one image's FLOPs of image encoding, prefill and decoding,
counted by PyTorch's FlopCounterMode on naive generate at batch 1 (no padding; the states pass is
not useful work, the project needs none), times images/s; the states pass's own rows count its
own FLOPs.
`--cobsat-shots` then times the VLM's part of a CoBSAT evaluation (what sizes the nightly
evaluation): `vlm_answers`, the call `thinkdiff cobsat eval` makes, on CoBSAT's own prompts (task 1,
2 or 4 demo images rendered at the same size) in batches of eval.batch_size, preprocessing
included, eval.gen_tokens tokens each, EOS ignored; `--cobsat-only` times that alone.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from compile_counters import changed_since, snapshot
from PIL import Image
from timing import (
    Rate,
    best,
    count_flops,
    free_memory,
    host_syncs,
    ladder,
    matmul_peak,
    peak_gib,
    print_summary,
    search,
    set_time_box,
    sync,
)
from transformers import GenerationConfig, LogitsProcessorList, TopPLogitsWarper

from thinkdiff.config import RunConfig, load_config
from thinkdiff.data import extract
from thinkdiff.data.corpus import CorpusImage
from thinkdiff.data.extract import extract_records, pick_instruction
from thinkdiff.eval.cobsat import build_prompts, get_task
from thinkdiff.eval.dataset import CobsatDataset, make_synthetic_dataset
from thinkdiff.generate import cobsat_parts, vlm_answers
from thinkdiff.models.attention import PACKED_GQA_SDPA, PER_IMAGE_SDPA
from thinkdiff.models.decode import EOS_CHECK_EVERY, token_scores
from thinkdiff.models.tiny import TINY_TEXT, TINY_VISION, build_random_vlm
from thinkdiff.models.vlm import VLM, encode_chat, final_norm_states

QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                         "rope_theta": 1000000.0})
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
# Seconds kept, under a time box on a GPU, for what follows a search (guesses for an H200 at the
# default shapes): the states pass's search, the project's first batch size (its decode step's
# compile, a warm-up batch and a timed one), the phases.
STATES_S, PROJECT_S, PHASES_S = 25, 100, 20


def images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def naive_inputs(cfg: RunConfig, vlm: VLM, items: list[CorpusImage]) -> tuple[dict[str, torch.Tensor], float]:
    """The naive path's batch, encoded as the stage encodes it (same system prompt, per-image
    instruction) and on the device; and the seconds that took."""
    f = cfg.features
    started = sync(vlm.device)
    conversations = [[item.image, pick_instruction(f.instructions, f.seed, item.key)] for item in items]
    batch = encode_chat(vlm, conversations, f.system_prompt)
    return batch, sync(vlm.device) - started


def repeated(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """`batch` repeated to `size` rows on the device (the images' patches in the same order as the
    rows): large batches without preprocessing thousands of images."""
    times = -(-size // len(batch["input_ids"]))
    rows = {k: v.repeat(times, 1)[:size] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    patches = len(batch["pixel_values"]) // len(batch["input_ids"])  # one image per row, all one size
    rows["pixel_values"] = batch["pixel_values"].repeat(times, 1)[:size * patches]
    rows["image_grid_thw"] = batch["image_grid_thw"].repeat(times, 1)[:size]
    return rows


def generation_config(cfg: RunConfig, vlm: VLM, tokens: int) -> GenerationConfig:
    f = cfg.features
    return GenerationConfig(do_sample=True, temperature=f.temperature, top_p=f.top_p, top_k=0, max_new_tokens=tokens,
                            eos_token_id=[], pad_token_id=vlm.pad_token_id, suppress_tokens=vlm.vision_token_ids)


def naive_generate(cfg: RunConfig, vlm: VLM, batch: dict[str, torch.Tensor], tokens: int,
                   n_batches: int) -> float:
    """Seconds per image of plain HF generate (dynamic cache, eager, EOS ignored) over `n_batches`
    calls on `batch`, after a warm-up call of 4 tokens (the prefill at this batch, the allocator)."""
    with torch.no_grad():
        vlm.model.generate(**batch, generation_config=generation_config(cfg, vlm, min(4, tokens)))
        started = sync(vlm.device)
        for k in range(n_batches):
            torch.manual_seed(k)
            vlm.model.generate(**batch, generation_config=generation_config(cfg, vlm, tokens))
        return (sync(vlm.device) - started) / (n_batches * len(batch["input_ids"]))


def naive_states(vlm: VLM, batch: dict[str, torch.Tensor], tokens: int, n_batches: int) -> float:
    """Seconds per image of the teacher-forced states pass over `tokens` generated ids (random ids:
    the pass's cost does not depend on them), copied to the CPU, after one untimed pass."""
    size = len(batch["input_ids"])
    generated = torch.randint(0, 256, (size, tokens), device=vlm.device)  # byte tokens: no vision placeholder
    final_norm_states(vlm, batch, generated, [tokens] * size)
    started = sync(vlm.device)
    for _ in range(n_batches):
        final_norm_states(vlm, batch, generated, [tokens] * size)
    return (sync(vlm.device) - started) / (n_batches * size)


def project_run(cfg: RunConfig, vlm: VLM, batches: list[list[CorpusImage]]) -> dict[str, float]:
    """The features stage's own loop (`extract_records`): preprocessing of the next batch overlaps
    the model's work on the current one, so only the total is timed."""
    t0 = sync(vlm.device)
    records = extract_records(cfg, vlm, iter(batches), seed_key="benchmark")
    t1 = sync(vlm.device)
    n = sum(len(b) for b in batches)
    return {"images_per_s": n / (t1 - t0), "ms_per_image": 1000 * (t1 - t0) / n,
            "tokens_per_image": sum(len(r.token_ids) for r in records) / n}


def project_phases(cfg: RunConfig, vlm: VLM, items: list[CorpusImage]) -> dict[str, float]:
    """One more batch through the features stage's own pieces, with a sync between them, in ms per
    image: prep (`_prepare_lvlm` on the preprocessing threads, not overlapped here, and the copy of
    its inputs to the GPU), the vision tower alone, the prefill alone (one more forward over the
    prompts), generate (`_lvlm_records`: prefill + decode steps, states included), and the share of
    the decode steps that is sampling, timed apart on random (batch, vocabulary) logits: the
    stage's processors (compiled, top-p by threshold; on a CPU, eager with transformers' sort) and,
    for comparison, with transformers' sort-based `TopPLogitsWarper` in its place."""
    f, device, n = cfg.features, vlm.device, len(items)
    t0 = sync(device)
    with ThreadPoolExecutor(f.preprocess_workers) as pool:
        prepared = extract._prepare_lvlm(cfg, vlm, items, pool)
    inputs = {k: v.to(device) for k, v in prepared.inputs.items()}
    t1 = sync(device)
    with torch.no_grad():
        vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        t2 = sync(device)
        vlm.model(**inputs, logits_to_keep=1)
    t3 = sync(device)
    generate = lambda: extract._lvlm_records(cfg, vlm, prepared, seed=0)  # noqa: E731
    syncs = host_syncs(generate) if device.type == "cuda" else generate()
    t4 = sync(device)
    ms = lambda seconds: 1000 * seconds / n  # noqa: E731
    stage = token_scores(vlm, f.temperature, f.top_p, compile=f.compile and device.type == "cuda")
    sorted_top_p = LogitsProcessorList([*stage[:-1], TopPLogitsWarper(f.top_p)])
    logits_BV = torch.randn(n, vlm.model.config.text_config.vocab_size, device=device)
    print(f"host syncs in one batch's generate (CUDA): {syncs if device.type == 'cuda' else '-'} "
          f"(the decode loop: one per {EOS_CHECK_EVERY} steps while rows may end, and the copies out)")
    return {"prep": ms(t1 - t0), "vision tower": ms(t2 - t1), "prefill (vision included)": ms(t3 - t2),
            "generate": ms(t4 - t3),
            f"of which sampling ({f.max_new_tokens} steps)": ms(sampling_seconds(stage, logits_BV) * f.max_new_tokens),
            "sampling with the sort-based top-p instead":
                ms(sampling_seconds(sorted_top_p, logits_BV) * f.max_new_tokens)}


def cobsat_run(cfg: RunConfig, vlm: VLM, dataset: CobsatDataset, shot: int, n_batches: int) -> dict[str, float]:
    """Seconds per prompt of the VLM's part of a CoBSAT evaluation at `shot` demo images: one
    warm-up batch (on a GPU, the compile for this prompt length), then `n_batches` timed."""
    b = cfg.eval.batch_size
    conversations = [cobsat_parts(p, dataset) for p in build_prompts(get_task(1), shot, limit=(n_batches + 1) * b)]
    vlm_answers(vlm, cfg, conversations[:b], seed=0, ban_eos=True)
    started = sync(vlm.device)
    for k in range(1, n_batches + 1):
        vlm_answers(vlm, cfg, conversations[k * b:(k + 1) * b], seed=k, ban_eos=True)
    seconds = sync(vlm.device) - started
    first = encode_chat(vlm, conversations[:1], cfg.features.system_prompt, device=torch.device("cpu"))
    return {"s_per_prompt": seconds / (n_batches * b), "prompt_tokens": first["input_ids"].shape[1]}


def sampling_seconds(processors: LogitsProcessorList, logits_BV: torch.Tensor, repeats: int = 8) -> float:
    """Seconds per decode step of the sampling alone: processors, softmax, multinomial."""
    torch.multinomial(torch.softmax(processors(None, logits_BV), dim=-1), num_samples=1)  # warm-up (a compile)
    started = sync(logits_BV.device)
    for _ in range(repeats):
        torch.multinomial(torch.softmax(processors(None, logits_BV), dim=-1), num_samples=1)
    return (sync(logits_BV.device) - started) / repeats


def corpus_batches(n_batches: int, batch: int, side: int, seed: int) -> list[list[CorpusImage]]:
    pics = images(n_batches * batch, side, seed)
    items = [CorpusImage(key=f"{seed}-{i:06d}", image=im) for i, im in enumerate(pics)]
    return [items[k * batch: (k + 1) * batch] for k in range(n_batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--naive-batches", type=int, nargs="+", default=None,
                        help="batches searched for naive generate and, apart, for its states pass "
                             "(default 32 doubling to 1024; tiny 2 4 8)")
    parser.add_argument("--project-batches", type=int, nargs="+", default=None,
                        help="the project path's batches, searched in turn (default 256 512; tiny 2 4 8)")
    parser.add_argument("--distinct", type=int, default=None,
                        help="distinct images of the naive path's batches, repeated to each batch size (default 32; "
                             "tiny 2)")
    parser.add_argument("--tokens", type=int, default=None, help="generated tokens per image (default 128; tiny 16)")
    parser.add_argument("--batches", type=int, default=1, help="timed batches per batch size, after a warm-up")
    parser.add_argument("--cobsat-shots", type=int, nargs="*", default=[], choices=(2, 4),
                        help="then time the VLM's part of a CoBSAT evaluation at these shots "
                             "(eval.batch_size prompts a batch)")
    parser.add_argument("--cobsat-only", action="store_true", help="time only the --cobsat-shots figures")
    parser.add_argument("--time-box", type=float, default=None,
                        help="seconds this run may take: no batch is started that would likely end later")
    args = parser.parse_args()
    set_time_box(args.time_box)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    naive_sizes = args.naive_batches or ([2, 4, 8] if tiny else ladder(32, 1024))
    project_sizes = args.project_batches or ([2, 4, 8] if tiny else [256, 512])
    distinct = args.distinct or (2 if tiny else 32)
    tokens = args.tokens or (16 if tiny else 128)
    side = 112 if tiny else 448
    pixels = dict(min_pixels=56 * 56, max_pixels=side * side)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    peak = None if args.cobsat_only else matmul_peak(device)
    torch.set_default_dtype(dtype)
    paper = load_config("paper-lvlm").features
    prompt_texts = [*paper.instructions, paper.system_prompt, "system\n", "user\n", "assistant\n"]
    with torch.device(device):
        vlm = (build_random_vlm(TINY_TEXT, TINY_VISION, **pixels, tokenizer_corpus=prompt_texts) if tiny
               else build_random_vlm(QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION, **pixels, model_id="random-qwen2-vl-7b",
                                     tokenizer_corpus=prompt_texts))
    torch.set_default_dtype(torch.float32)
    compile = device.type == "cuda"
    params = sum(p.numel() for p in vlm.model.parameters()) / 1e9

    def stage_config(batch: int) -> RunConfig:
        return load_config("tiny" if tiny else "paper-lvlm", [
            f"features.batch_size={batch}", f"features.max_new_tokens={tokens}", f"features.compile={compile}",
            f"features.min_pixels={pixels['min_pixels']}", f"features.max_pixels={pixels['max_pixels']}",
            f"features.preprocess_workers={2 if tiny else 8}", f"eval.gen_tokens={tokens}"])

    cfg = stage_config(project_sizes[0])
    prompt = encode_chat(vlm, [[corpus_batches(1, 1, side, seed=0)[0][0].image, cfg.features.instructions[0]]],
                         cfg.features.system_prompt, device=torch.device("cpu"))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{params:.2f}B params, {side} px images, {prompt['input_ids'].shape[1]}-token prompts "
          f"(shortest instruction), {tokens} tokens, compile {compile}", flush=True)
    if not args.cobsat_only:
        fair_figures(args, cfg, vlm, stage_config, peak, naive_sizes, project_sizes, distinct, tokens, side)
    if args.cobsat_shots:
        with tempfile.TemporaryDirectory() as root:
            dataset = make_synthetic_dataset(root, size=side)
            for shot in args.cobsat_shots:
                run = cobsat_run(cfg, vlm, dataset, shot, max(args.batches, 2))
                print(f"CoBSAT's VLM part (vlm_answers) at eval.batch_size {cfg.eval.batch_size}, {shot} shots "
                      f"({run['prompt_tokens']}-token prompts): {run['s_per_prompt']:.3f} s/prompt", flush=True)


def fair_figures(args, cfg: RunConfig, vlm: VLM, stage_config, peak, naive_sizes: list[int],
                 project_sizes: list[int], distinct: int, tokens: int, side: int) -> None:
    """The naive path's two searches on transformers' default attention, then the project's on its
    own kernels; the summary, and the project's phases at its best batch."""
    device = vlm.device
    vlm.model.set_attn_implementation("sdpa")  # transformers' default, for the text model and the vision tower
    base, prep_s = naive_inputs(cfg, vlm, corpus_batches(1, distinct, side, seed=0)[0])
    one = repeated(base, 1)
    with torch.no_grad():
        useful = count_flops(lambda: vlm.model.generate(**one, generation_config=generation_config(cfg, vlm, tokens)))
    states_flops = count_flops(lambda: final_norm_states(vlm, one, torch.randint(0, 256, (1, tokens), device=device),
                                                         [tokens]))
    print(f"naive: preprocessing {1000 * prep_s / distinct:.1f} ms/image before the timer; FLOPs per image: "
          f"generate {useful / 1e12:.4g} T (the useful work), states pass {states_flops / 1e12:.4g} T", flush=True)

    def rate(batch: int, s_per_image: float, flops: float) -> Rate:
        return Rate(str(batch), 1 / s_per_image, flops / s_per_image / 1e12, peak_gib(device))

    # Under a time box on a GPU, each search leaves time for the ones after it (the tiny runs need none).
    on_gpu = device.type == "cuda"
    generate = search("naive generate", lambda b: rate(b, naive_generate(cfg, vlm, repeated(base, b), tokens,
                                                                         args.batches), useful),
                      naive_sizes, device, peak, "images/s", leave=STATES_S + PROJECT_S + PHASES_S if on_gpu else 0)
    states = search("naive states pass", lambda b: rate(b, naive_states(vlm, repeated(base, b), tokens, args.batches),
                                                        states_flops),
                    naive_sizes, device, peak, "images/s", leave=PROJECT_S + PHASES_S if on_gpu else 0)
    free_memory(device)
    vlm.model.set_attn_implementation({"text_config": PACKED_GQA_SDPA, "vision_config": PER_IMAGE_SDPA})

    def combined(g: Rate, s: Rate, label: str) -> Rate:
        per_s = 1 / (1 / g.per_s + 1 / s.per_s)  # seconds per image add up
        return Rate(label, per_s, useful * per_s / 1e12, max(g.peak_gib, s.peak_gib))

    naive = {b: combined(generate[b], states[b], str(b)) for b in generate if b in states}
    g, s = best(generate), best(states)
    naive_best = combined(g, s, f"generate {g.batch} + states {s.batch}")

    def project(batch: int) -> Rate:
        cold = snapshot()
        project_run(stage_config(batch), vlm, corpus_batches(1, batch, side, seed=99))  # warm-up: the compile
        warm = snapshot()
        run = project_run(stage_config(batch), vlm, corpus_batches(args.batches, batch, side, seed=0))
        print(f"project batch {batch}: compile counters changed over the warm-up batch: {changed_since(cold)}, over "
              f"the timed batches: {changed_since(warm)}; {run['tokens_per_image']:.0f} tokens/image", flush=True)
        return Rate(str(batch), run["images_per_s"], useful * run["images_per_s"] / 1e12, peak_gib(device))

    projects = search("project", project, project_sizes, device, peak, "images/s", leave=PHASES_S if on_gpu else 0)
    print_summary("images/s", naive, projects, peak, naive_best=naive_best)
    top = max(projects, key=lambda b: projects[b].per_s)
    phases = project_phases(stage_config(top), vlm, corpus_batches(1, top, side, seed=0)[0])
    print(f"project phases at batch {top}, ms/image (one more batch, synced): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + " (generate = prefill + decode steps)", flush=True)


if __name__ == "__main__":
    main()
