"""The frozen vision-language model: loading, chat prompts, and generated-token states.

ThinkDiff-LVLM aligns the final-norm hidden states of the tokens the VLM *generates* (ThinkDiff,
arXiv 2502.10458): the state stored for generated token j is the one that produced it, i.e. the
input of `lm_head` at the previous position. `generate_with_states` samples a continuation and
returns those states, by one of two paths that sample the same ids from the same seed (unit tests
check both against HF generate and a full teacher-forced pass):
- plain (`kv_cache="dynamic"`): HF `generate()`, then one pass of the language model over the
  generated ids, reusing generate()'s KV cache of the prompt (`states_from_cache`);
- production (`kv_cache="static"`): `decode_with_states` (thinkdiff.models.decode), a decode loop
  over a reused static cache that keeps each step's state as it goes, with HF generate's own
  sampling processors; with `compile` on CUDA its decode step is a CUDA graph.

This module is the model's API: the `VLM` wrapper (its attention kernels, thinkdiff.models.attention,
selected on construction), loading, pixel limits, chat rendering and encoding, and the states
passes. The `tiny` model ids' random-weight models are built by thinkdiff.models.tiny.

Two kinds of family (`FAMILIES`): the Qwen-VL families, whose chat this module renders itself and
whose images it preprocesses on threads at the configured pixel limits (M-RoPE positions), and the
families whose transformers processor renders the chat with the checkpoint's own chat template and
expands the images (InternVL3 `-hf`, LLaVA-OneVision: `PROCESSOR_FAMILIES`; 1-D RoPE). Both decode
on both paths.

Shape legend: B batch, P padded prompt length, G generated length, L one sample's length, D width.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    InternVLProcessor,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2VLForConditionalGeneration,
    StaticCache,
)
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.errors import ConfigError
from thinkdiff.models.attention import PACKED_GQA_SDPA, PER_IMAGE_SDPA
from thinkdiff.models.common import default_device, torch_dtype
from thinkdiff.models.decode import decode_with_states

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
VIDEO_PAD = "<|video_pad|>"

PromptPart = str | Image.Image

FAMILIES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "internvl": "internvl",
            "llava_onevision": "llava-onevision"}
"""The VLM families this module runs (transformers' `model_type` -> family). Qwen2-VL, Qwen2.5-VL and
Qwen3-VL share the chat format, the image tokens, the image processor (Qwen3-VL's with 16-px patches)
and M-RoPE, so this module renders and encodes their chats itself; the others are `PROCESSOR_FAMILIES`."""
PROCESSOR_FAMILIES = {"internvl": InternVLProcessor, "llava-onevision": LlavaOnevisionProcessor}
"""Families whose chats and images go through their transformers processor (the checkpoint's chat
template and image tiling), loaded without its video half (`image_text_processor`)."""
FAMILY_EXAMPLES = {"qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct", "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
                   "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct", "internvl": "OpenGVLab/InternVL3-8B-hf",
                   "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}
"""A chat checkpoint of each family, named in the errors that refuse a model."""
TINY_VLMS = {TINY_MODEL_ID: "qwen2-vl", "tiny-qwen2-vl": "qwen2-vl", "tiny-qwen2.5-vl": "qwen2.5-vl",
             "tiny-qwen3-vl": "qwen3-vl", "tiny-internvl": "internvl", "tiny-llava-onevision": "llava-onevision"}
"""`models.vlm.id` values that build a family's class tiny and offline (thinkdiff.models.tiny)."""


@dataclass
class VLM:
    """A frozen VLM of one of `FAMILIES` with its tokenizer and image processor, and where it came from."""

    model: Qwen2VLForConditionalGeneration  # or another family's ...ForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil  # a `PROCESSOR_FAMILIES` model's: its processor's
    model_id: str
    revision: str
    processor: ProcessorMixin | None = None
    """The chat template and image expansion of a `PROCESSOR_FAMILIES` model; None for the Qwen-VL families."""
    static_cache: tuple[tuple[int, int], StaticCache] | None = field(default=None, repr=False)
    """The last static KV cache, with its (batch size, length): decode_with_states reuses it."""
    compiled_decode_step: Callable | None = field(default=None, repr=False)
    """decode_with_states' compiled step, compiled once per model."""

    def __post_init__(self) -> None:
        # per_image_sdpa fits the Qwen-VL vision towers' packed patches only; the other towers keep SDPA.
        vision = PER_IMAGE_SDPA if self.processor is None else "sdpa"
        self.model.set_attn_implementation({"text_config": PACKED_GQA_SDPA, "vision_config": vision})

    @property
    def family(self) -> str:
        return FAMILIES[self.model.config.model_type]

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
        known = (self.tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT))
        ids = [int(t) for t in known if t is not None and t != self.tokenizer.unk_token_id]
        configured = self.model.generation_config.eos_token_id
        for token in [self.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
            if token is not None and token not in ids:
                ids.append(int(token))
        return ids

    @property
    def vision_token_ids(self) -> list[int]:
        if self.processor is not None:
            names = ("image_token_id", "video_token_id", "start_image_token_id", "end_image_token_id")
            return [getattr(self.processor, n) for n in names if getattr(self.processor, n, None) is not None]
        return [self.tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]

    @property
    def pad_token_id(self) -> int:
        if self.processor is not None and self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)


def load_vlm(src: ModelSource, *, min_pixels: int, max_pixels: int, device: torch.device | None = None) -> VLM:
    """Load a VLM of `FAMILIES` by Hugging Face id or local directory (`TINY_VLMS`: a family's class,
    random-init). Another family, or a checkpoint without a chat template, is refused in one line,
    naming the model, before its weights load.

    `trust_remote_code` stays off: every family is a transformers class. The image processors are
    the PIL ones, so no torchvision is needed.
    """
    device = device or default_device()
    if src.id in TINY_VLMS:
        from thinkdiff.models.tiny import build_tiny_vlm

        vlm = build_tiny_vlm(min_pixels=min_pixels, max_pixels=max_pixels, model_id=src.id)
        vlm.model.to(device=device, dtype=torch_dtype(src.dtype))
        return vlm
    revision = None if Path(src.id).is_dir() else src.revision
    family = vlm_family(src)  # refused here, from its config alone
    processor = load_image_text_processor(src, family) if family in PROCESSOR_FAMILIES else None
    log.info("loading VLM %s (revision %s, %s) on %s", src.id, revision, src.dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(
        src.id, revision=revision, dtype=torch_dtype(src.dtype), trust_remote_code=False
    )
    model.to(device).eval().requires_grad_(False)
    if processor is not None:
        return VLM(model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor,
                   model_id=src.id, revision=src.revision if revision else "local", processor=processor)
    return VLM(
        model=model,
        tokenizer=load_vlm_tokenizer(src),
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(
            src.id, revision=revision, min_pixels=min_pixels, max_pixels=max_pixels
        ),
        model_id=src.id,
        revision=src.revision if revision else "local",
    )


def vlm_family(src: ModelSource) -> str:
    """The family of `models.vlm` (`FAMILIES`), read from its config; another, or a model without a
    vision tower, is refused in one line."""
    if src.id in TINY_VLMS:
        return TINY_VLMS[src.id]
    revision = None if Path(src.id).is_dir() else src.revision
    config = AutoConfig.from_pretrained(src.id, revision=revision, trust_remote_code=False)
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    choices = (f"the VLM families this version runs are {', '.join(FAMILIES.values())} "
               f"(e.g. {', '.join(FAMILY_EXAMPLES.values())}; offline: {', '.join(TINY_VLMS)}): use one of them")
    if getattr(config, "vision_config", None) is None:
        raise ConfigError(f"models.vlm.id={src.id} is a {config.model_type} model without image support (no "
                          f"vision_config); {choices}")
    raise ConfigError(f"models.vlm.id={src.id} is a {config.model_type} model; {choices}")


@functools.cache
def image_text_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor: transformers requires one to build the processor,
    and builds video processors only where torchvision is installed; this project feeds no videos.
    It saves under `processor_class`'s name with its settings (`load_image_text_processor` reads them)."""

    class ImageTextProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            processor_class.__init__(self, image_processor, tokenizer, None, **kwargs)

    # transformers reads a processor's sub-processors and saved settings from its __init__ signature.
    signature = inspect.signature(processor_class.__init__)
    ImageTextProcessor.__init__.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "video_processor"])
    ImageTextProcessor.__name__ = processor_class.__name__
    return ImageTextProcessor


