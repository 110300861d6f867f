"""CoBSAT judging throughput: image by image (the harness before) vs a whole generator batch, same run.

    .venv/bin/python benchmarks/cobsat_judge.py            # LLaVA-1.5-13B shapes, 336 px: a GPU
    .venv/bin/python benchmarks/cobsat_judge.py --tiny     # tiny shapes on a CPU in seconds (a test runs it)

Workload: `LlavaJudge`, the official judge of `thinkdiff cobsat eval`, with random weights at
LLaVA-1.5-13B shapes (CLIP ViT-L/14 at 336 px, 576 image tokens, Llama 13B) in the paper presets'
judge dtype (float16, as CoBSAT's), the two exact CoBSAT questions per image (greedy), 512 px
images of random pixels, tasks taken in turn. The tokenizer is the offline byte-level one with
merges learned from the questions, so a question has about as many tokens as with LLaMA's own.
- naive: one generate() per image (its two questions), what the harness did before.
- project: one generate() per generator batch (eval.batch_size images, two rows each), what the
  harness does now.
The judge may answer up to 512 tokens (CoBSAT's limit), but a trained judge stops at its EOS after
a 1-3 token answer, while random weights rarely pick EOS and would decode all 512: both paths
decode --answer-tokens (default 8) instead, an upper bound of a trained judge's cost. The batched
replies are compared with the image-by-image ones (the same in fp32; fp16 may round a row
differently).
"""
from __future__ import annotations

import argparse

import torch
from extract_features import images
from timing import sync

from thinkdiff.config import load_config
from thinkdiff.eval.cobsat import TASKS, judge_questions
from thinkdiff.eval.judge import LlavaJudge, llava_prompt
from thinkdiff.models.common import torch_dtype
from thinkdiff.models.tiny import TINY_LLAVA_TEXT, TINY_LLAVA_VISION, build_random_llava_judge

LLAVA_15_13B_TEXT = dict(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                         num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-5)
LLAVA_15_13B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768)


def timed(device: torch.device, fn, batches) -> tuple[float, list[str]]:
    """Seconds per image over `batches` (lists of (image, task)), and the replies in order."""
    replies = []
    started = sync(device)
    for batch in batches:
        replies += fn([im for im, _ in batch], [t for _, t in batch])
    seconds = sync(device) - started
    return seconds / sum(len(b) for b in batches), replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per judge call (default: paper-lvlm's eval.batch_size)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per path, after one warm-up batch")
    parser.add_argument("--answer-tokens", type=int, default=8,
                        help="tokens each reply decodes (random weights never stop early; "
                             "a trained judge's answer fits in 8)")
    args = parser.parse_args()
    paper = load_config("paper-lvlm").eval
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch_dtype(paper.judge_model.dtype)
    size = args.batch or paper.batch_size
    corpus = [llava_prompt(q, image="") for task in TASKS for q in judge_questions(task)]
    torch.set_default_dtype(dtype)
    with torch.device(device):
        judge: LlavaJudge = (
            build_random_llava_judge(TINY_LLAVA_TEXT, TINY_LLAVA_VISION, tokenizer_corpus=corpus) if args.tiny
            else build_random_llava_judge(LLAVA_15_13B_TEXT, LLAVA_15_13B_VISION, tokenizer_corpus=corpus))
    torch.set_default_dtype(torch.float32)
    judge.max_new_tokens = args.answer_tokens
    params = sum(p.numel() for p in judge.model.parameters()) / 1e9
    pics = images((args.batches + 1) * size, 64 if args.tiny else 512, seed=0)
    work = [(im, TASKS[k % len(TASKS)]) for k, im in enumerate(pics)]
    warmup, timed_work = work[:size], work[size:]
    rows = judge.inputs([warmup[0][0]], [warmup[0][1]])["input_ids"].shape[1]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{params:.2f}B params, {rows}-token rows (first question), batch {size} images = {2 * size} rows, "
          f"{args.answer_tokens} answer tokens")
    judge.replies([im for im, _ in warmup], [t for _, t in warmup])  # warm-up: allocator, kernels, both shapes
    judge.replies([warmup[0][0]], [warmup[0][1]])
    naive_s, naive_replies = timed(device, judge.replies, [[pair] for pair in timed_work])
    print(f"naive done: {naive_s:.3f} s/image", flush=True)
    project_s, project_replies = timed(device, judge.replies,
                                       [timed_work[k: k + size] for k in range(0, len(timed_work), size)])
    same = sum(a == b for a, b in zip(naive_replies, project_replies, strict=True))
    print("| path | images per call | s/image | images/s | 20,000 images (a full CoBSAT run) |")
    print("|---|---|---|---|---|")
    for name, per_call, s in (("naive", 1, naive_s), ("project", size, project_s)):
        print(f"| {name} | {per_call} | {s:.3f} | {1 / s:.2f} | {20_000 * s / 3600:.2f} h |")
    print(f"ratio project / naive: {naive_s / project_s:.2f}x; replies equal to the image-by-image ones: "
          f"{same}/{len(naive_replies)}")


if __name__ == "__main__":
    main()
