"""Covers: the VLM judges (LLaVA-1.5 layout and Qwen2-VL, tiny offline builds of the real classes)
ask the two exact questions about every image of a batch in one generate(), reply as they would
image by image, decode only the generated reply (up to CoBSAT's 512 tokens, ending at EOS) and
parse it by digit concatenation into a Verdict that keeps the raw replies; the LLaVA judge pads
each image to a square with the processor's mean colour as CoBSAT's judge does; the synthetic
judge's verdicts; judge labels; an evaluation runs end to end with the LLaVA judge."""

from __future__ import annotations

import json

import torch
from PIL import Image

from thinkdiff.config import load_config
from thinkdiff.eval import stage
from thinkdiff.eval.cobsat import ITEMS, Verdict, get_task, judge_questions
from thinkdiff.eval.dataset import render_item
from thinkdiff.eval.judge import (
    LLAVA_IMAGE,
    MAX_ANSWER_TOKENS,
    Qwen2VLJudge,
    judge_label,
    synthetic_judge,
)
from thinkdiff.models.tiny import build_tiny_llava_judge, build_tiny_vlm

IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))
# Different pictures and tasks whose questions differ in length, so the batch is padded.
IMAGES = [IMAGE, Image.new("RGB", (64, 64), (0, 200, 200)), Image.effect_noise((64, 64), 60).convert("RGB")]
TASKS = [get_task(1), get_task(4), get_task(9)]


def scripted(tokenizer, model, replies):
    """Make model.generate append fixed replies (what a judge model would answer)."""

    def generate(input_ids, **kwargs):
        tails = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
        width = max(len(t) for t in tails)
        pad = tokenizer.pad_token_id
        tails = torch.tensor([t + [pad] * (width - len(t)) for t in tails])
        return torch.cat([input_ids, tails], dim=1)

    model.generate = generate


def test_llava_judge_asks_both_exact_questions():
    judge = build_tiny_llava_judge()
    task = get_task(4)
    batch = judge.inputs([IMAGE], [task])
    texts = judge.processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=False)
    for text, question in zip(texts, judge_questions(task), strict=True):
        # CoBSAT's judge prompt: LLaVA's llava_v1 conversation (system line, one user turn).
        assert text.endswith("A chat between a curious human and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the human's questions. "
                             f"USER: {LLAVA_IMAGE * 4}\n{question} ASSISTANT:")
    assert batch["pixel_values"].shape[0] == 2


