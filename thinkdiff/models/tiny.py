"""Every tiny and random-weight model of the project: what the `tiny` model id loads, offline.

A `ModelSource` whose id is `tiny` (`thinkdiff.config.TINY_MODEL_ID`) makes each loader build here
the class it would otherwise load from a checkpoint (Qwen2-VL, the T5 decoder, the BLIP-2 vision
tower, FLUX, the LLaVA-1.5 judge, CoBSAT's CLIP; the VLM families by their `tiny-<family>` ids,
thinkdiff.models.vlm.TINY_VLMS) with small dimensions and fixed random weights
(the same seed gives the same model), and with tokenizers that need no files (byte-level, bytes
mapped to characters as GPT-2's byte-level BPE maps them, transformers' `bytes_to_unicode`). Tests
and CPU runs thus exercise the real transformers and diffusers code without a download. The
`build_random_*` builders take any dimensions: the benchmarks build paper-size models with random
weights to time them without checkpoints.

They are kept in one module so that the model modules hold only what loads and runs real
checkpoints. This module imports the wrappers it fills (`VLM`, `VisionEncoder`, `LlavaJudge`,
`ClipScorer`); the loaders import it inside their functions, when asked for `tiny`, so no import
cycle forms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Blip2VisionConfig,
    Blip2VisionModel,
    ByT5Tokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from thinkdiff.config import TINY_MODEL_ID
from thinkdiff.eval.clip_score import CLIP_TEXT_TOKENS, ClipScorer
from thinkdiff.eval.judge import LLAVA_IMAGE, LlavaJudge
from thinkdiff.models.vision import VisionEncoder
from thinkdiff.models.vlm import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    TINY_VLMS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    VLM,
    image_text_processor,
)

TINY_REVISION = "tiny-v1"
"""The revision every tiny model reports (its weights are fixed by the builder's seed)."""


# Qwen2-VL: the VLM of the features stage and of CoBSAT inference, and the Qwen2-VL judge.

def build_tiny_qwen_tokenizer(corpus: Sequence[str] = (),
                              family_tokens: dict[str, str] | None = None) -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (byte b is id b) with the chat/vision special tokens; needs no files.

    With `corpus`, byte-pair merges learned from it follow the bytes, so those texts come out in
    about as many tokens as Qwen's own 151k-token BPE gives them (the benchmarks' prompts); without,
    no merges: one token per byte. `family_tokens` (attribute name -> token) adds a family's own image
    tokens after the others, as named special tokens (`FAMILY_TOKENS`).
    """
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(range(256))}
    merges = learn_merges(corpus) if corpus else []
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    specials = [END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD,
                *(family_tokens or {}).values()]
    for token in specials:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=IM_END, pad_token=END_OF_TEXT,
                         extra_special_tokens=family_tokens or {})
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


FAMILY_TOKENS = {
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "llava-onevision": {"image_token": "<image>", "video_token": "<video>"},
}
"""The image tokens InternVL3-hf's and LLaVA-OneVision's tokenizers name (their processors look them up)."""


def build_tiny_family_tokenizer(family: str) -> Qwen2Tokenizer:
    """The offline tokenizer of a tiny VLM of `family` (thinkdiff.models.vlm.FAMILIES)."""
    return build_tiny_qwen_tokenizer(family_tokens=FAMILY_TOKENS.get(family))


def tiny_chat_template(image_placeholder: str) -> str:
    """A chat template in Qwen's turn format (the one InternVL3-hf and LLaVA-OneVision use) that puts
    `image_placeholder` where each image goes, for their processors to expand."""
    return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + image_placeholder + "\\n' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def learn_merges(corpus: Sequence[str], vocab_size: int = 2048) -> list[tuple[str, str]]:
    """Byte-level BPE merges (in byte_to_unicode characters) learned from `corpus` by `tokenizers`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TINY_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)


# Qwen2.5-VL's vision tower: windowed attention in all blocks but the last (a window of 56 px, two
# 28-px merged patches a side), which attends over the whole image.
TINY_VISION_QWEN2_5 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56)


# Qwen3-VL: a Qwen3 text model (q/k norms, interleaved M-RoPE) and a vision tower of 16-px patches whose
# first block's features also enter the text model (deepstack).
TINY_TEXT_QWEN3 = {**TINY_TEXT, "head_dim": 16,
                   "rope_parameters": {**TINY_TEXT["rope_parameters"], "mrope_interleaved": True}}
TINY_VISION_QWEN3 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                         num_position_embeddings=64, deepstack_visual_indexes=[0])