def load_image_text_processor(src: ModelSource, family: str) -> ProcessorMixin:
    """A `PROCESSOR_FAMILIES` checkpoint's processor (`image_text_processor`: its tokenizer, PIL image
    processor, chat template and settings); one without a chat template is refused in one line."""
    revision = None if Path(src.id).is_dir() else src.revision
    processor_class = PROCESSOR_FAMILIES[family]
    settings, _ = processor_class.get_processor_dict(src.id, revision=revision)
    if not settings.get("chat_template"):
        raise ConfigError(f"models.vlm.id={src.id} has no chat template (a base checkpoint, or one saved without "
                          "its processor's chat_template.jinja): use the instruction-tuned chat checkpoint, e.g. "
                          f"{FAMILY_EXAMPLES[family]}")
    accepted = inspect.signature(processor_class.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted and k not in ("image_processor", "tokenizer",
                                                                              "video_processor")}
    return image_text_processor(processor_class)(
        AutoImageProcessor.from_pretrained(src.id, revision=revision, backend="pil"),
        AutoTokenizer.from_pretrained(src.id, revision=revision, trust_remote_code=False),
        **kwargs,
    )


def with_pixel_limits(vlm: VLM, min_pixels: int, max_pixels: int) -> VLM:
    """The same model and tokenizer with an image processor that resizes to these pixel limits (the
    features stage and CoBSAT inference have their own); `vlm` itself when they already hold, and for
    `PROCESSOR_FAMILIES`, whose processors tile images their own way (InternVL3: 448-px tiles, at most
    12; LLaVA-OneVision: its anyres grid)."""
    if vlm.processor is not None:
        return vlm
    size = vlm.image_processor.size
    if (size.shortest_edge, size.longest_edge) == (min_pixels, max_pixels):
        return vlm
    processor = copy.deepcopy(vlm.image_processor)
    processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    # The decode loop's cache and compiled step do not depend on the image processor: shared.
    return dataclasses.replace(vlm, image_processor=processor)


