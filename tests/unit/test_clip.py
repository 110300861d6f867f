"""Covers ThinkDiff-CLIP: vision tokens (CLS + patch grid bilinearly downsampled by 2), BLIP-2
vision weights read alone from a full checkpoint, features with the url list's captions, the
caption split at a uniformly random word (after BLIP's caption normalisation; a one-word caption
kept, its part 1 empty), the encoder-state layout [aligner(image) ; T5enc(part 1)],
training through the same loop, and composition: [aligner(img_1) ; aligner(img_2) ; FLUX-T5(text)]
with pooled CLIP from the text (or "")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, T5Config

from thinkdiff import pipeline
from thinkdiff.config import ModelSource, load_config
from thinkdiff.data.features import FEATURE_KIND_CLIP, FeatureStore, StoredFeatures
from thinkdiff.eval import stage
from thinkdiff.generate import build_composer
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.attention import gather_slots
from thinkdiff.models.t5 import IGNORE_INDEX, load_t5
from thinkdiff.models.tiny import build_tiny_vision
from thinkdiff.models.vision import load_vision
from thinkdiff.train.data import CaptionSplitCollator, Sample, blip_caption
from thinkdiff.train.loop import encoder_states

CPU = torch.device("cpu")
RED, BLUE = Image.new("RGB", (70, 50), (220, 20, 20)), Image.new("RGB", (56, 56), (0, 60, 220))


def test_vision_tokens_are_cls_plus_downsampled_grid():
    vision = build_tiny_vision(image_size=56)
    tokens = vision.tokens([RED, BLUE])
    assert tokens.shape == (2, 1 + 2 * 2, 48)
    pixels = vision.processor(images=[RED, BLUE], return_tensors="pt")["pixel_values"]
    hidden = vision.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tokens[:, 0], hidden[:, 0])
    grid = hidden[:, 1:].reshape(2, 4, 4, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:], expected)


def test_blip2_vision_weights_load_alone(tmp_path):
    config = Blip2Config(
        vision_config=build_tiny_vision().model.config.to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=37, encoder_hidden_size=48, vocab_size=99).to_dict(),
        text_config=T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                             decoder_start_token_id=0, pad_token_id=0).to_dict(),
        num_query_tokens=2)
    full = Blip2ForConditionalGeneration(config)
    full.save_pretrained(tmp_path / "blip2")
    vision = load_vision(ModelSource(id=str(tmp_path / "blip2"), revision="main", dtype="float32"),
                         image_size=56, device=CPU)
    reference = full.vision_model.state_dict()
    assert vision.model.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in vision.model.state_dict().items())


def test_caption_split_at_a_uniform_word():
    t5 = load_t5(ModelSource(id="tiny", revision="tiny-v1", dtype="float32"), device=CPU).tokenizer
    # ByT5 counts bytes: 64 keeps the whole caption, so the two parts can be compared to it.
    collate = CaptionSplitCollator(t5, max_prefix_tokens=64, max_target_tokens=64, seed=0)
    caption = "a small red circle on a blue background"
    samples = [Sample(token_ids=[], features=StoredFeatures.encode(torch.randn(5, 48)), text=caption)]
    seen = set()
    for step in range(200):
        batch = collate(samples, step)
        prefix = t5.decode(batch.prefix_ids_BP[0], skip_special_tokens=True)
        labels = batch.labels_BT[0]
        target = t5.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert f"{prefix} {target}" == caption
        seen.add(len(prefix.split()))
        assert labels[labels != IGNORE_INDEX][-1] == t5.eos_token_id
        assert batch.source_mask_BS.tolist() == [[1] * 5]
    assert seen == set(range(1, 8))  # every split point of the 8 words occurs
    short = CaptionSplitCollator(t5, max_prefix_tokens=32, max_target_tokens=8, seed=0)(samples, 0)
    assert short.labels_BT.shape[1] == 8 and short.prefix_ids_BP.shape[1] <= 32
    assert short.labels_BT[0, -1] == t5.eos_token_id  # truncated, </s> kept


def test_blip_captions_are_normalised_as_lavis_does():
    """train.blip_captions: LAVIS's BlipCaptionProcessor.pre_caption (the release's text processor):
    lower case, . ! " ( ) * # : ; ~ become spaces, runs of whitespace one space, the ends trimmed,
    at most 50 words; other punctuation stays."""
    assert blip_caption('A Dog: "Runs" (fast)!!  on the BEACH.\n') == "a dog runs fast on the beach"
    assert blip_caption("it's a dog, ok-ish? 3~4*#;x") == "it's a dog, ok-ish? 3 4 x"
    assert blip_caption("...!!") == ""
    many = " ".join(f"Word{i}" for i in range(70))
    assert blip_caption(many) == " ".join(f"word{i}" for i in range(50))
    t5 = load_t5(ModelSource(id="tiny", revision="tiny-v1", dtype="float32"), device=CPU).tokenizer
    caption = 'Two RED hats: "summer" (2019).'
    for blip in (True, False):
        collate = CaptionSplitCollator(t5, max_prefix_tokens=64, max_target_tokens=64, seed=0, blip_captions=blip)
        batch = collate([Sample([], StoredFeatures.encode(torch.randn(5, 48)), caption)], 0)
        labels = batch.labels_BT[0]
        parts = [t5.decode(ids, skip_special_tokens=True)
                 for ids in (batch.prefix_ids_BP[0], labels[labels != IGNORE_INDEX])]
        assert " ".join(parts) == (blip_caption(caption) if blip else caption)


def test_one_word_captions_train_with_an_empty_part_1():
    """As the release's random_split_string: a one-word caption is all target, and part 1 is the
    tokenized empty string, </s> alone, which the frozen T5 encoder reads like any other part 1.
    A caption with no word left after normalisation has nothing to predict and is skipped."""
    t5 = load_t5(ModelSource(id="tiny", revision="tiny-v1", dtype="float32"), device=CPU, keep_encoder=True)
    collate = CaptionSplitCollator(t5.tokenizer, max_prefix_tokens=32, max_target_tokens=32, seed=0, blip_captions=True)
    samples = [Sample([], StoredFeatures.encode(torch.randn(5, 48)), "Sunset!"),
               Sample([], StoredFeatures.encode(torch.randn(5, 48)), "two blue hats")]
    assert all(collate.usable(s) for s in samples)
    assert not collate.usable(Sample([], StoredFeatures.encode(torch.randn(5, 48)), " ... ")) and not collate.usable(
        Sample([], StoredFeatures.encode(torch.randn(5, 48)), ""))
    for step in range(20):
        batch = collate(samples, step)
        empty = t5.tokenizer("")["input_ids"]
        assert empty == [t5.tokenizer.eos_token_id]
        assert batch.prefix_ids_BP[0, : batch.prefix_mask_BP[0].sum()].tolist() == empty
        labels = batch.labels_BT[0]
        assert labels[labels != IGNORE_INDEX].tolist() == t5.tokenizer("sunset")["input_ids"]
        assert batch.prefix_mask_BP[1].sum() > 1  # two or more words: part 1 holds at least one
    aligner = Aligner(AlignerConfig(in_dim=48, out_dim=32))
    rows, slots = encoder_states(aligner, t5.encoder, batch)
    assert (slots[0] >= 0).sum() == 5 + 1 and torch.isfinite(rows).all()
    states = gather_slots(rows, slots)
    expected = t5.encoder(input_ids=torch.tensor([empty])).last_hidden_state
    torch.testing.assert_close(states[0, 5:6], expected[0])
    loss = t5.decoder_lm.loss(rows, slots, batch.labels_BT)
    assert torch.isfinite(loss)


def test_encoder_states_layout():
    """ThinkDiff-CLIP: each sample's slots hold its aligned image rows, then its caption prefix
    through the T5 encoder (padding: -1)."""
    t5 = load_t5(ModelSource(id="tiny", revision="tiny-v1", dtype="float32"), device=CPU, keep_encoder=True)
    collate = CaptionSplitCollator(t5.tokenizer, max_prefix_tokens=32, max_target_tokens=32, seed=0)
    batch = collate([Sample([], StoredFeatures.encode(torch.randn(5, 48)), "a red car on a beach"),
                     Sample([], StoredFeatures.encode(torch.randn(5, 48)), "two blue hats")], 3)
    aligner = Aligner(AlignerConfig(in_dim=48, out_dim=32))
    rows, slots = encoder_states(aligner, t5.encoder, batch)
    width = batch.prefix_ids_BP.shape[1]
    assert (slots.shape == (2, 5 + width) and torch.equal(slots[:, 5:] >= 0, batch.prefix_mask_BP.bool())
            and (slots[:, :5] >= 0).all())
    states = gather_slots(rows, slots)
    torch.testing.assert_close(states[:, :5], aligner(batch.features_RD).view(2, 5, 32))
    expected = t5.encoder(input_ids=batch.prefix_ids_BP, attention_mask=batch.prefix_mask_BP).last_hidden_state
    real = batch.prefix_mask_BP.bool()
    torch.testing.assert_close(states[:, 5:][real], expected[real])


def test_clip_variant_trains_and_composes(demo_corpus, tmp_path):
    _, corpus_dir = demo_corpus
    cfg = load_config("tiny-clip", [f"paths.root={tmp_path}", "train.max_steps=30", "train.warmup_steps=3",
                                    "train.log_every=10"])
    features = pipeline.cache_features(cfg, corpus_dir)
    store = FeatureStore(features, expect_model_id="tiny")
    assert store.info.feature_kind == FEATURE_KIND_CLIP and store.info.dim == 48
    rows = list(store.iter_records(("text", "num_rows", "token_ids")))
    assert all(r["num_rows"] == 5 and r["token_ids"] == [] and r["text"].endswith("background") for r in rows)
    result = pipeline.train_aligner(cfg, features)  # made from the demo corpus, not this config's own
    assert result.step == 30
    composer = build_composer(cfg, str(result.aligner_dir))
    embeds, pooled = composer.prompt_embeds([RED, BLUE], "on a beach")
    # FLUX's T5 embedding of the text at eval.clip_text_tokens (the release: 128), not diffusers' 512.
    text_embeds, text_pooled, _ = composer.flux.pipe.encode_prompt(prompt="on a beach", prompt_2="on a beach",
                                                                   device=CPU,
                                                                   max_sequence_length=cfg.eval.clip_text_tokens)
    assert embeds.shape == (1, 5 + 5 + cfg.eval.clip_text_tokens, 32)
    with torch.no_grad():
        aligned = composer.aligner(composer.vision.tokens([RED, BLUE]))
    torch.testing.assert_close(embeds[0, :5], aligned[0])
    torch.testing.assert_close(embeds[0, 5:10], aligned[1])
    torch.testing.assert_close(embeds[:, 10:], text_embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, text_pooled, rtol=1e-4, atol=1e-4)
    # No text: the T5 embedding of "" is appended all the same, as the release does; pooled CLIP of "".
    no_text, empty_pooled = composer.prompt_embeds([RED], None)
    empty_embeds, _, _ = composer.flux.pipe.encode_prompt(prompt="", prompt_2="", device=CPU, max_sequence_length=128)
    assert no_text.shape == (1, 5 + 128, 32)
    torch.testing.assert_close(no_text[:, 5:], empty_embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(empty_pooled, composer.flux.pooled_clip(""), rtol=1e-4, atol=1e-4)
    image = composer.compose([RED, BLUE], "on a beach", seed=0)
    assert image.size == (cfg.eval.image_size, cfg.eval.image_size)
    # CoBSAT is the LVLM's benchmark: the pipeline skips it for this variant.
    assert stage.evaluate_cobsat(cfg).skipped
