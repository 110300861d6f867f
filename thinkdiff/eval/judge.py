"""CoBSAT judges: a VLM asked the two exact questions (greedy), or the synthetic set's reader.

A judge takes a batch of generated images (with each one's task) and returns one
`cobsat.Verdict` per image: the detail and object options it chose and its two raw replies.

CoBSAT's own judge is LLaVA-1.5-13B (`llava-hf/llava-1.5-13b-hf`, the transformers conversion of
`liuhaotian/llava-v1.5-13b`), run as CoBSAT's evaluation runs it (docs/cobsat.md has the whole
protocol with its sources):
- the prompt of LLaVA's `llava_v1` conversation (`llava_prompt`);
- each image padded to a square with the image processor's mean colour before the processor
  resizes it (`pad_to_square`), as LLaVA's `process_images` does with the model's
  image_aspect_ratio "pad";
- greedy answers of up to 512 new tokens, each stopping at the model's EOS (`</s>`), stripped of
  surrounding whitespace;
- the replies parsed by digit concatenation (`cobsat.parse_answer`), so "(3)" and "3" both read
  as option 3.
Qwen2-VL is an option that CoBSAT did not use (`judge_label` says so in tables and MLflow).

The VLM judges put both questions of every image of the batch in one greedy generate() (left
padded), which gives the same replies as asking image by image (a test checks it) at a fraction
of the cost: at LLaVA-1.5-13B size a judge call is mostly weight reads and per-step overhead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from thinkdiff.config import TINY_MODEL_ID, ModelSource, RunConfig
from thinkdiff.eval.cobsat import Task, Verdict, judge_questions, parse_answer
from thinkdiff.eval.dataset import read_factors
from thinkdiff.models.common import default_device, shared, torch_dtype
from thinkdiff.models.vlm import VLM, encode_chat, load_vlm, with_pixel_limits

log = logging.getLogger(__name__)

# CoBSAT's judge may answer up to 512 new tokens (`max_new_tokens` in load_models/call_llava.py,
# line 35, CoBSAT a787be5); a trained judge stops at its EOS after a few tokens.
MAX_ANSWER_TOKENS = 512
LLAVA_IMAGE = "<image>"
# CoBSAT's judge runs LLaVA's own `eval_model` in its `llava_v1` conversation mode: this system line,
# then one user turn holding the image and the question (llava/eval/run_llava.py lines 61-97 and
# llava/conversation.py lines 335-345, yzeng58/LLaVA a61aae0). (The llava-hf model cards show the
# turn without the system line; the benchmark's scores were judged with it.)
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
COBSAT_JUDGE_ID = "llava-hf/llava-1.5-13b-hf"
COBSAT_JUDGE_DTYPE = "float16"  # LLaVA's load_pretrained_model (llava/model/builder.py line 43, a61aae0)


def llava_prompt(question: str, image: str = LLAVA_IMAGE) -> str:
    """The judge's prompt for one question about one image, as CoBSAT's evaluation builds it."""
    return f"{LLAVA_SYSTEM} USER: {image}\n{question} ASSISTANT:"


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """`image` centred on a square of its longer side filled with `colour` (the offset of an odd
    margin rounded down), as LLaVA's `expand2square` (llava/mm_utils.py lines 14-25, a61aae0)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(image_processor) -> tuple[int, ...]:
    """The padding colour of LLaVA's "pad" mode: the processor's normalisation mean in 0..255,
    truncated (llava/mm_utils.py line 33, a61aae0)."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def synthetic_judge(images: list[Image.Image], tasks: list[Task]) -> list[Verdict]:
    """Reads the factors of the synthetic set's renders back (exact on clean renders); its
    "replies" are the option numbers it read."""
    verdicts = []
    for image, task in zip(images, tasks, strict=True):
        detail, obj = read_factors(image, task)
        verdicts.append(Verdict(detail, obj, (str(detail), str(obj))))
    return verdicts


def verdicts(replies: list[str]) -> list[Verdict]:
    """One verdict per image from the replies, two per image in question order."""
    return [Verdict(parse_answer(detail), parse_answer(obj), (detail, obj))
            for detail, obj in zip(replies[0::2], replies[1::2], strict=True)]


def judge_label(cfg: RunConfig) -> str:
    """What judged an evaluation, for tables and MLflow tags: says whether it is CoBSAT's own judge."""
    e = cfg.eval
    if e.judge == "synthetic":
        return "synthetic reader (not CoBSAT's judge)"
    if e.judge == "llava" and e.judge_model.id == COBSAT_JUDGE_ID:
        if e.judge_model.dtype == COBSAT_JUDGE_DTYPE:
            return "LLaVA-1.5-13B (CoBSAT's judge)"
        return f"LLaVA-1.5-13B in {e.judge_model.dtype} (CoBSAT's judge ran in {COBSAT_JUDGE_DTYPE})"
    name = e.judge_model.id.rstrip("/").split("/")[-1]
    return f"{name} as {e.judge} judge (not CoBSAT's judge)"


