"""The static-cache decode loop: `generate_with_states(kv_cache="static")`, the features stage's fast path.

`decode_with_states` prefills the image and prompt once, then decodes one token per step over a
static KV cache reused from batch to batch (`reusable_static_cache`), keeping at each step the
final-norm state that produced the next token, so no second pass over the generated ids is
needed. It samples as HF generate does (its logits processors, `token_scores`, then
`torch.multinomial`, in its order), so a seed gives the ids `generate()` samples; with `compile`
on CUDA the decode step is compiled to a CUDA graph with static shapes (`decode_compile_options`),
the combination transformers documents for fast decoding
(https://huggingface.co/docs/transformers/llm_optims, "Static kv-cache and torch.compile").

It is apart from thinkdiff.models.vlm, the model API that calls it, because it is the one loop the
project writes itself in place of transformers' `generate()`, with its own cache and compile
state (kept on the `VLM`: `static_cache`, `compiled_decode_step`). It imports `VLM` for types only.

Shape legend: B batch, P padded prompt length, G generated length, C cache length, D width,
V vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessorList,
    Qwen2VLForConditionalGeneration,
    StaticCache,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from thinkdiff.models.sampling import TopPByThreshold

if TYPE_CHECKING:
    from thinkdiff.models.vlm import VLM

STATIC_CACHE_ROUNDING = 256


def token_scores(vlm: VLM, temperature: float, top_p: float, *, suppressed: list[int] | None = None,
                 compile: bool = False) -> LogitsProcessorList:
    """What HF generate does to the float32 logits before sampling, in its order and with its
    processors: the `suppressed` ids (default: the vision tokens) at -inf, then temperature and top-p
    when sampling. With `compile`,
    top-p is `TopPByThreshold` instead (compiled): the same tokens kept, found without sorting the
    vocabulary; uncompiled, each of its 30 passes would be several kernels over the whole
    vocabulary, so the sort stays."""
    suppressed = vlm.vision_token_ids if suppressed is None else suppressed
    scores = LogitsProcessorList([SuppressTokensLogitsProcessor(suppressed, device=vlm.device)])
    if temperature > 0:
        scores += [TemperatureLogitsWarper(temperature), TopPByThreshold(top_p) if compile else TopPLogitsWarper(top_p)]
    return scores


EOS_CHECK_EVERY = 16
"""decode_with_states asks the GPU whether every row has ended once per this many steps (one host sync)."""


@torch.no_grad()
def decode_with_states(vlm: VLM, batch: dict[str, torch.Tensor], *, max_new_tokens: int, temperature: float,
                       top_p: float, eos_ids: list[int], suppressed: list[int] | None = None,
                       compile: bool, contrast: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) generated ids and (B, G, D) producing states, decoded with a reusable static KV cache.

    One eager prefill over image and prompt, then one decode step per token, each returning the
    token's final-norm state (kept: it is the state that produced the next token, so no second pass
    over the generated ids is needed) and its logits. Sampling is HF generate's: its processors
    (`token_scores`; compiled, top-p without a sort) and `torch.multinomial` on the softmax, in
    the same order, so the same seed gives the ids HF generate samples. Rows that have ended take
    the pad token, as in HF generate; generation stops early only when every row has ended,
    checked every `EOS_CHECK_EVERY` steps, so the GPU never waits for the host in between. The
    decode step's inputs keep one shape for the whole batch (the attention mask spans the cache),
    so the compiled step is one graph.

    With `contrast` = a (query-contrastive decoding, TBDN: arXiv 2601.06169), the batch holds 2N
    rows: N prompts, then the same N without their final query text. Each step samples N tokens
    from `(1 + a) * logits(prompt) - a * logits(prompt without the query)`, before the processors,
    and appends each token to both of its rows: one forward per step over both, each row with its
    own KV cache (TBDN's code runs the query-less sequence again from its start every step). The
    ids and states returned are the N prompts' rows.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows, prompt_len = input_ids.shape
    cache, capacity = reusable_static_cache(vlm, rows, prompt_len + max_new_tokens)
    step = decode_step(vlm, compile)
    scores = token_scores(vlm, temperature, top_p, suppressed=suppressed,
                          compile=compile and decode_compile_options(vlm.device) is not None)
    model = vlm.model
    positions_BP, next_position_B1, rope_axes = prompt_positions(vlm, batch)
    prefill_BPD = model.model(**batch, position_ids=positions_BP.to(input_ids.device), cache=cache,
                              use_cache=True).last_hidden_state
    state_BD = prefill_BPD[:, -1]
    logits_BV = model.lm_head(state_BD).float()
    del prefill_BPD
    mask_BC = torch.zeros(rows, capacity, dtype=attention_mask.dtype, device=attention_mask.device)
    mask_BC[:, :prompt_len] = attention_mask
    next_position_B1 = next_position_B1.to(input_ids.device)
    tokens_BG = torch.full((rows, max_new_tokens), vlm.pad_token_id, dtype=torch.long, device=input_ids.device)
    states_BGD = torch.empty(rows, max_new_tokens, state_BD.shape[-1], dtype=state_BD.dtype, device=state_BD.device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    unfinished_B = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    steps, sampled = max_new_tokens, rows // 2 if contrast is not None else rows
    for j in range(max_new_tokens):
        states_BGD[:, j] = state_BD
        if contrast is not None:
            logits_BV = (1 + contrast) * logits_BV[:sampled] - contrast * logits_BV[sampled:]
        token_scores_BV = scores(tokens_BG[:sampled, :j], logits_BV)
        if temperature > 0:
            token_B = torch.multinomial(F.softmax(token_scores_BV, dim=-1), num_samples=1).squeeze(1)
        else:
            token_B = token_scores_BV.argmax(-1)
        if contrast is not None:
            token_B = token_B.repeat(2)
        tokens_BG[:, j] = torch.where(unfinished_B, token_B, vlm.pad_token_id)
        unfinished_B &= ~torch.isin(token_B, eos)
        if j + 1 == max_new_tokens:
            break
        if eos_ids and (j + 1) % EOS_CHECK_EVERY == 0 and not bool(unfinished_B.any()):
            steps = j + 1
            break
        mask_BC[:, prompt_len + j] = 1
        positions_B1 = next_position_B1 + j
        state_BD, logits_BV = step(tokens_BG[:, j], positions_B1.expand(3, -1, -1) if rope_axes == 3 else positions_B1,
                                   mask_BC, cache)
    return tokens_BG[:sampled, :steps], states_BGD[:sampled, :steps]


def prompt_positions(vlm: VLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prompt's rotary positions, the first generated token's text position (B, 1), and the
    number of rotary axes (3: M-RoPE; 1). The next token's text position continues the prompt's,
    left padding excluded."""
    mask_BP = batch["attention_mask"]
    if vlm.processor is not None:  # 1-D RoPE: the text positions, as HF generate counts them
        return (mask_BP.cumsum(-1) - 1).clamp(min=0), mask_BP.sum(-1, keepdim=True), 1
    # Qwen-VL's M-RoPE positions come from a walk over the rows with several host reads per row: on
    # GPU tensors each is a sync that idles the GPU (about 2,600 at batch 256); on host copies none
    # is. The prefill's M-RoPE offset (rope_deltas) applies to all three axes of the next tokens.
    on_host = {k: batch[k].cpu() for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
               if k in batch}
    positions_3BP, rope_deltas_B1 = vlm.model.model.get_rope_index(**on_host)
    return positions_3BP, mask_BP.sum(-1, keepdim=True) + rope_deltas_B1.to(mask_BP.device), 3