def load_vlm_tokenizer(src: ModelSource) -> PreTrainedTokenizerBase:
    """The VLM's tokenizer alone (training decodes generated ids with it)."""
    if src.id in TINY_VLMS:
        from thinkdiff.models.tiny import build_tiny_family_tokenizer

        return build_tiny_family_tokenizer(TINY_VLMS[src.id])
    revision = None if Path(src.id).is_dir() else src.revision
    return AutoTokenizer.from_pretrained(src.id, revision=revision, trust_remote_code=False)


def preprocess_images(processor: Qwen2VLImageProcessorPil, images: list[Image.Image],
                      pool: Executor | None = None) -> dict[str, torch.Tensor]:
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
            user.append(label + VISION_START + IMAGE_PAD * (image_tokens[k] if image_tokens is not None else 1)
                        + VISION_END)
            k += 1
        else:
            user.append(part)
    return f"{IM_START}system\n{system_prompt}{IM_END}\n{IM_START}user\n{''.join(user)}{IM_END}\n{IM_START}assistant\n"


def chat_messages(conversation: list[PromptPart], system_prompt: str, *, picture_labels: bool) -> list[dict]:
    """One system + user turn as chat-template messages; with `picture_labels`, "Picture k: " goes
    before the k-th image as text (as Qwen2-VL's template does with `add_vision_id=True`)."""
    user, k = [], 0
    for part in conversation:
        if isinstance(part, Image.Image):
            k += 1
            if picture_labels:
                user.append({"type": "text", "text": f"Picture {k}: "})
            user.append({"type": "image"})
        else:
            user.append({"type": "text", "text": part})
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
            {"role": "user", "content": user}]


def chat_text(vlm: VLM, conversation: list[PromptPart], system_prompt: str, *, picture_labels: bool = False) -> str:
    """The chat as the VLM is given it, one placeholder per image, ending with the assistant header:
    `render_chat` for the Qwen-VL families, the checkpoint's chat template for `PROCESSOR_FAMILIES`."""
    if vlm.processor is None:
        return render_chat(conversation, system_prompt, picture_labels=picture_labels)
    return vlm.processor.apply_chat_template(chat_messages(conversation, system_prompt, picture_labels=picture_labels),
                                             add_generation_prompt=True, tokenize=False)