def build_tiny_vlm(*, min_pixels: int, max_pixels: int, seed: int = 0, model_id: str = TINY_MODEL_ID) -> VLM:
    """The VLM family `model_id` names (`tiny`: Qwen2-VL; `tiny-qwen2-vl`, `tiny-qwen2.5-vl`: see
    thinkdiff.models.vlm.TINY_VLMS), its real class with small dims and fixed random weights (same seed,
    same model). The pixel limits apply to the Qwen-VL families, whose image processor takes them."""
    if TINY_VLMS[model_id] == "internvl":
        return build_tiny_internvl(seed=seed, model_id=model_id)
    if TINY_VLMS[model_id] == "llava-onevision":
        return build_tiny_llava_onevision(seed=seed, model_id=model_id)
    if TINY_VLMS[model_id] == "qwen3-vl":
        return build_random_vlm(TINY_TEXT_QWEN3, TINY_VISION_QWEN3, min_pixels=min_pixels, max_pixels=max_pixels,
                                seed=seed, model_id=model_id, config_class=Qwen3VLConfig,
                                model_class=Qwen3VLForConditionalGeneration)
    if TINY_VLMS[model_id] == "qwen2.5-vl":
        return build_random_vlm(TINY_TEXT, TINY_VISION_QWEN2_5, min_pixels=min_pixels, max_pixels=max_pixels,
                                seed=seed, model_id=model_id, config_class=Qwen2_5_VLConfig,
                                model_class=Qwen2_5_VLForConditionalGeneration)
    return build_random_vlm(TINY_TEXT, TINY_VISION, min_pixels=min_pixels, max_pixels=max_pixels, seed=seed,
                            model_id=model_id)


def build_random_vlm(text: dict, vision: dict, *, min_pixels: int, max_pixels: int, seed: int = 0,
                     model_id: str = TINY_MODEL_ID, revision: str = TINY_REVISION,
                     tokenizer_corpus: Sequence[str] = (), config_class: type = Qwen2VLConfig,
                     model_class: type = Qwen2VLForConditionalGeneration) -> VLM:
    """Qwen2-VL with the given text/vision dims, random weights and the offline byte-level tokenizer
    (with merges learned from `tokenizer_corpus`, see `build_tiny_qwen_tokenizer`).

    Built on the current default device and dtype (the benchmarks build paper-size models directly on
    the GPU in bf16).
    """
    tok = build_tiny_qwen_tokenizer(tokenizer_corpus)
    config = config_class(
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
        model = model_class(config)
    model.eval().requires_grad_(False)
    processor = Qwen2VLImageProcessorPil(patch_size=vision.get("patch_size", 14), min_pixels=min_pixels,
                                         max_pixels=max_pixels)
    return VLM(model=model, tokenizer=tok, image_processor=processor, model_id=model_id, revision=revision)


TINY_TILE = 28
"""The tiny InternVL's and LLaVA-OneVision's image tile side: two 14-px patches a side."""
TINY_TEXT_QWEN2 = dict(model_type="qwen2", **{k: v for k, v in TINY_TEXT.items() if k != "rope_parameters"})


def build_tiny_internvl(*, seed: int = 0, model_id: str = "tiny-internvl") -> VLM:
    """InternVL3-hf's classes (InternViT, pixel-shuffle projector, Qwen2) with small dims: 28-px tiles
    (up to 4 and a thumbnail), 2x2 patches shuffled to one image token per tile."""
    tok = build_tiny_family_tokenizer("internvl")
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[TINY_TILE, TINY_TILE], patch_size=[14, 14]),
        text_config=_tiny_qwen2_text(tok), image_token_id=tok.context_image_token_id, image_seq_length=1,
    )
    processor = image_text_processor(InternVLProcessor)(
        GotOcr2ImageProcessorPil(size={"height": TINY_TILE, "width": TINY_TILE}, crop_to_patches=True, max_patches=4),
        tok, image_seq_length=1, chat_template=tiny_chat_template("<IMG_CONTEXT>"))
    return _tiny_processor_vlm(InternVLForConditionalGeneration, config, processor, seed=seed, model_id=model_id)


