"""Feature extraction throughput: the naive HF path vs the features stage's path, same run.

    .venv/bin/python benchmarks/extract_features.py            # Qwen2-VL-7B shapes, 448 px, 128 tokens: a GPU
    .venv/bin/python benchmarks/extract_features.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: one 448x448 image (256 visual tokens) and one of the preset's 16 instructions per
sample (the stage's seeded choice, same images for both paths), random weights, 128 sampled
tokens per image (temperature 0.6, top_p 0.9). The tokenizer is the offline byte-level one with
merges learned from the preset's system prompt, instructions and chat roles, so a prompt has
about as many tokens as with Qwen's own BPE (about 290: 256 visual, the rest text).
- naive: `model.generate()` with transformers' defaults (dynamic KV cache, eager) at batch 32, EOS
  ignored, then one full teacher-forced forward over image + prompt + generated ids for the states.
- project: the features stage's own loop (`extract_records` with the paper preset): a larger
  batch, the next batch's images preprocessed on threads while the GPU works, and
  `decode_with_states`: a reused static KV cache, the decode step compiled to a CUDA graph, each
  step's final-norm state kept as it decodes (no states pass). Its batches stop at EOS like the
  stage's (random weights at Qwen's vocabulary practically never sample it; the table shows
  tokens per image).
Images/s counts the whole stage (image preprocessing + generation + states); the generation-only
rate of the naive path is the baseline that benchmarks/README.md compares against.
`--cobsat-shots` first times the VLM's part of a CoBSAT evaluation (what sizes the nightly
evaluation): `vlm_answers`, the call `thinkdiff cobsat eval` makes, on CoBSAT's own prompts (task 1,
2 or 4 demo images rendered at the same size) in batches of eval.batch_size, preprocessing
included, eval.gen_tokens tokens each, EOS ignored.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from compile_counters import changed_since, snapshot
from PIL import Image
from timing import host_syncs, sync
from transformers import GenerationConfig, LogitsProcessorList, TopPLogitsWarper

from thinkdiff.config import RunConfig, load_config
from thinkdiff.data import extract
from thinkdiff.data.corpus import CorpusImage
from thinkdiff.data.extract import extract_records, pick_instruction
from thinkdiff.eval.cobsat import build_prompts, get_task
from thinkdiff.eval.dataset import CobsatDataset, make_synthetic_dataset
from thinkdiff.generate import cobsat_parts, vlm_answers
from thinkdiff.models.decode import EOS_CHECK_EVERY, token_scores
from thinkdiff.models.tiny import TINY_TEXT, TINY_VISION, build_random_vlm
from thinkdiff.models.vlm import VLM, encode_chat, final_norm_states

QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                         "rope_theta": 1000000.0})
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)


def images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def naive_batch(cfg: RunConfig, vlm: VLM, items: list[CorpusImage], tokens: int, seed: int) -> dict[str, float]:
    """Plain HF generate (dynamic cache, eager, EOS ignored), then a full teacher-forced pass; the
    same system prompt and per-image instruction as the stage."""
    f, device = cfg.features, vlm.device
    t0 = sync(device)
    conversations = [[item.image, pick_instruction(f.instructions, f.seed, item.key)] for item in items]
    batch = encode_chat(vlm, conversations, f.system_prompt)
    t1 = sync(device)
    config = GenerationConfig(do_sample=True, temperature=f.temperature, top_p=f.top_p, top_k=0, max_new_tokens=tokens,
                              eos_token_id=[], pad_token_id=vlm.pad_token_id, suppress_tokens=vlm.vision_token_ids)
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = vlm.model.generate(**batch, generation_config=config)
    t2 = sync(device)
    generated = sequences[:, batch["input_ids"].shape[1]:]
    final_norm_states(vlm, batch, generated, [generated.shape[1]] * len(items))
    t3 = sync(device)
    return {"prep_s": t1 - t0, "gen_s": t2 - t1, "states_s": t3 - t2}


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


def measure_naive(cfg: RunConfig, vlm: VLM, batch: int, n_batches: int, side: int, tokens: int) -> dict:
    naive_batch(cfg, vlm, corpus_batches(1, batch, side, seed=99)[0], tokens, seed=99)  # warm-up: allocator, kernels
    rows = [naive_batch(cfg, vlm, items, tokens, seed=k)
            for k, items in enumerate(corpus_batches(n_batches, batch, side, seed=0))]
    total = {k: sum(r[k] for r in rows) for k in rows[0]}
    n = batch * n_batches
    result = {"images_per_s": n / sum(total.values()), "gen_only_images_per_s": n / total["gen_s"]}
    result.update({k.removesuffix("_s") + "_ms_per_image": 1000 * v / n for k, v in total.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--naive-batch", type=int, default=None, help="default 32 (tiny 4)")
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="the project path's batches: the first gets the ratio and the phases "
                             "(default 256; tiny 8)")
    parser.add_argument("--tokens", type=int, default=None, help="generated tokens per image (default 128; tiny 16)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per path, after one warm-up batch")
    parser.add_argument("--cobsat-shots", type=int, nargs="*", default=[], choices=(2, 4),
                        help="also time the VLM's part of a CoBSAT evaluation at these shots "
                             "(eval.batch_size prompts a batch)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    naive_bs, batches = args.naive_batch or (4 if tiny else 32), args.batch or [8 if tiny else 256]
    tokens = args.tokens or (16 if tiny else 128)
    side = 112 if tiny else 448
    pixels = dict(min_pixels=56 * 56, max_pixels=side * side)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
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

    cfg = stage_config(batches[0])
    prompt = encode_chat(vlm, [[corpus_batches(1, 1, side, seed=0)[0][0].image, cfg.features.instructions[0]]],
                         cfg.features.system_prompt, device=torch.device("cpu"))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{params:.2f}B params, {side} px images, {prompt['input_ids'].shape[1]}-token prompts "
          f"(shortest instruction), {tokens} tokens, compile {compile}")
    # First: of what this script measures, only this figure is still open (the nightly sizing).
    if args.cobsat_shots:
        with tempfile.TemporaryDirectory() as root:
            dataset = make_synthetic_dataset(root, size=side)
            for shot in args.cobsat_shots:
                run = cobsat_run(cfg, vlm, dataset, shot, args.batches)
                print(f"CoBSAT's VLM part (vlm_answers) at eval.batch_size {cfg.eval.batch_size}, {shot} shots "
                      f"({run['prompt_tokens']}-token prompts): {run['s_per_prompt']:.3f} s/prompt", flush=True)
    naive = measure_naive(cfg, vlm, naive_bs, args.batches, side, tokens)
    print(f"naive done: {naive['images_per_s']:.2f} images/s "
          f"(generate only {naive['gen_only_images_per_s']:.2f})", flush=True)
    projects, phases = {}, {}
    for bs in batches:
        cold = snapshot()
        # warm-up: allocator, kernels, the compile
        project_run(stage_config(bs), vlm, corpus_batches(1, bs, side, seed=99))
        warm = snapshot()
        print(f"batch {bs}: compile counters changed over the warm-up batch: {changed_since(cold)}")
        projects[bs] = project_run(stage_config(bs), vlm, corpus_batches(args.batches, bs, side, seed=0))
        projects[bs]["ratio"] = projects[bs]["images_per_s"] / naive["gen_only_images_per_s"]
        print(f"batch {bs}: compile counters changed over the timed batches: {changed_since(warm)}")
        print(f"project batch {bs}: {projects[bs]['images_per_s']:.2f} images/s, "
              f"{projects[bs]['ratio']:.2f}x naive generate-only", flush=True)
        if bs == batches[0]:  # a timed batch again: same shapes
            phases = project_phases(cfg, vlm, corpus_batches(1, bs, side, seed=0)[0])
    print("| path | batch | images/s (whole stage) | generate-only images/s | ms/image: prep | generate | states |")
    print("|---|---|---|---|---|---|---|")
    print(f"| naive | {naive_bs} | {naive['images_per_s']:.2f} | {naive['gen_only_images_per_s']:.2f} | "
          f"{naive['prep_ms_per_image']:.1f} | {naive['gen_ms_per_image']:.1f} | {naive['states_ms_per_image']:.1f} |")
    for bs, project in projects.items():
        print(f"| project | {bs} | {project['images_per_s']:.2f} | - | overlapped | {project['ms_per_image']:.1f} "
              f"(all, {project['tokens_per_image']:.0f} tokens/image) | kept while decoding |")
    print(f"ratio project (whole stage, batch {batches[0]}) / naive generate-only: "
          f"{projects[batches[0]]['ratio']:.2f}x (target 5x)")
    print(f"project phases at batch {batches[0]}, ms/image (one more batch, synced): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + " (generate = prefill + decode steps)", flush=True)


if __name__ == "__main__":
    main()
