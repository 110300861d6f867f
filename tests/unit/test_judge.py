"""Covers: the VLM judges (LLaVA-1.5 layout and Qwen2-VL, tiny offline builds of the real classes)
ask the two exact questions about every image of a batch in one generate(), reply as they would
image by image, decode only the generated reply and parse it by digit concatenation; an evaluation
runs end to end with the LLaVA judge."""

from __future__ import annotations

import json

import torch
from PIL import Image

from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.eval.cobsat import get_task, judge_questions
from thinkdiff.eval.judge import LLAVA_IMAGE, Qwen2VLJudge, build_tiny_llava_judge
from thinkdiff.models.vlm import build_tiny_vlm

IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))
# Different pictures and tasks whose questions differ in length, so the batch is padded.
IMAGES = [IMAGE, Image.new("RGB", (64, 64), (20, 180, 40)), Image.effect_noise((64, 64), 60).convert("RGB")]
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
        assert text.endswith("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
                             f"detailed, and polite answers to the human's questions. USER: {LLAVA_IMAGE * 4}\n{question} ASSISTANT:")
    assert batch["pixel_values"].shape[0] == 2


def test_llava_judge_batch_replies_as_image_by_image():
    judge = build_tiny_llava_judge()
    batch = judge.inputs(IMAGES, TASKS)
    assert batch["pixel_values"].shape[0] == 6 and (batch["attention_mask"] == 0).any()  # padded rows
    one_by_one = [reply for image, task in zip(IMAGES, TASKS, strict=True) for reply in judge.replies([image], [task])]
    assert judge.replies(IMAGES, TASKS) == one_by_one
    assert len(set(one_by_one)) > 1  # the replies differ, so a mixed-up row order would show


def test_qwen2vl_judge_batch_replies_as_image_by_image():
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for weight in (p for p in vlm.model.parameters() if p.dim() >= 2):
            weight.normal_(0, 0.2)  # at the default 0.02 the tiny model replies the same to every input
    judge = Qwen2VLJudge(vlm, "You are a helpful assistant.")
    one_by_one = [reply for image, task in zip(IMAGES, TASKS, strict=True) for reply in judge.replies([image], [task])]
    assert judge.replies(IMAGES, TASKS) == one_by_one
    assert len(set(one_by_one)) > 1


def test_llava_judge_parses_replies():
    judge = build_tiny_llava_judge()
    scripted(judge.processor.tokenizer, judge.model, ["(3)", "1 0", "none", "11"])
    assert judge([IMAGE, IMAGE], [get_task(1), get_task(2)]) == [(3, 10), (-1, -1)]


def test_qwen2vl_judge():
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    judge = Qwen2VLJudge(vlm, "You are a helpful assistant.")
    scripted(vlm.tokenizer, vlm.model, ["7", "Answer: 2"])
    assert judge([IMAGE], [get_task(9)]) == [(7, 2)]


def test_evaluation_with_the_llava_judge(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle", "eval.judge=llava",
                               "eval.limit=2", "eval.tasks=[1]", "eval.shots=[2]"])
    result = pipeline.evaluate_cobsat(cfg)
    rows = [json.loads(line) for line in (result["dir"] / "results.jsonl").read_text().splitlines()]
    # One fixed batch of eval.batch_size prompts ran; the summary scores the first eval.limit of them.
    assert [r["index"] for r in rows] == list(range(cfg.eval.batch_size)) and result["summary"].num_prompts == 2
    assert result["summary"].judge_s_per_prompt > 0