@dataclass
class LlavaJudge:
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    max_new_tokens: int = MAX_ANSWER_TOKENS
    """CoBSAT's 512; benchmarks/cobsat_judge.py lowers it to time, with random weights that never
    stop, the few tokens a trained judge answers."""

    def inputs(self, images: list[Image.Image], tasks: list[Task]) -> dict[str, torch.Tensor]:
        """Both questions about each image (rows 2i and 2i + 1), left-padded, in LLaVA-1.5's
        conversation format (`llava_prompt`); each image padded to a square first (`pad_to_square`),
        so the processor's resize and centre crop keep all of it, as in CoBSAT's judge."""
        texts = [llava_prompt(question) for task in tasks for question in judge_questions(task)]
        colour = mean_colour(self.processor.image_processor)
        squares = [pad_to_square(image, colour) for image in images]
        batch = self.processor(images=[square for square in squares for _ in range(2)], text=texts, padding=True,
                               return_tensors="pt")
        device, dtype = self.model.device, self.model.dtype
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def replies(self, images: list[Image.Image], tasks: list[Task]) -> list[str]:
        """Greedy replies, each ending at the tokenizer's EOS (`</s>` for LLaVA-1.5, the stop string of
        its conversation), stripped as LLaVA's `eval_model` strips them (run_llava.py lines 124-153)."""
        batch = self.inputs(images, tasks)
        tokenizer = self.processor.tokenizer
        out = self.model.generate(**batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return [reply.strip()
                for reply in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]

    def __call__(self, images: list[Image.Image], tasks: list[Task]) -> list[Verdict]:
        return verdicts(self.replies(images, tasks))


@dataclass
class Qwen2VLJudge:
    vlm: VLM
    system_prompt: str

    @torch.no_grad()
    def replies(self, images: list[Image.Image], tasks: list[Task]) -> list[str]:
        """Greedy replies up to CoBSAT's length, ending at Qwen2-VL's EOS tokens, stripped."""
        chats = [[image, question]
                 for image, task in zip(images, tasks, strict=True) for question in judge_questions(task)]
        batch = encode_chat(self.vlm, chats, self.system_prompt)
        out = self.vlm.model.generate(**batch, do_sample=False, max_new_tokens=MAX_ANSWER_TOKENS,
                                      eos_token_id=self.vlm.eos_token_ids, pad_token_id=self.vlm.pad_token_id)
        return [reply.strip()
                for reply in self.vlm.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]

    def __call__(self, images: list[Image.Image], tasks: list[Task]) -> list[Verdict]:
        return verdicts(self.replies(images, tasks))


def load_judge(cfg: RunConfig):
    """The judge named by `eval.judge` (synthetic, llava or qwen2-vl) with `eval.judge_model`."""
    e = cfg.eval
    if e.judge == "synthetic":
        return synthetic_judge
    if e.judge == "qwen2-vl":
        f = cfg.features
        # Held once with the features stage's VLM when it is the same model; images at inference's pixel limits.
        vlm = shared(load_vlm, e.judge_model, min_pixels=f.min_pixels, max_pixels=f.max_pixels)
        return Qwen2VLJudge(with_pixel_limits(vlm, e.min_pixels, e.max_pixels), f.system_prompt)
    return shared(load_llava_judge, e.judge_model)


def load_llava_judge(src: ModelSource, device: torch.device | None = None) -> LlavaJudge:
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        from thinkdiff.models.tiny import build_tiny_llava_judge

        judge = build_tiny_llava_judge()
        judge.model.to(device)
        return judge
    revision = None if Path(src.id).is_dir() else src.revision
    log.info("loading judge %s (revision %s, %s)", src.id, revision, src.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(src.id, revision=revision, dtype=torch_dtype(src.dtype))
    processor = AutoProcessor.from_pretrained(src.id, revision=revision)
    # The PIL image processor, as LLaVA's (transformers 4.31's CLIPImageProcessor): transformers 5
    # picks the torchvision one where torchvision is installed, whose bicubic resize differs a little.
    processor.image_processor = AutoImageProcessor.from_pretrained(src.id, revision=revision, backend="pil")
    processor.tokenizer.padding_side = "left"
    return LlavaJudge(model=model.to(device).eval(), processor=processor)
