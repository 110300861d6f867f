"""Covers: CoBSAT's CLIP metric on the tiny CLIP: its 23 texts in CoBSAT's order and spelling (the
query's x as a display word, theta and the options as file ids), similarities equal to CLIP's
floored logit (logit_scale x cosine) computed image by image and text by text, CLIP's choice as the
first argmax over each option list, and clip_correct only when both choices are the expected ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from thinkdiff.eval.clip_score import FIELDS, clip_texts
from thinkdiff.eval.cobsat import ITEMS, build_prompt, get_task
from thinkdiff.models.tiny import build_tiny_clip_scorer

SCORER = build_tiny_clip_scorer()
IMAGES = [Image.effect_noise((40, 30), 60).convert("RGB"), Image.new("RGB", (64, 64), (200, 30, 30)),
          Image.new("RGB", (32, 48), (0, 30, 230))]


def test_texts_as_cobsat_writes_them():
    query_3d = build_prompt(get_task("Style-I"), 2, 35)  # x items origami, old, 3d; theta bag
    assert query_3d.x_items[-1] == "3d" and query_3d.theta == "bag"
    texts = clip_texts(query_3d)
    assert texts[:3] == ["wireframe", "bag", "wireframe bag"]
    assert texts[3:] == list(ITEMS["object"]) + list(ITEMS["style"])  # options as file ids: "3d", not "wireframe"
    theta_park = build_prompt(get_task("Background-II"), 2, 0)  # x items cat, cow, lion; theta park
    assert clip_texts(theta_park)[:3] == ["park", "lion", "park lion"]
    query_park = build_prompt(get_task("Background-I"), 2, 7)  # x items glacier, space, park; theta cow
    assert clip_texts(query_park)[:3] == ["amusement park", "cow", "amusement park cow"]


@torch.no_grad()
def direct_similarities(image: Image.Image, texts: list[str]) -> list[float]:
    """CLIP's logits for one image and each text embedded on its own, floored at 0 (CoBSAT's similarity)."""
    model, processor = SCORER.model, SCORER.processor
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    image_embed = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    sims = []
    for text in texts:
        ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
        text_embed = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        cosine = F.cosine_similarity(image_embed, text_embed).item()
        assert -1 <= cosine <= 1
        sims.append(max(model.logit_scale.exp().item() * cosine, 0.0))
    return sims


def test_similarities_are_clips_floored_logits():
    prompts = [build_prompt(get_task(5), 2, 35), build_prompt(get_task(4), 2, 0), build_prompt(get_task(1), 2, 3)]
    batched = SCORER.similarities(IMAGES, prompts)
    scale = SCORER.model.logit_scale.exp().item()
    for image, prompt, sims in zip(IMAGES, prompts, batched, strict=True):
        assert len(sims) == 23 and all(0 <= s <= scale for s in sims)
        direct = direct_similarities(image, clip_texts(prompt))
        assert torch.allclose(torch.tensor(sims), torch.tensor(direct), atol=1e-5)
    assert any(s > 0 for sims in batched for s in sims) and any(s == 0 for sims in batched for s in sims)
    rows = SCORER(IMAGES, prompts)
    for row, sims in zip(rows, batched, strict=True):
        assert set(row) == set(FIELDS)
        assert (row["clip_similarity_detail"], row["clip_similarity_object"], row["clip_similarity"]) == tuple(sims[:3])


def test_clip_choice_is_the_first_argmax_and_correct_needs_both():
    image, task = IMAGES[0], get_task(1)
    sims = SCORER.similarities([image], [build_prompt(task, 2, 0)])[0]
    objects, details = sims[3:13], sims[13:]
    # The first maximum, as numpy's argmax (ties happen: similarities are floored at 0).
    chosen_detail = next(k for k, s in enumerate(details) if s == max(details)) + 1
    chosen_object = next(k for k, s in enumerate(objects) if s == max(objects)) + 1
    [row] = SCORER([image], [build_prompt(task, 2, 0)])
    assert (row["clip_detail"], row["clip_object"]) == (chosen_detail, chosen_object)
    # The options' similarities do not depend on the prompt: the prompt whose expected items are
    # CLIP's choices is correct, prompts with one of the two expected are not.
    chosen = (ITEMS["color"][chosen_detail - 1], ITEMS["object"][chosen_object - 1])
    prompts = [build_prompt(task, 2, i) for i in range(1000)]
    hit = next(p for p in prompts if p.expected == chosen)
    detail_only = next(p for p in prompts if p.expected[0] == chosen[0] and p.expected[1] != chosen[1])
    object_only = next(p for p in prompts if p.expected[0] != chosen[0] and p.expected[1] == chosen[1])
    rows = SCORER([image] * 3, [hit, detail_only, object_only])
    assert [r["clip_correct"] for r in rows] == [True, False, False]
    assert all((r["clip_detail"], r["clip_object"]) == (chosen_detail, chosen_object) for r in rows)
