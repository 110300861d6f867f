"""VLM decoding cost per prompt: plain text bridge vs TBDN's query-contrastive decoding, two ways.

Query-contrastive decoding as the project does it (the query-less rows with their own KV cache) and
as TBDN's code does it (the query-less prompt run again from its start every step), against the
plain text bridge: same run, same prompts, same number of tokens.

    .venv/bin/python benchmarks/tbdn_decode.py            # Qwen2-VL-7B shapes, 448 px, 128 tokens: a GPU
    .venv/bin/python benchmarks/tbdn_decode.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: CoBSAT's own prompts (task 1, `--shots` demo images rendered at 448 px, 256 visual
tokens each; tiny: 64 px) as TBDN's generator builds them (`tbdn_parts`: the hint after the
instruction, the query word last, picture labels), `--batch` prompts a batch (default: paper-lvlm's
eval.batch_size, 8; tiny 2), TBDN's sampling (temperature 0.7, top_p 0.9) with the same seed on
every path, and exactly `--tokens` new tokens per prompt (default TBDN's 128; tiny 8): every stop
token banned, no path stops at EOS, so each does the same number of steps. Random weights at
Qwen2-VL-7B shapes in bf16 (as extract_features.py; nothing downloaded) and the offline byte-level
tokenizer with merges learned from the prompts' text; `--model-id` loads a checkpoint instead
(Hub id or directory, `load_vlm`).
- text-bridge: `generate_with_states` on the N prompts (static KV cache, the decode step compiled
  on CUDA), the text bridge's VLM call with TBDN's sampling.
- tbdn: `generate_with_states(contrast=alpha)` on the 2N batch (the N prompts, then the same N
  without their query text), `TBDNGenerator`'s call: one forward per step over the 2N rows, each
  with its own KV cache.
- tbdn, re-run per step (TBDN's code, `qcd_sampling.py`): the N full prompts decoded as on the
  text-bridge path (the same static cache and decode step), but at every step the query-less
  prompt plus the tokens so far goes through the model from its start, images included, with no
  cache, for its logits; then the same (1 + alpha) * full - alpha * query-less, the same
  processors and sampling. With the same seed it samples the tbdn path's tokens up to rounding
  (on a CPU in fp32, the same tokens; the count is printed).
Each path runs one warm-up call (the compile of its decode step on CUDA; the re-run path's warm-up
decodes 4 tokens), then `--batches` timed calls. Printed: per path s/prompt, prompts/s and peak
memory, and two ratios of s/prompt: tbdn / text-bridge (what the contrast costs) and re-run / tbdn
(what the query-less rows' KV cache saves).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from compile_counters import changed_since, snapshot
from extract_features import QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION
from timing import free_memory, peak_gib, reset_peak, sync

from thinkdiff.config import ModelSource, load_config
from thinkdiff.eval.cobsat import build_prompts, get_task
from thinkdiff.eval.dataset import make_synthetic_dataset
from thinkdiff.generate import COBSAT_INSTRUCTION, TBDN_MAX_NEW_TOKENS, TBDN_TEMPERATURE, TBDN_TOP_P, tbdn_parts
from thinkdiff.models.decode import decode_compile_options, decode_step, reusable_static_cache, token_scores
from thinkdiff.models.tiny import TINY_TEXT, TINY_VISION, build_random_vlm
from thinkdiff.models.vlm import VLM, encode_chat, generate_with_states, load_vlm

PATHS = ("text-bridge", "tbdn", "tbdn, re-run per step")
RERUN_WARMUP_TOKENS = 4


def from_scratch_logits(vlm: VLM, batch: dict[str, torch.Tensor], generated_BG: torch.Tensor) -> torch.Tensor:
    """(B, V) float32 next-token logits of each prompt of `batch` followed by its generated ids: one
    forward from the first token, images included, no cache (TBDN's query-less pass)."""
    extra_BG = generated_BG.to(batch["input_ids"].device)
    out = vlm.model(input_ids=torch.cat([batch["input_ids"], extra_BG], dim=1),
                    attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(extra_BG)], dim=1),
                    mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(extra_BG)], dim=1),
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def rerun_decode(vlm: VLM, full: dict[str, torch.Tensor], bare: dict[str, torch.Tensor], *, tokens: int,
                 alpha: float, seed: int, compile: bool, steps: int | None = None) -> list[list[int]]:
    """TBDN's query-contrastive decoding as its code runs it: the full prompts (`full`) decoded over
    the project's static KV cache and decode step, the query-less ones (`bare`) run from scratch at
    every step (`from_scratch_logits`); TBDN's sampling, stop tokens banned as `ban_eos` bans them.
    The cache is sized for `tokens`; `steps` (a warm-up) stops sooner. The (N, steps) ids."""
    input_ids, attention_mask = full["input_ids"], full["attention_mask"]
    device = input_ids.device
    rows, prompt_len = input_ids.shape
    cache, capacity = reusable_static_cache(vlm, rows, prompt_len + tokens)
    step = decode_step(vlm, compile)
    scores = token_scores(vlm, TBDN_TEMPERATURE, TBDN_TOP_P, suppressed=vlm.vision_token_ids + vlm.eos_token_ids,
                          compile=compile and decode_compile_options(vlm.device) is not None)
    model = vlm.model
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # as generate_with_states seeds: the same draws as the tbdn path
        # The prefill as decode_with_states runs it (M-RoPE positions from host copies).
        on_host = {k: full[k].cpu() for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")}
        positions_3BP, rope_deltas_B1 = model.model.get_rope_index(**on_host)
        state_BD = model.model(**full, position_ids=positions_3BP.to(device), cache=cache,
                               use_cache=True).last_hidden_state[:, -1]
        logits_BV = model.lm_head(state_BD).float()
        mask_BC = torch.zeros(rows, capacity, dtype=attention_mask.dtype, device=device)
        mask_BC[:, :prompt_len] = attention_mask
        next_position_B1 = attention_mask.sum(-1, keepdim=True) + rope_deltas_B1.to(device)
        tokens_BG = torch.empty(rows, 0, dtype=torch.long, device=device)
        for j in range(steps or tokens):
            bare_BV = from_scratch_logits(vlm, bare, tokens_BG)
            token_scores_BV = scores(tokens_BG, (1 + alpha) * logits_BV - alpha * bare_BV)
            token_B = torch.multinomial(torch.softmax(token_scores_BV, dim=-1), num_samples=1).squeeze(1)
            tokens_BG = torch.cat([tokens_BG, token_B[:, None]], dim=1)
            if j + 1 == (steps or tokens):
                break
            mask_BC[:, prompt_len + j] = 1
            _, logits_BV = step(token_B, (next_position_B1 + j).expand(3, -1, -1), mask_BC, cache)
    return tokens_BG.tolist()


def timed(name: str, run, prompts: int, batches: int, device: torch.device, warmup=None) -> tuple[float, list]:
    """Seconds per prompt of `run(seed)` over `batches` calls (seeds 1..batches), after one warm-up
    call (`warmup`, else `run(0)`); prints the path's line. Also the first timed call's result."""
    free_memory(device)
    reset_peak(device)
    (warmup or run)(0)
    warm = snapshot()
    started = sync(device)
    first = run(1)
    for seed in range(2, batches + 1):
        run(seed)
    s_per_prompt = (sync(device) - started) / (batches * prompts)
    print(f"{name}: {s_per_prompt:.4g} s/prompt, {1 / s_per_prompt:.4g} prompts/s, {peak_gib(device):.3g} GiB peak; "
          f"compile counters changed over the timed calls: {changed_since(warm)}", flush=True)
    return s_per_prompt, first


def build_vlm(args, device: torch.device, dtype: torch.dtype, pixels: dict[str, int]) -> VLM:
    if args.model_id:
        return load_vlm(ModelSource(id=args.model_id, revision="main", dtype=str(dtype).removeprefix("torch.")),
                        **pixels, device=device)
    paper = load_config("paper-lvlm")
    corpus = [COBSAT_INSTRUCTION, paper.eval.tbdn_hint, paper.features.system_prompt, "system\n", "user\n",
              "assistant\n", "Picture 1: ", "Word 1: "]
    torch.set_default_dtype(dtype)
    with torch.device(device):
        vlm = (build_random_vlm(TINY_TEXT, TINY_VISION, **pixels, tokenizer_corpus=corpus) if args.tiny
               else build_random_vlm(QWEN2_VL_7B_TEXT, QWEN2_VL_7B_VISION, **pixels, model_id="random-qwen2-vl-7b",
                                     tokenizer_corpus=corpus))
    torch.set_default_dtype(torch.float32)
    return vlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=None,
                        help="prompts a batch (default: paper-lvlm's eval.batch_size; tiny 2)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"new tokens per prompt (default TBDN's {TBDN_MAX_NEW_TOKENS}; tiny 8)")
    parser.add_argument("--shots", type=int, default=2, help="demo images per CoBSAT prompt (task 1)")
    parser.add_argument("--batches", type=int, default=1, help="timed batches per path, after a warm-up")
    parser.add_argument("--model-id", default=None,
                        help="load this Qwen2-VL checkpoint (Hub id or directory) instead of random weights")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tiny = args.tiny
    paper = load_config("paper-lvlm")
    size = args.batch or (2 if tiny else paper.eval.batch_size)
    tokens = args.tokens or (8 if tiny else TBDN_MAX_NEW_TOKENS)
    alpha = paper.eval.tbdn_alpha
    side = 64 if tiny else 448
    pixels = dict(min_pixels=56 * 56, max_pixels=side * side)
    compile = device.type == "cuda"
    vlm = build_vlm(args, device, dtype, pixels)
    params = sum(p.numel() for p in vlm.model.parameters()) / 1e9
    system = paper.features.system_prompt
    with tempfile.TemporaryDirectory() as root:
        dataset = make_synthetic_dataset(root, size=side)
        prompts = build_prompts(get_task(1), args.shots, limit=size)
        conversations = [tbdn_parts(p, dataset, paper.eval.tbdn_hint) for p in prompts]
        without = [c[:-1] for c in conversations]  # the query word is the last text part
        full = encode_chat(vlm, conversations, system, picture_labels=True)
        bare = encode_chat(vlm, without, system, picture_labels=True)
        both = encode_chat(vlm, conversations + without, system, picture_labels=True)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{params:.2f}B params ({vlm.model_id}), batch {size} prompts (CoBSAT task 1, {args.shots} shots, "
          f"{side} px images), {full['input_ids'].shape[1]}-token prompts, {bare['input_ids'].shape[1]} without the "
          f"query, {tokens} new tokens each (stop tokens banned), sampling: temperature {TBDN_TEMPERATURE}, top_p "
          f"{TBDN_TOP_P} (TBDN's), alpha {alpha}, compile {compile}", flush=True)
    sampling = dict(max_new_tokens=tokens, temperature=TBDN_TEMPERATURE, top_p=TBDN_TOP_P, ban_eos=True,
                    compile=compile)
    seconds = {}
    seconds[PATHS[0]], _ = timed(PATHS[0], lambda seed: generate_with_states(vlm, full, seed=seed, kv_cache="static",
                                                                            **sampling), size, args.batches, device)
    seconds[PATHS[1]], contrastive = timed(
        PATHS[1], lambda seed: generate_with_states(vlm, both, seed=seed, contrast=alpha, **sampling),
        size, args.batches, device)
    rerun = dict(tokens=tokens, alpha=alpha, compile=compile)
    seconds[PATHS[2]], rerun_ids = timed(
        PATHS[2], lambda seed: rerun_decode(vlm, full, bare, seed=seed, **rerun), size, args.batches, device,
        warmup=lambda seed: rerun_decode(vlm, full, bare, seed=seed, steps=RERUN_WARMUP_TOKENS, **rerun))
    same = sum(a.token_ids == b for a, b in zip(contrastive, rerun_ids, strict=True))
    print(f"tokens of the re-run path equal to the tbdn path's (same seed): {same}/{size} prompts", flush=True)
    print(f"ratio tbdn / text-bridge (s/prompt, what the contrast costs): "
          f"{seconds[PATHS[1]] / seconds[PATHS[0]]:.3g}x", flush=True)
    print(f"ratio re-run / tbdn (s/prompt, what the query-less rows' KV cache saves): "
          f"{seconds[PATHS[2]] / seconds[PATHS[1]]:.3g}x", flush=True)


if __name__ == "__main__":
    main()