def decode_step(vlm: VLM, compile: bool):
    """The decode step of `decode_with_states`: (B,) input ids, (3, B, 1) M-RoPE or (B, 1) positions, the
    (B, cache length) attention mask and the cache in; the final-norm state (B, D) and float32 logits
    (B, V) out. With `compile` it is compiled once per model with `decode_compile_options`: CUDA
    graphs and static shapes on CUDA (the outputs are copied or consumed before the next step, whose
    replay overwrites them); without options (other devices) it runs eagerly."""
    options = decode_compile_options(vlm.device) if compile else None
    if options is None:
        return partial(_decode_step, vlm.model)
    if vlm.compiled_decode_step is None:
        vlm.compiled_decode_step = torch.compile(partial(_decode_step, vlm.model), **options)
    if options.get("mode") == "reduce-overhead":
        return partial(_mark_cudagraph_step, vlm.compiled_decode_step)
    return vlm.compiled_decode_step


def _decode_step(model: Qwen2VLForConditionalGeneration, token_B: torch.Tensor, positions_3B1: torch.Tensor,
                 mask_BC: torch.Tensor, cache: StaticCache) -> tuple[torch.Tensor, torch.Tensor]:
    state_BD = model.model.language_model(input_ids=token_B[:, None], position_ids=positions_3B1,
                                          attention_mask=mask_BC, cache=cache, use_cache=True).last_hidden_state[:, 0]
    return state_BD, model.lm_head(state_BD).float()


def _mark_cudagraph_step(step, *args):
    # Each call is a new CUDA-graph step: the previous step's outputs were consumed already.
    torch.compiler.cudagraph_mark_step_begin()
    return step(*args)


def decode_compile_options(device: torch.device) -> dict | None:
    """torch.compile options of the decode step: CUDA graphs and static shapes on CUDA (what HF
    generate's default CompileConfig uses); None elsewhere, where the step runs eagerly."""
    return dict(mode="reduce-overhead", dynamic=False, fullgraph=False) if device.type == "cuda" else None


def reusable_static_cache(vlm: VLM, batch_size: int, length: int) -> tuple[StaticCache, int]:
    """A static KV cache and its length, for `batch_size` rows of up to `length` tokens, reset and
    reused while the batch size holds and the length fits. Its length is rounded up to a multiple
    of 256, so batches whose prompts differ by a few tokens share one shape (one compiled decode
    graph), and the compiled step's CUDA graphs see the same cache tensors on every call."""
    if vlm.static_cache is not None:
        (rows, capacity), cache = vlm.static_cache
        if rows == batch_size and capacity >= length:
            cache.reset()
            return cache, capacity
    capacity = -(-length // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING
    cache = StaticCache(config=vlm.model.config.get_text_config(decoder=True), max_cache_len=capacity)
    vlm.static_cache = ((batch_size, capacity), cache)
    return cache, capacity
