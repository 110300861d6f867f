"""The frozen vision-language model (Qwen2-VL): loading, chat prompts, and generated-token states.

ThinkDiff-LVLM aligns the final-norm hidden states of the tokens the VLM *generates* (REFERENCE.md
sections 2 and 4): the state stored for generated token j is the one that produced it, i.e. the
input of `lm_head` at the previous position. `generate_with_states` samples a continuation and
returns those states, by one of two paths that sample the same ids from the same seed (unit tests
check both against HF generate and a full teacher-forced pass):
- plain (`kv_cache="dynamic"`): HF `generate()`, then one pass of the language model over the
  generated ids, reusing generate()'s KV cache of the prompt (`states_from_cache`);
- production (`kv_cache="static"`): `decode_with_states`, a decode loop over a reused static cache
  that keeps each step's state as it goes, with HF generate's own sampling processors; with
  `compile` on CUDA its decode step is a CUDA graph.

Shape legend: B batch, P padded prompt length, G generated length, L one sample's length, D width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    StaticCache,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.image_utils import SizeDict
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.models.common import default_device, torch_dtype
from thinkdiff.models.sampling import TopPByThreshold

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
VIDEO_PAD = "<|video_pad|>"
TINY_REVISION = "tiny-v1"

PromptPart = str | Image.Image
STATIC_CACHE_ROUNDING = 256
PACKED_GQA_SDPA = "thinkdiff_packed_gqa_sdpa"


def packed_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a one-token query (a decode step) never copies the
    key/value heads out to the query heads.

    Qwen2-VL-7B has 28 query heads over 4 key/value heads. With a mask (always there with a static
    cache) transformers repeats K and V 7 times per layer and step under torch.compile (its own
    packing is eager-only): at batch 256 and 512 cached positions, about 2 GB written and read per
    layer and step, far more than the weights. Here the 7 query heads of each key/value head are
    passed as 7 query positions of that head instead, so SDPA reads each cached K/V once; the mask,
    shared by all heads, broadcasts over them. Prompts and the states pass (many query tokens),
    and a mask that differs per head, go to transformers' SDPA unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or groups == 1 or per_head_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, head_dim = query.shape
    packed_BKGD = query.reshape(batch, heads // groups, groups, head_dim)
    out = F.scaled_dot_product_attention(packed_BKGD, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)
AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)  # the masks SDPA gets (else none: padding ignored)


def per_image_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                   cu_seq_lens_q: torch.Tensor, max_length_q: int, **kwargs) -> tuple[torch.Tensor, None]:
    """The vision tower's attention (each image attends within itself) as one SDPA call over a batch
    of images, where transformers' SDPA path makes one call per image.

    Qwen2-VL's vision tower packs all images' patches into one sequence and gives attention the
    image boundaries (`cu_seq_lens_q`) only when the implementation's name says flash; any other
    implementation gets a per-image loop: at batch 256, 8,192 small SDPA calls over the 32 layers,
    and a host sync per layer. When every image has the longest image's length (one image size, as in
    the features stage), the packed sequence is a (images, patches) batch; other mixes keep the
    per-image loop. Query/key/value: (1, heads, patches, head dim); returns (1, patches, heads, head
    dim), the layout flash implementations return."""
    _, heads, total, _ = query.shape
    images = cu_seq_lens_q.shape[0] - 1
    if images * max_length_q == total:  # every image at most the longest and the sum is the total: all equal

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x[0].reshape(heads, images, max_length_q, x.shape[-1]).transpose(0, 1)

        out = F.scaled_dot_product_attention(per_image(query), per_image(key), per_image(value), dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).reshape(1, total, heads, -1), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
            for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)), strict=True)]
    return torch.cat(outs, dim=2).transpose(1, 2), None


# "flash" in the name is what makes Qwen2-VL's vision attention pass the image boundaries.
PER_IMAGE_SDPA = "thinkdiff_per_image_sdpa_flash_interface"
AttentionInterface.register(PER_IMAGE_SDPA, per_image_sdpa)


@dataclass
class VLM:
    """A frozen Qwen2-VL with its tokenizer and image processor, and where it came from."""

    model: Qwen2VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil
    model_id: str
    revision: str
    static_cache: tuple[tuple[int, int], StaticCache] | None = field(default=None, repr=False)
    """The last static KV cache, with its (batch size, length): decode_with_states reuses it."""
    compiled_decode_step: Callable | None = field(default=None, repr=False)
    """decode_with_states' compiled step, compiled once per model."""

    def __post_init__(self) -> None:
        self.model.set_attn_implementation({"text_config": PACKED_GQA_SDPA, "vision_config": PER_IMAGE_SDPA})

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        """Every stop token: the end of the turn and of the text, the tokenizer's EOS and the generation
        config's eos ids (for Qwen2-VL-7B-Instruct: <|im_end|> and <|endoftext|>)."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT)]
        configured = self.model.generation_config.eos_token_id
        for token in [self.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
            if token is not None and token not in ids:
                ids.append(int(token))
        return ids

    @property
    def vision_token_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)


def load_vlm(src: ModelSource, *, min_pixels: int, max_pixels: int, device: torch.device | None = None) -> VLM:
    """Load Qwen2-VL by Hugging Face id or local directory (`tiny`: the same class, random-init).

    `trust_remote_code` stays off: Qwen2-VL is a transformers class. The image processor is the
    PIL one, so no torchvision is needed.
    """
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        vlm = build_tiny_vlm(min_pixels=min_pixels, max_pixels=max_pixels)
        vlm.model.to(device=device, dtype=torch_dtype(src.dtype))
        return vlm
    revision = None if Path(src.id).is_dir() else src.revision
    log.info("loading VLM %s (revision %s, %s) on %s", src.id, revision, src.dtype, device)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        src.id, revision=revision, dtype=torch_dtype(src.dtype), trust_remote_code=False
    )
    model.to(device).eval().requires_grad_(False)
    return VLM(
        model=model,
        tokenizer=load_vlm_tokenizer(src),
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(
            src.id, revision=revision, min_pixels=min_pixels, max_pixels=max_pixels
        ),
        model_id=src.id,
        revision=src.revision if revision else "local",
    )


def with_pixel_limits(vlm: VLM, min_pixels: int, max_pixels: int) -> VLM:
    """The same model and tokenizer with an image processor that resizes to these pixel limits (the
    features stage and CoBSAT inference have their own); `vlm` itself when they already hold."""
    size = vlm.image_processor.size
    if (size.shortest_edge, size.longest_edge) == (min_pixels, max_pixels):
        return vlm
    processor = copy.deepcopy(vlm.image_processor)
    processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    return dataclasses.replace(vlm, image_processor=processor, static_cache=None, compiled_decode_step=None)


def load_vlm_tokenizer(src: ModelSource) -> PreTrainedTokenizerBase:
    """The VLM's tokenizer alone (training decodes generated ids with it)."""
    if src.id == TINY_MODEL_ID:
        return build_tiny_qwen_tokenizer()
    revision = None if Path(src.id).is_dir() else src.revision
    return AutoTokenizer.from_pretrained(src.id, revision=revision, trust_remote_code=False)