def test_llava_judge_pads_each_image_to_a_square_with_the_mean_colour():
    judge = build_tiny_llava_judge()
    image_processor = judge.processor.image_processor
    mean = tuple(int(x * 255) for x in image_processor.image_mean)  # LLaVA's expand2square background
    wide = Image.effect_noise((64, 31), 60).convert("RGB")
    tall = Image.effect_noise((20, 48), 90).convert("RGB")
    wide_square = Image.new("RGB", (64, 64), mean)
    wide_square.paste(wide, (0, (64 - 31) // 2))
    tall_square = Image.new("RGB", (48, 48), mean)
    tall_square.paste(tall, ((48 - 20) // 2, 0))
    pixels = judge.inputs([wide, tall], [get_task(1), get_task(2)])["pixel_values"]
    assert pixels.shape[0] == 4 and torch.equal(pixels[0], pixels[1])  # both questions see the same image
    for got, image, square in ((pixels[0], wide, wide_square), (pixels[2], tall, tall_square)):
        assert torch.equal(got, image_processor(square, return_tensors="pt")["pixel_values"][0])
        cropped = image_processor(image, return_tensors="pt")["pixel_values"][0]  # the processor alone centre-crops
        assert got.shape == cropped.shape and not torch.allclose(got, cropped, atol=0.1)


def test_llava_judge_replies_run_to_eos_within_512_tokens():
    judge = build_tiny_llava_judge()
    generate, seen = judge.model.generate, {}

    def recording(**kwargs):
        seen.update(kwargs, out=generate(**kwargs))
        return seen["out"]

    judge.model.generate = recording
    replies = judge.replies(IMAGES, TASKS)
    tokenizer = judge.processor.tokenizer
    assert seen["max_new_tokens"] == MAX_ANSWER_TOKENS == 512 and seen["do_sample"] is False
    lengths = []
    for row, reply in zip(seen["out"][:, seen["input_ids"].shape[1]:].tolist(), replies, strict=True):
        # The tiny judge ends every reply at its EOS (<|im_end|>) before 512 tokens; nothing after
        # the EOS is in the reply, which is stripped as LLaVA strips it.
        assert tokenizer.eos_token_id in row
        lengths.append(row.index(tokenizer.eos_token_id))
        assert reply == tokenizer.decode(row[:lengths[-1]], skip_special_tokens=True).strip()
    assert max(lengths) > 8 and len(set(lengths)) > 1  # longer than the old 8-token cut; rows end apart


def test_llava_judge_batch_replies_as_image_by_image():
    judge = build_tiny_llava_judge()
    batch = judge.inputs(IMAGES, TASKS)
    assert batch["pixel_values"].shape[0] == 6 and (batch["attention_mask"] == 0).any()  # padded rows
    one_by_one = [reply for image, task in zip(IMAGES, TASKS, strict=True) for reply in judge.replies([image], [task])]
    # Rows of the batch end at EOS at different steps (the test above): the finished ones wait padded.
    assert judge.replies(IMAGES, TASKS) == one_by_one
    assert len(set(one_by_one)) > 1  # the replies differ, so a mixed-up row order would show


def test_qwen2vl_judge_batch_replies_as_image_by_image():
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for weight in (p for p in vlm.model.parameters() if p.dim() >= 2):
            weight.normal_(0, 0.2)  # at the default 0.02 the tiny model replies the same to every input
        vlm.model.lm_head.weight[vlm.eos_token_ids] *= 1.5  # replies end at EOS after tens of tokens, not 512
    judge = Qwen2VLJudge(vlm, "You are a helpful assistant.")
    one_by_one = [reply for image, task in zip(IMAGES, TASKS, strict=True) for reply in judge.replies([image], [task])]
    assert judge.replies(IMAGES, TASKS) == one_by_one
    assert len(set(one_by_one)) > 1


def test_llava_judge_parses_replies():
    judge = build_tiny_llava_judge()
    scripted(judge.processor.tokenizer, judge.model, [" (3)", "1 0", "none", "11"])
    assert judge([IMAGE, IMAGE], [get_task(1), get_task(2)]) == [Verdict(3, 10, ("(3)", "1 0")),
                                                                 Verdict(-1, -1, ("none", "11"))]


def test_qwen2vl_judge():
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    judge = Qwen2VLJudge(vlm, "You are a helpful assistant.")
    scripted(vlm.tokenizer, vlm.model, ["7", "Answer: 2"])
    assert judge([IMAGE], [get_task(9)]) == [Verdict(7, 2, ("7", "Answer: 2"))]


def test_synthetic_judge_verdicts():
    task = get_task("Background-II")
    image = render_item("background", "park", "animal", "lion", 96)
    detail, obj = ITEMS["background"].index("park") + 1, ITEMS["animal"].index("lion") + 1
    assert synthetic_judge([image], [task]) == [Verdict(detail, obj, (str(detail), str(obj)))]


def test_judge_labels():
    label = lambda *overrides: judge_label(load_config("paper-lvlm", list(overrides)))  # noqa: E731
    assert label() == "LLaVA-1.5-13B (CoBSAT's judge)"
    assert "not CoBSAT's judge" not in label("eval.judge_model.dtype=bfloat16")
    assert "bfloat16" in label("eval.judge_model.dtype=bfloat16")
    assert label("eval.judge=qwen2-vl", "eval.judge_model.id=Qwen/Qwen2-VL-7B-Instruct") == \
        "Qwen2-VL-7B-Instruct as qwen2-vl judge (not CoBSAT's judge)"
    assert label("eval.judge_model.id=llava-hf/llava-1.5-7b-hf").endswith("(not CoBSAT's judge)")
    assert judge_label(load_config("tiny")) == "synthetic reader (not CoBSAT's judge)"
    assert judge_label(load_config("tiny", ["eval.judge=llava"])).endswith("(not CoBSAT's judge)")


def test_evaluation_with_the_llava_judge(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle", "eval.judge=llava",
                               "eval.limit=2", "eval.tasks=[1]", "eval.shots=[2]"])
    result = stage.evaluate_cobsat(cfg)
    rows = [json.loads(line) for line in result.results_jsonl.read_text().splitlines()]
    # One fixed batch of eval.batch_size prompts ran; the summary scores the first eval.limit of them.
    assert [r["index"] for r in rows] == list(range(cfg.eval.batch_size)) and result.summary.num_prompts == 2
    assert result.summary.judge_s_per_prompt > 0
