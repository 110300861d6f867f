"""CoBSAT judges: a VLM asked the two exact questions (greedy), or the synthetic set's reader.

The official judge is LLaVA-1.5-13B (`llava-hf/llava-1.5-13b-hf` through transformers); Qwen2-VL
is an option. Each image gets the detail question and the object question in one batch; the
replies are parsed by digit concatenation (COBSAT.md), so "(3)" and "3" both read as option 3.

A judge takes a batch of images (with each one's task) and answers for all of them at once: the
VLM judges put both questions of every image of the batch in one greedy generate() (left padded),
which gives the same replies as asking image by image (a test checks it) at a fraction of the
cost: at LLaVA-1.5-13B size a judge call is mostly weight reads and per-step overhead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from thinkdiff.config import TINY_MODEL_ID, ModelSource, RunConfig
from thinkdiff.eval.cobsat import Task, judge_questions, parse_answer
from thinkdiff.eval.dataset import read_factors
from thinkdiff.models.common import default_device, shared, torch_dtype
from thinkdiff.models.vlm import VLM, build_tiny_qwen_tokenizer, encode_chat, load_vlm

log = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 8
LLAVA_IMAGE = "<image>"
# CoBSAT's judge runs LLaVA's own `eval_model` in its `llava_v1` conversation mode: this system line,
# then one user turn holding the image and the question. (The llava-hf model cards show the turn
# without the system line; the benchmark's scores were judged with it.)
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_prompt(question: str, image: str = LLAVA_IMAGE) -> str:
    """The judge's prompt for one question about one image, as CoBSAT's evaluation builds it."""
    return f"{LLAVA_SYSTEM} USER: {image}\n{question} ASSISTANT:"


def synthetic_judge(images: list[Image.Image], tasks: list[Task]) -> list[tuple[int, int]]:
    """Reads the factors of the synthetic set's renders back (exact on clean renders)."""
    return [read_factors(image, task) for image, task in zip(images, tasks, strict=True)]


def answer_pairs(replies: list[str]) -> list[tuple[int, int]]:
    """(detail, object) options per image from the replies, two per image in question order."""
    options = [parse_answer(r) for r in replies]
    return list(zip(options[0::2], options[1::2], strict=True))


@dataclass
class LlavaJudge:
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor

    def inputs(self, images: list[Image.Image], tasks: list[Task]) -> dict[str, torch.Tensor]:
        """Both questions about each image (rows 2i and 2i + 1), left-padded, in LLaVA-1.5's
        conversation format (`llava_prompt`)."""
        texts = [llava_prompt(question) for task in tasks for question in judge_questions(task)]
        batch = self.processor(images=[image for image in images for _ in range(2)], text=texts, padding=True, return_tensors="pt")
        device, dtype = self.model.device, self.model.dtype
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def replies(self, images: list[Image.Image], tasks: list[Task]) -> list[str]:
        batch = self.inputs(images, tasks)
        out = self.model.generate(**batch, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)
        return self.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, images: list[Image.Image], tasks: list[Task]) -> list[tuple[int, int]]:
        return answer_pairs(self.replies(images, tasks))


@dataclass
class Qwen2VLJudge:
    vlm: VLM
    system_prompt: str

    @torch.no_grad()
    def replies(self, images: list[Image.Image], tasks: list[Task]) -> list[str]:
        chats = [[image, question] for image, task in zip(images, tasks, strict=True) for question in judge_questions(task)]
        batch = encode_chat(self.vlm, chats, self.system_prompt)
        out = self.vlm.model.generate(**batch, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS,
                                      eos_token_id=self.vlm.eos_token_ids, pad_token_id=self.vlm.pad_token_id)
        return self.vlm.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, images: list[Image.Image], tasks: list[Task]) -> list[tuple[int, int]]:
        return answer_pairs(self.replies(images, tasks))


def load_judge(cfg: RunConfig):
    """The judge named by `eval.judge` (synthetic, llava or qwen2-vl) with `eval.judge_model`."""
    e = cfg.eval
    if e.judge == "synthetic":
        return synthetic_judge
    if e.judge == "qwen2-vl":
        f = cfg.features
        return Qwen2VLJudge(shared(load_vlm, e.judge_model, min_pixels=f.min_pixels, max_pixels=f.max_pixels), f.system_prompt)
    return shared(load_llava_judge, e.judge_model)


def load_llava_judge(src: ModelSource, device: torch.device | None = None) -> LlavaJudge:
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        judge = build_tiny_llava_judge()
        judge.model.to(device)
        return judge
    revision = None if Path(src.id).is_dir() else src.revision
    log.info("loading judge %s (revision %s, %s)", src.id, revision, src.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(src.id, revision=revision, dtype=torch_dtype(src.dtype))
    processor = AutoProcessor.from_pretrained(src.id, revision=revision)
    processor.tokenizer.padding_side = "left"
    return LlavaJudge(model=model.to(device).eval(), processor=processor)


TINY_LLAVA_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       # Larger random weights than the default 0.02, so that the tiny judge's
                       # replies depend on the image and the question (tests compare them).
                       initializer_range=0.2)
TINY_LLAVA_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                         patch_size=14, projection_dim=32)


def build_tiny_llava_judge(seed: int = 0) -> LlavaJudge:
    """LlavaForConditionalGeneration with small dims and fixed random weights, offline tokenizer."""
    return build_random_llava_judge(TINY_LLAVA_TEXT, TINY_LLAVA_VISION, seed=seed)


def build_random_llava_judge(text: dict, vision: dict, *, seed: int = 0, tokenizer_corpus: Sequence[str] = ()) -> LlavaJudge:
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