def build_tiny_qwen_tokenizer(corpus: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (byte b is id b) with the chat/vision special tokens; needs no files.

    With `corpus`, byte-pair merges learned from it follow the bytes, so those texts come out in
    about as many tokens as Qwen's own 151k-token BPE gives them (the benchmarks' prompts); without,
    no merges: one token per byte.
    """
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(range(256))}
    merges = learn_merges(corpus) if corpus else []
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    specials = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
    for token in specials:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=IM_END, pad_token=END_OF_TEXT)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def learn_merges(corpus: Sequence[str], vocab_size: int = 2048) -> list[tuple[str, str]]:
    """Byte-level BPE merges (in byte_to_unicode characters) learned from `corpus` by `tokenizers`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TINY_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)


def build_tiny_vlm(*, min_pixels: int, max_pixels: int, seed: int = 0) -> VLM:
    """Qwen2VLForConditionalGeneration with small dims and fixed random weights (same seed, same model)."""
    return build_random_vlm(TINY_TEXT, TINY_VISION, min_pixels=min_pixels, max_pixels=max_pixels, seed=seed)


def build_random_vlm(text: dict, vision: dict, *, min_pixels: int, max_pixels: int, seed: int = 0,
                     model_id: str = TINY_MODEL_ID, revision: str = TINY_REVISION, tokenizer_corpus: Sequence[str] = ()) -> VLM:
    """Qwen2-VL with the given text/vision dims, random weights and the offline byte-level tokenizer
    (with merges learned from `tokenizer_corpus`, see `build_tiny_qwen_tokenizer`).

    Built on the current default device and dtype (the benchmarks build paper-size models directly on
    the GPU in bf16).
    """
    tok = build_tiny_qwen_tokenizer(tokenizer_corpus)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=max(len(tok), text.get("vocab_size", 0)),
            max_position_embeddings=4096,
            bos_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
            eos_token_id=tok.convert_tokens_to_ids(IM_END),
            pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
            **{k: v for k, v in text.items() if k != "vocab_size"},
        ),
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.eval().requires_grad_(False)
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return VLM(model=model, tokenizer=tok, image_processor=processor, model_id=model_id, revision=revision)