def encode_chat(vlm: VLM, conversations: list[list[PromptPart]], system_prompt: str,
                pool: Executor | None = None, device: torch.device | None = None, *,
                picture_labels: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize a batch of one-turn chats (interleaved text and images, `chat_text`) with left padding.

    `mm_token_type_ids` is 1 on image-pad tokens: without it Qwen2-VL's M-RoPE positions are wrong.
    `pool` preprocesses the images on threads (Qwen-VL families); the tensors go to `device` (default:
    the model's), floating ones in the model's dtype.
    """
    if vlm.processor is not None:
        return _encode_with_processor(vlm, conversations, system_prompt, device, picture_labels=picture_labels)
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


def _encode_with_processor(vlm: VLM, conversations: list[list[PromptPart]], system_prompt: str,
                           device: torch.device | None, *, picture_labels: bool) -> dict[str, torch.Tensor]:
    texts = [chat_text(vlm, conv, system_prompt, picture_labels=picture_labels) for conv in conversations]
    # Nested per chat: LLaVA-OneVision tiles a chat's only image (anyres) but not one of several.
    images = [[part.convert("RGB") for part in conv if isinstance(part, Image.Image)] for conv in conversations]
    batch = vlm.processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True,
                          padding_side="left")
    dtype = next(vlm.model.parameters()).dtype
    return {k: v.to(device or vlm.device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()}


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
    contrast: float | None = None,
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

    `contrast` = a: query-contrastive decoding (`decode_with_states`, always on the static path): the
    batch holds each prompt, then each prompt without its query text; one sample per prompt.
    """
    eos_ids = [] if ban_eos else vlm.eos_token_ids
    # A generated <|image_pad|> would be taken for an image placeholder by a states pass (and a caption
    # has no use for vision tokens; a trained Qwen2-VL never emits them).
    suppressed = vlm.vision_token_ids + (vlm.eos_token_ids if ban_eos else [])
    devices = [vlm.device] if vlm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if kv_cache == "static" or contrast is not None:
            generated_BG, states_BGD = decode_with_states(vlm, batch, max_new_tokens=max_new_tokens,
                                                          temperature=temperature, top_p=top_p, eos_ids=eos_ids,
                                                          suppressed=suppressed, compile=compile, contrast=contrast)
        else:
            generated_BG, states_BGD = _hf_generate_with_states(vlm, batch, max_new_tokens=max_new_tokens,
                                                                temperature=temperature, top_p=top_p, eos_ids=eos_ids,
                                                                suppressed=suppressed)
    lengths = [_generated_length(row, eos_ids) for row in generated_BG.tolist()]
    # One device-to-host copy for the batch; each sample then keeps only its own rows.
    states_BGD = states_BGD.float().cpu()
    return [
        GeneratedSample(token_ids=generated_BG[i, :n].tolist(), states_LD=states_BGD[i, :n].clone())
        for i, n in enumerate(lengths)
    ]


def _hf_generate_with_states(vlm: VLM, batch: dict[str, torch.Tensor], *, max_new_tokens: int, temperature: float,
                             top_p: float, eos_ids: list[int],
                             suppressed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
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


@torch.no_grad()
def states_from_cache(vlm: VLM, batch: dict[str, torch.Tensor], generated_BG: torch.Tensor, cache) -> torch.Tensor:
    """(B, G, D) producing states of the generated tokens, reusing generate()'s KV cache of the prompt.

    The cache is cut back to the prompt minus its last token; one pass of the language model over
    [last prompt token, generated tokens but the last] then yields, at each position, the final-norm
    state that produced the next token. The image and the prompt are not encoded again. Positions
    continue the prompt's text positions (Qwen-VL: M-RoPE, plus generate's stored `rope_deltas`).
    """
    prompt_len = batch["input_ids"].shape[1]
    width = generated_BG.shape[1]
    cache.crop(-(int(cache.get_seq_length()) - (prompt_len - 1)))  # a negative count: tokens to drop
    ids_BG = torch.cat([batch["input_ids"][:, -1:], generated_BG[:, :-1]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(generated_BG)], dim=1)
    text_positions_BG = (mask.cumsum(-1) - 1).clamp(min=0)[:, prompt_len - 1: prompt_len - 1 + width]
    if vlm.processor is None:
        text_positions_BG = (text_positions_BG + vlm.model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)
    text_model = vlm.model.model.language_model
    return text_model(
        inputs_embeds=text_model.embed_tokens(ids_BG), position_ids=text_positions_BG, attention_mask=mask,
        cache=cache, use_cache=True,
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
    gen_mask = (torch.arange(width, device=generated_BG.device)[None, :]
                < torch.tensor(lengths, device=generated_BG.device)[:, None]).long()
    ids = generated_BG.masked_fill(gen_mask == 0, vlm.pad_token_id)
    inputs = dict(batch)
    inputs["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    inputs["attention_mask"] = torch.cat([batch["attention_mask"], gen_mask], dim=1)
    if "mm_token_type_ids" in batch:
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