def build_tiny_llava_onevision(*, seed: int = 0, model_id: str = "tiny-llava-onevision") -> VLM:
    """LLaVA-OneVision's classes (SigLIP, anyres tiling with unpadding, Qwen2) with small dims: 28-px
    tiles on a grid of up to 2x2, 2x2 patches each."""
    tok = build_tiny_family_tokenizer("llava-onevision")
    grid = [[TINY_TILE * rows, TINY_TILE * cols] for rows in (1, 2) for cols in (1, 2)]
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=TINY_TILE, patch_size=14),
        text_config=_tiny_qwen2_text(tok), image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
        image_grid_pinpoints=grid, vision_feature_select_strategy="full",
    )
    processor = image_text_processor(LlavaOnevisionProcessor)(
        LlavaOnevisionImageProcessorPil(size={"height": TINY_TILE, "width": TINY_TILE}, image_grid_pinpoints=grid),
        tok, num_image_tokens=(TINY_TILE // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=tiny_chat_template("<image>"))
    return _tiny_processor_vlm(LlavaOnevisionForConditionalGeneration, config, processor, seed=seed, model_id=model_id)


def _tiny_qwen2_text(tok: Qwen2Tokenizer) -> dict:
    return dict(TINY_TEXT_QWEN2, vocab_size=len(tok), max_position_embeddings=4096,
                bos_token_id=tok.convert_tokens_to_ids(END_OF_TEXT), eos_token_id=tok.convert_tokens_to_ids(IM_END),
                pad_token_id=tok.convert_tokens_to_ids(END_OF_TEXT))


def _tiny_processor_vlm(model_class: type, config, processor, *, seed: int, model_id: str) -> VLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval().requires_grad_(False)
    return VLM(model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor,
               model_id=model_id, revision=TINY_REVISION, processor=processor)


# The T5 decoder that supervises the aligner.

def build_tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A Flan-T5-shaped model (gated-gelu, no decoder-output scaling, dropout 0.1) with small dims and
    fixed random weights."""
    config = T5Config(
        vocab_size=len(ByT5Tokenizer()),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,  # flan-t5's: train.t5_dropout has an effect
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        # Random init leaves final_layer_norm at ones; give it structure so the aligner-norm init is visible.
        with torch.no_grad():
            model.encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


# ThinkDiff-CLIP's vision tower.

def build_tiny_vision(image_size: int = 56, seed: int = 0) -> VisionEncoder:
    """Blip2VisionModel with small dims and fixed random weights: a 4x4 grid -> 1 + 2x2 = 5 tokens."""
    config = Blip2VisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=image_size, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2VisionModel(config)
    processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return VisionEncoder(model=model.eval(), processor=processor, model_id=TINY_MODEL_ID, revision=TINY_REVISION)


# FLUX.

def build_tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (word-final bytes carry `</w>`); needs no files."""
    chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_flux_pipeline(seed: int = 0, joint_dim: int = 32) -> FluxPipeline:
    """FLUX with small dims and fixed random weights; `joint_dim` matches the tiny T5 (aligner output)."""
    clip_tokenizer = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=joint_dim, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
        )
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        ))
        t5_tokenizer = ByT5Tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=joint_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=t5_tokenizer,
    )


# CoBSAT's LLaVA-1.5 judge.

TINY_LLAVA_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2,
                       # Larger random weights than the default 0.02, so that the tiny judge's
                       # replies depend on the image and the question (tests compare them).
                       initializer_range=0.2)
TINY_LLAVA_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         image_size=28, patch_size=14, projection_dim=32)


# Random weights seldom pick EOS, so every tiny reply would run to the full 512 tokens: EOS's output
# row scaled up this much ends the tiny judge's replies after tens of tokens (varying by image and
# question), which keeps tests at CoBSAT's answer length fast and lets them see replies end at EOS.
TINY_LLAVA_EOS_SCALE = 1.5


def build_tiny_llava_judge(seed: int = 0) -> LlavaJudge:
    """LlavaForConditionalGeneration with small dims and fixed random weights, offline tokenizer; its
    replies end at EOS after tens of tokens (`TINY_LLAVA_EOS_SCALE`)."""
    judge = build_random_llava_judge(TINY_LLAVA_TEXT, TINY_LLAVA_VISION, seed=seed)
    with torch.no_grad():
        judge.model.lm_head.weight[judge.processor.tokenizer.eos_token_id] *= TINY_LLAVA_EOS_SCALE
    return judge


def build_random_llava_judge(text: dict, vision: dict, *, seed: int = 0,
                             tokenizer_corpus: Sequence[str] = ()) -> LlavaJudge:
    """LLaVA-1.5 (CLIP vision tower, "default" feature selection, Llama) with the given dims, fixed
    random weights and the offline byte-level tokenizer (merges learned from `tokenizer_corpus`, see
    `build_tiny_qwen_tokenizer`). Built on the current default device and dtype."""
    tokenizer = build_tiny_qwen_tokenizer(tokenizer_corpus)
    tokenizer.add_tokens([LLAVA_IMAGE], special_tokens=True)
    tokenizer.padding_side = "left"
    side = vision["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                               vision_feature_select_strategy="default", image_token=LLAVA_IMAGE,
                               num_additional_image_tokens=1)  # the CLS token, dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(vocab_size=max(len(tokenizer), text.get("vocab_size", 0)), max_position_embeddings=4096,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                **{k: v for k, v in text.items() if k != "vocab_size"}),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
        image_seq_length=(side // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return LlavaJudge(model=model.eval().requires_grad_(False), processor=processor)


# CoBSAT's CLIP metric.

def build_tiny_clip_scorer(seed: int = 0) -> ClipScorer:
    """CLIPModel with small dims and fixed random weights, the offline byte-level CLIP tokenizer."""
    tokenizer = build_tiny_clip_tokenizer()
    side = 28
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": side},
                                                                    crop_size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_TEXT_TOKENS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=side, patch_size=14),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return ClipScorer(model=model.eval().requires_grad_(False), processor=processor)