def preprocess_images(processor: Qwen2VLImageProcessorPil, images: list[Image.Image], pool: Executor | None = None) -> dict[str, torch.Tensor]:
    """`pixel_values` (all images' patches, in order) and `image_grid_thw`; with a thread pool one
    image per task (resizing and normalising release the GIL), concatenated in order: the same
    tensors as one call over the list."""
    rgb = [im.convert("RGB") for im in images]
    if pool is None or len(rgb) == 1:
        return dict(processor(images=rgb, return_tensors="pt"))
    parts = list(pool.map(lambda im: processor(images=[im], return_tensors="pt"), rgb))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def render_chat(conversation: list[PromptPart], system_prompt: str, *, picture_labels: bool = False,
                image_tokens: Sequence[int] | None = None) -> str:
    """One system + user turn as Qwen2-VL's chat template renders it, ending with the assistant header
    so generation continues as the assistant. Each image becomes `<|vision_start|>` + `<|image_pad|>`
    x its merged-patch count (`image_tokens`; one placeholder each when not given) + `<|vision_end|>`;
    with `picture_labels`, "Picture k: " goes before the k-th image, as the template does with
    `add_vision_id=True`."""
    user, k = [], 0
    for part in conversation:
        if isinstance(part, Image.Image):
            label = f"Picture {k + 1}: " if picture_labels else ""
            user.append(label + VISION_START + IMAGE_PAD * (image_tokens[k] if image_tokens is not None else 1) + VISION_END)
            k += 1
        else:
            user.append(part)
    return f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n{''.join(user)}{IM_END}\n{IM_START}assistant\n"


