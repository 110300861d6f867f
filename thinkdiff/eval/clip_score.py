"""CoBSAT's secondary metric: the CLIP similarity of a generated image to its expected caption, and
whether CLIP picks the expected items among the options, as CoBSAT's evaluation_icl.py computes
them (`eval_clip` and `get_clip_similarity`, lines 14-121, CoBSAT a787be5; docs/cobsat.md).

For one image CLIP (`openai/clip-vit-base-patch32` in CoBSAT, float32) embeds 23 texts: the
expected detail, the expected object, "{detail} {object}", the ten object options, then the ten
detail options. A similarity is CLIP's logit, logit_scale.exp() (100 for the trained model) times
the cosine of the two normalised embeddings, floored at 0. The expected detail and object are
written as CoBSAT writes them: the query's x as its display word ("wireframe", "amusement park"),
theta and the options as file ids ("3d", "park").

Per image the scorer gives the fields of a results row:
- clip_similarity: similarity to "{detail} {object}" (CoBSAT's clip_similarity_overall, the one
  its summary averages), clip_similarity_detail and clip_similarity_object;
- clip_detail, clip_object: the option (1..10) of highest similarity among the detail options and
  among the object options (the first on a tie, as numpy's argmax);
- clip_correct: both are the expected options (CoBSAT's clip_correct, also averaged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.eval.cobsat import ITEMS, Prompt, display
from thinkdiff.models.common import default_device, torch_dtype

log = logging.getLogger(__name__)

CLIP_TEXT_TOKENS = 77  # CoBSAT truncates each text to CLIP's context (evaluation_icl.py line 74)
FIELDS = ("clip_similarity", "clip_similarity_detail", "clip_similarity_object", "clip_detail", "clip_object",
          "clip_correct")


def clip_texts(prompt: Prompt) -> list[str]:
    """CoBSAT's 23 CLIP texts for one prompt, in its order (evaluation_icl.py line 69): expected
    detail, expected object, both, the object options, the detail options. The query's x is written
    as its display word and theta as its file id, as CoBSAT's ground truth has them (load_dataset.py
    lines 24 and 51, evaluation_icl.py lines 540-545)."""
    task = prompt.task
    x, theta = display(prompt.x_items[-1]), prompt.theta
    detail, obj = (x, theta) if task.x_is_attribute else (theta, x)
    return [detail, obj, f"{detail} {obj}", *ITEMS[task.object], *ITEMS[task.attribute]]


@dataclass
class ClipScorer:
    model: CLIPModel
    processor: CLIPProcessor

    @torch.no_grad()
    def similarities(self, images: list[Image.Image], prompts: list[Prompt]) -> list[list[float]]:
        """Per image, its similarity to each of its prompt's `clip_texts`. One CLIP forward for the batch:
        its images and the distinct texts of its prompts (CLIP embeds each text on its own, so this
        equals CoBSAT's one image with its 23 texts at a time)."""
        texts_per_image = [clip_texts(p) for p in prompts]
        texts = list(dict.fromkeys(t for ts in texts_per_image for t in ts))
        column = {t: k for k, t in enumerate(texts)}
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True,
                               max_length=CLIP_TEXT_TOKENS)
        device, dtype = self.model.device, self.model.dtype
        batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        # logits_per_image: logit_scale.exp() x cosine, CoBSAT's similarity before the floor at 0.
        logits = self.model(**batch).logits_per_image.float().clamp(min=0).cpu()
        return [[logits[i, column[t]].item() for t in ts] for i, ts in enumerate(texts_per_image)]

    def __call__(self, images: list[Image.Image], prompts: list[Prompt]) -> list[dict]:
        """The CLIP fields (`FIELDS`) of each image's results row."""
        rows = []
        for prompt, sims in zip(prompts, self.similarities(images, prompts), strict=True):
            task = prompt.task
            objects = sims[3: 3 + len(ITEMS[task.object])]
            details = sims[3 + len(ITEMS[task.object]):]
            # The first maximum on a tie, as numpy's argmax in CoBSAT (floored similarities tie at 0).
            clip_detail = details.index(max(details)) + 1
            clip_object = objects.index(max(objects)) + 1
            expected_detail, expected_object = prompt.expected
            rows.append({
                "clip_similarity": sims[2], "clip_similarity_detail": sims[0], "clip_similarity_object": sims[1],
                "clip_detail": clip_detail, "clip_object": clip_object,
                "clip_correct": (clip_detail == ITEMS[task.attribute].index(expected_detail) + 1
                                 and clip_object == ITEMS[task.object].index(expected_object) + 1),
            })
        return rows


def load_clip_scorer(src: ModelSource, device: torch.device | None = None) -> ClipScorer:
    """The CLIP of `eval.clip_model` (CoBSAT: openai/clip-vit-base-patch32, float32); `tiny` builds one."""
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        from thinkdiff.models.tiny import build_tiny_clip_scorer

        scorer = build_tiny_clip_scorer()
        scorer.model.to(device)
        return scorer
    revision = None if Path(src.id).is_dir() else src.revision
    log.info("loading CLIP scorer %s (revision %s, %s)", src.id, revision, src.dtype)
    model = CLIPModel.from_pretrained(src.id, revision=revision, dtype=torch_dtype(src.dtype))
    # The PIL image processor, as CoBSAT's (transformers 4.31): transformers 5 picks the torchvision
    # one where torchvision is installed, whose bicubic resize differs a little.
    processor = CLIPProcessor(
        image_processor=AutoImageProcessor.from_pretrained(src.id, revision=revision, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(src.id, revision=revision),
    )
    return ClipScorer(model=model.to(device).eval(), processor=processor)