def encode_chat(vlm: VLM, conversations: list[list[PromptPart]], system_prompt: str,
                pool: Executor | None = None, device: torch.device | None = None, *,
                picture_labels: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize a batch of one-turn chats (interleaved text and images, `render_chat`) with left padding.

    `mm_token_type_ids` is 1 on image-pad tokens: without it Qwen2-VL's M-RoPE positions are wrong.
    `pool` preprocesses the images on threads; the tensors go to `device` (default: the model's).
    """
    images = [part for conv in conversations for part in conv if isinstance(part, Image.Image)]
    vision: dict[str, torch.Tensor] = {}
    tokens_per_image: list[int] = []
    if images:
        vision = preprocess_images(vlm.image_processor, images, pool)
        merge = vlm.image_processor.merge_size**2
        tokens_per_image = [int(thw.prod()) // merge for thw in vision["image_grid_thw"]]
    texts, first_image = [], 0
    for conv in conversations:
        count = sum(isinstance(part, Image.Image) for part in conv)
        texts.append(render_chat(conv, system_prompt, picture_labels=picture_labels,
                                 image_tokens=tokens_per_image[first_image:first_image + count]))
        first_image += count
    rows = [vlm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), vlm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    image_pad_id = vlm.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_pad_id).long(),
        **vision,
    }
    return {k: v.to(device or vlm.device) for k, v in batch.items()}


@dataclass
class GeneratedSample:
    token_ids: list[int]
    """Generated ids, up to and including the first EOS (if one came before the limit)."""
    states_LD: torch.Tensor
    """Final-norm hidden state that produced each generated token, (L, D), on CPU."""


@torch.no_grad()
def generate_with_states(
    vlm: VLM,
    batch: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    ban_eos: bool = False,
    kv_cache: str = "dynamic",
    compile: bool = False,
) -> list[GeneratedSample]:
    """Sample continuations with the producing state of every generated token.

    Sampling uses exactly the given temperature and top_p (no top-k, no repetition penalty, whatever
    the checkpoint's generation_config says) and a seeded RNG, so a rerun is identical; temperature 0
    decodes greedily. With `ban_eos` every sample has exactly `max_new_tokens` tokens and none is a
    stop token: every id of `VLM.eos_token_ids` gets logit -inf at every step, as vLLM does with
    `min_tokens = max_tokens, ignore_eos=True`, the official ThinkDiff release's inference sampling
    (configs/test_thinkdiff_lvlm_ccsbu_image_text.yaml at 3ed85e6); the answer never closes its turn.

    `kv_cache="dynamic"`: HF generate, then the states from one pass over the generated ids that
    reuses the prompt's KV cache (the plain path). `kv_cache="static"`: `decode_with_states`, which
    keeps each step's state as it decodes (no states pass); with `compile`, its decode step runs as
    a compiled CUDA graph (CUDA only; elsewhere eagerly). Both sample the same ids from the same seed.
    """
    eos_ids = [] if ban_eos else vlm.eos_token_ids
    # A generated <|image_pad|> would be taken for an image placeholder by a states pass (and a caption
    # has no use for vision tokens; a trained Qwen2-VL never emits them).
    suppressed = vlm.vision_token_ids + (vlm.eos_token_ids if ban_eos else [])
    devices = [vlm.device] if vlm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if kv_cache == "static":
            generated_BG, states_BGD = decode_with_states(vlm, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, eos_ids=eos_ids, suppressed=suppressed, compile=compile)
        else:
            generated_BG, states_BGD = _hf_generate_with_states(vlm, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                                                top_p=top_p, eos_ids=eos_ids, suppressed=suppressed)
    lengths = [_generated_length(row, eos_ids) for row in generated_BG.tolist()]
    # One device-to-host copy for the batch; each sample then keeps only its own rows.
    states_BGD = states_BGD.float().cpu()
    return [
        GeneratedSample(token_ids=generated_BG[i, :n].tolist(), states_LD=states_BGD[i, :n].clone())
        for i, n in enumerate(lengths)
    ]


def _hf_generate_with_states(vlm: VLM, batch: dict[str, torch.Tensor], *, max_new_tokens: int, temperature: float,
                             top_p: float, eos_ids: list[int], suppressed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path: HF generate (dynamic cache, eager), then `states_from_cache`."""
    gen_config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,  # an empty list, not None: None would fall back to the model's EOS
        pad_token_id=vlm.pad_token_id,
        suppress_tokens=suppressed,
        disable_compile=True,
        return_dict_in_generate=True,
    )
    out = vlm.model.generate(**batch, generation_config=gen_config)
    generated_BG = out.sequences[:, batch["input_ids"].shape[1]:]
    return generated_BG, states_from_cache(vlm, batch, generated_BG, out.cache)


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
                       compile: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) generated ids and (B, G, D) producing states, decoded with a reusable static KV cache.

    One eager prefill over image and prompt, then one decode step per token, each returning the
    token's final-norm state (kept: it is the state that produced the next token, so no second pass
    over the generated ids is needed) and its logits. Sampling is HF generate's: its processors
    (`token_scores`; compiled, top-p without a sort) and `torch.multinomial` on the softmax, in
    the same order, so the same seed gives the ids HF generate samples. Rows that have ended take
    the pad token, as in HF generate; generation stops early only when every row has ended,
    checked every `EOS_CHECK_EVERY` steps, so the GPU never waits for the host in between. The decode step's inputs keep one shape for the
    whole batch (the attention mask spans the cache), so the compiled step is one graph.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows, prompt_len = input_ids.shape
    cache, capacity = reusable_static_cache(vlm, rows, prompt_len + max_new_tokens)
    step = decode_step(vlm, compile)
    scores = token_scores(vlm, temperature, top_p, suppressed=suppressed,
                          compile=compile and decode_compile_options(vlm.device) is not None)
    model = vlm.model
    # Qwen2-VL's M-RoPE positions come from a walk over the rows with several host reads per row:
    # on GPU tensors each is a sync that idles the GPU (about 2,600 at batch 256); on host copies
    # none is.
    on_host = {k: batch[k].cpu() for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask") if k in batch}
    positions_3BP, rope_deltas_B1 = model.model.get_rope_index(**on_host)
    prefill_BPD = model.model(**batch, position_ids=positions_3BP.to(input_ids.device), cache=cache,
                              use_cache=True).last_hidden_state
    state_BD = prefill_BPD[:, -1]
    logits_BV = model.lm_head(state_BD).float()
    del prefill_BPD
    mask_BC = torch.zeros(rows, capacity, dtype=attention_mask.dtype, device=attention_mask.device)
    mask_BC[:, :prompt_len] = attention_mask
    # The next token's text position continues the prompt's (left padding excluded); Qwen2-VL adds
    # the prefill's M-RoPE offset (rope_deltas) on all three axes.
    next_position_B1 = attention_mask.sum(-1, keepdim=True) + rope_deltas_B1.to(input_ids.device)
    tokens_BG = torch.full((rows, max_new_tokens), vlm.pad_token_id, dtype=torch.long, device=input_ids.device)
    states_BGD = torch.empty(rows, max_new_tokens, state_BD.shape[-1], dtype=state_BD.dtype, device=state_BD.device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    unfinished_B = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    steps = max_new_tokens
    for j in range(max_new_tokens):
        states_BGD[:, j] = state_BD
        token_scores_BV = scores(tokens_BG[:, :j], logits_BV)
        if temperature > 0:
            token_B = torch.multinomial(F.softmax(token_scores_BV, dim=-1), num_samples=1).squeeze(1)
        else:
            token_B = token_scores_BV.argmax(-1)
        tokens_BG[:, j] = torch.where(unfinished_B, token_B, vlm.pad_token_id)
        unfinished_B &= ~torch.isin(token_B, eos)
        if j + 1 == max_new_tokens:
            break
        if eos_ids and (j + 1) % EOS_CHECK_EVERY == 0 and not bool(unfinished_B.any()):
            steps = j + 1
            break
        mask_BC[:, prompt_len + j] = 1
        state_BD, logits_BV = step(tokens_BG[:, j], (next_position_B1 + j).expand(3, -1, -1), mask_BC, cache)
    return tokens_BG[:, :steps], states_BGD[:, :steps]


def decode_step(vlm: VLM, compile: bool):
    """The decode step of `decode_with_states`: (B,) input ids, (3, B, 1) M-RoPE positions, the
    (B, cache length) attention mask and the cache in; the final-norm state (B, D) and float32 logits
    (B, V) out. With `compile` it is compiled once per model with `decode_compile_options`: CUDA
    graphs and static shapes on CUDA (the outputs are copied or consumed before the next step, whose
    replay overwrites them); without options (other devices) it runs eagerly."""
    options = decode_compile_options(vlm.device) if compile else None
    if options is None:
        return partial(_decode_step, vlm.model)
    if vlm.compiled_decode_step is None:
        vlm.compiled_decode_step = torch.compile(partial(_decode_step, vlm.model), **options)
    return partial(_mark_cudagraph_step, vlm.compiled_decode_step) if options.get("mode") == "reduce-overhead" else vlm.compiled_decode_step


def _decode_step(model: Qwen2VLForConditionalGeneration, token_B: torch.Tensor, positions_3B1: torch.Tensor,
                 mask_BC: torch.Tensor, cache: StaticCache) -> tuple[torch.Tensor, torch.Tensor]:
    state_BD = model.model.language_model(input_ids=token_B[:, None], position_ids=positions_3B1, attention_mask=mask_BC,
                                          cache=cache, use_cache=True).last_hidden_state[:, 0]
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


@torch.no_grad()
def states_from_cache(vlm: VLM, batch: dict[str, torch.Tensor], generated_BG: torch.Tensor, cache) -> torch.Tensor:
    """(B, G, D) producing states of the generated tokens, reusing generate()'s KV cache of the prompt.

    The cache is cut back to the prompt minus its last token; one pass of the language model over
    [last prompt token, generated tokens but the last] then yields, at each position, the final-norm
    state that produced the next token. The image and the prompt are not encoded again. Positions
    continue the prompt's M-RoPE positions (text positions plus generate's stored `rope_deltas`).
    """
    prompt_len = batch["input_ids"].shape[1]
    width = generated_BG.shape[1]
    cache.crop(-(int(cache.get_seq_length()) - (prompt_len - 1)))  # a negative count: tokens to drop
    ids_BG = torch.cat([batch["input_ids"][:, -1:], generated_BG[:, :-1]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(generated_BG)], dim=1)
    text_positions_BG = (mask.cumsum(-1) - 1).clamp(min=0)[:, prompt_len - 1: prompt_len - 1 + width]
    positions_3BG = (text_positions_BG + vlm.model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)
    text_model = vlm.model.model.language_model
    return text_model(
        inputs_embeds=text_model.embed_tokens(ids_BG), position_ids=positions_3BG, attention_mask=mask, cache=cache,
        use_cache=True,
    ).last_hidden_state


@torch.no_grad()
def final_norm_states(
    vlm: VLM, batch: dict[str, torch.Tensor], generated_BG: torch.Tensor, lengths: list[int]
) -> list[torch.Tensor]:
    """The plain path: a full teacher-forced pass over image, prompt and generated ids (no cache).

    Used as the reference `states_from_cache` is tested against and as the benchmark's naive
    baseline. The prompt is left-padded to P, so generated token j of every sample sits at P + j and
    was produced by the state at P + j - 1. Positions past a sample's length are masked out.
    """
    prompt_len = batch["input_ids"].shape[1]
    width = generated_BG.shape[1]
    gen_mask = (torch.arange(width, device=generated_BG.device)[None, :] < torch.tensor(lengths, device=generated_BG.device)[:, None]).long()
    ids = generated_BG.masked_fill(gen_mask == 0, vlm.pad_token_id)
    inputs = dict(batch)
    inputs["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([batch["attention_mask"], gen_mask], dim=1)
    inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    # The base model (no lm_head): its last_hidden_state is the final-norm output, and no logits
    # over the 152k vocabulary are materialised.
    hidden_BTD = vlm.model.model(**inputs, use_cache=False).last_hidden_state
    return [hidden_BTD[i, prompt_len - 1: prompt_len - 1 + n].float().cpu() for i, n in enumerate(lengths)]


def _generated_length(row: list[int], eos_ids: list[int]) -> int:
    for j, token in enumerate(row):
        if token in eos_ids:
            return j + 1
    return len(row)
