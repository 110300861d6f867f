"""Covers: the ThinkDiff CoBSAT prompt to the VLM (exact strings, picture labels), exactly
gen_tokens generated tokens with every stop token banned on both decode paths, the inference pixel
limits, results rows that keep the VLM's prompt and answer, the aligner output reaching FLUX as prompt_embeds
(other embeddings, another image) with the pooled CLIP of "", seeded images, the text-bridge path,
a clear error for an aligner trained for other models, and models loaded once per process."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from thinkdiff.config import load_config
from thinkdiff.eval.cobsat import build_prompt, get_task
from thinkdiff.eval.dataset import make_synthetic_dataset
from thinkdiff.generate import (
    COBSAT_INSTRUCTION,
    TextBridgeGenerator,
    ThinkDiffGenerator,
    build_generator,
    cobsat_parts,
    vlm_answers,
)
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.flux import load_flux
from thinkdiff.models.tiny import build_tiny_vlm
from thinkdiff.models.vlm import encode_chat, generate_with_states, render_chat

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts_env(tmp_path_factory):
    cfg = load_config("tiny", [f"paths.root={tmp_path_factory.mktemp('gen')}"])
    data = make_synthetic_dataset(tmp_path_factory.mktemp("cobsat"), 64)
    vlm = build_tiny_vlm(min_pixels=cfg.features.min_pixels, max_pixels=cfg.features.max_pixels)
    flux = load_flux(cfg.models.flux, device=CPU)
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(in_dim=vlm.hidden_size, out_dim=flux.joint_dim))
    return cfg, data, vlm, flux, aligner


def test_cobsat_parts_follow_the_reference_prompt(parts_env):
    cfg, data, *_ = parts_env
    prompt = build_prompt(get_task(1), 2, 0)
    parts = cobsat_parts(prompt, data)
    assert parts[0] == COBSAT_INSTRUCTION and parts[0].endswith("start the answer with 'Create an image'.\n\n")
    texts = [p for p in parts[1:] if isinstance(p, str)]
    assert texts == ["Word 1: blue, ", "\n\nWord 2: brown, ", "\n\nWord 3: orange, "]
    assert [type(p) for p in parts[1:]] == [str, Image.Image, str, Image.Image, str]


def favour_stop_tokens(vlm):
    """Makes every stop token by far the likeliest next token, on both decode paths (they all call lm_head)."""
    stop = torch.tensor(vlm.eos_token_ids)

    def boost(module, inputs, logits):
        logits = logits.clone()
        logits[..., stop] += 30.0
        return logits

    return vlm.model.lm_head.register_forward_hook(boost)


def test_stop_tokens_are_banned_on_both_decode_paths():
    """The ThinkDiff generator's decoding: exactly gen_tokens ids, none of them a stop token, even when
    the model would end its turn at once; the static (decode loop) and dynamic (HF generate) paths
    agree on ids and states."""
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    assert {vlm.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} <= set(vlm.eos_token_ids)
    assert (vlm.tokenizer.eos_token_id in vlm.eos_token_ids
            and vlm.model.generation_config.eos_token_id in vlm.eos_token_ids)
    hook = favour_stop_tokens(vlm)
    batch = encode_chat(vlm, [[Image.new("RGB", (56, 56)), "hi"],
                              [Image.new("RGB", (56, 56), "red"), "a longer question"]], "sys")
    sample = dict(max_new_tokens=128, temperature=0.6, top_p=0.9, seed=0)
    try:
        stopped = generate_with_states(vlm, batch, **sample)
        assert all(len(s.token_ids) < 128 and s.token_ids[-1] in vlm.eos_token_ids for s in stopped)  # the boost works
        paths = {path: generate_with_states(vlm, batch, **sample, ban_eos=True, kv_cache=path)
                 for path in ("static", "dynamic")}
    finally:
        hook.remove()
    for static, dynamic in zip(paths["static"], paths["dynamic"], strict=True):
        assert len(static.token_ids) == 128 and static.states_LD.shape == (128, vlm.hidden_size)
        assert not set(static.token_ids) & set(vlm.eos_token_ids)
        assert static.token_ids == dynamic.token_ids
        torch.testing.assert_close(static.states_LD, dynamic.states_LD, rtol=1e-4, atol=1e-4)


def test_thinkdiff_generator_bans_stop_tokens(parts_env, monkeypatch):
    import thinkdiff.generate as generate

    cfg, data, _, flux, aligner = parts_env
    vlm = build_tiny_vlm(min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels)
    generator = ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg)
    answers = []
    monkeypatch.setattr(generate, "generate_with_states",
                        lambda *a, **k: answers.extend(generate_with_states(*a, **k)) or answers)
    hook = favour_stop_tokens(vlm)
    try:
        drawing, = generator([build_prompt(get_task(1), 2, 0)], data)
    finally:
        hook.remove()
    (answer,) = answers
    assert len(answer.token_ids) == cfg.eval.gen_tokens and not set(answer.token_ids) & set(vlm.eos_token_ids)
    assert drawing.vlm_text == vlm.tokenizer.decode(answer.token_ids, skip_special_tokens=False)


def test_cobsat_prompt_with_picture_labels_is_the_chat_template_with_vision_ids(parts_env):
    """eval.picture_labels: "Picture k: " before each image, as Qwen2-VL's template renders it with
    add_vision_id=True; the whole rendered prompt of one 2-shot item, pinned."""
    cfg, data, *_ = parts_env
    parts = cobsat_parts(build_prompt(get_task(1), 2, 0), data)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert render_chat(parts, "You are a helpful assistant.", picture_labels=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "I give you several words and pictures. First, please analyse what the next picture is. Then give me a "
        "detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt and "
        "start the answer with 'Create an image'.\n\n"
        f"Word 1: blue, Picture 1: {image}\n\nWord 2: brown, Picture 2: {image}\n\nWord 3: orange, "
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    unlabelled = render_chat(parts, "You are a helpful assistant.")
    assert "Picture" not in unlabelled and unlabelled.count(image) == 2
    # The tokens the VLM reads are that text with each image's merged patches.
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    batch = encode_chat(vlm, [parts], "You are a helpful assistant.", picture_labels=True)
    text = vlm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert text == render_chat(parts, "You are a helpful assistant.", picture_labels=True, image_tokens=[4, 4])


def test_inference_images_have_their_own_pixel_limits(tmp_path):
    """eval.min_pixels / eval.max_pixels size CoBSAT's images for the VLM, apart from the features
    stage's limits; the model itself is the features stage's, held once."""
    from thinkdiff.data.extract import shared_extractor
    from thinkdiff.generate import inference_vlm

    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.max_pixels=12544"])
    vlm = inference_vlm(cfg)
    assert vlm.model is shared_extractor(cfg).model
    wide = Image.new("RGB", (224, 112))
    inference = encode_chat(vlm, [[wide, "hi"]], "sys")["image_grid_thw"]
    features = encode_chat(shared_extractor(cfg), [[wide, "hi"]], "sys")["image_grid_thw"]
    expected = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12544)(images=[wide],
                                                                          return_tensors="pt")["image_grid_thw"]
    assert (torch.equal(inference, expected) and features.tolist() == [[1, 2, 4]]
            and inference.prod() > 4 * features.prod())
    assert build_generator(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, generator="text-bridge")),
                           None).vlm.image_processor.size.longest_edge == 12544


def test_results_keep_what_the_vlm_was_given_and_said(parts_env, tmp_path):
    """Every CoBSAT row of a VLM generator carries the rendered chat, the VLM's whole answer and the
    judge's two replies; the judge reads the image back from its JPEG file; the sample grid shows
    the start of the answer."""
    from thinkdiff.eval import harness
    from thinkdiff.eval.cobsat import Verdict

    cfg, data, _, flux, aligner = parts_env
    vlm = build_tiny_vlm(min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels)
    generator = ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg)
    judged = []

    def judge(images, tasks):
        judged.extend(images)
        return [Verdict(1, 2, ("(1)", "2")) for _ in images]

    harness.evaluate(data, generator, judge, tmp_path, tasks=[1], shots=[2], limit=2, batch_size=2,
                     judge_label="test judge")
    rows = [json.loads(line) for line in (tmp_path / harness.RESULTS).read_text().splitlines()]
    prompts = [build_prompt(get_task(1), 2, i) for i in range(2)]
    drawn = generator(prompts, data)
    for row, prompt, drawing, image in zip(rows, prompts, drawn, judged, strict=True):
        assert row["vlm_prompt"] == render_chat(cobsat_parts(prompt, data), cfg.features.system_prompt,
                                                picture_labels=True)
        assert row["vlm_text"] == drawing.vlm_text and len(drawing.vlm_text) > 0
        assert row["judge_replies"] == ["(1)", "2"] and (row["detail"], row["object"]) == (1, 2)
        saved = Image.open(tmp_path / row["image"])
        assert saved.format == "JPEG" and np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
        # Pillow's default JPEG quality (75), as CoBSAT's inference saves: the judge sees its artefacts.
        buf = io.BytesIO()
        drawing.image.save(buf, format="JPEG")
        assert (tmp_path / row["image"]).read_bytes() == buf.getvalue()
    assert (tmp_path / "samples.png").is_file()


def test_aligned_states_drive_flux(parts_env):
    cfg, data, _, flux, aligner = parts_env
    vlm = build_tiny_vlm(min_pixels=cfg.features.min_pixels, max_pixels=cfg.features.max_pixels)
    generator = ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg)
    assert torch.equal(generator.pooled, flux.pooled_clip(""))
    prompt = build_prompt(get_task(3), 2, 5)
    a = generator([prompt], data)[0].image
    assert a.size == (cfg.eval.image_size, cfg.eval.image_size)
    assert np.array_equal(np.asarray(a), np.asarray(generator([prompt], data)[0].image))  # seeded
    # Another aligner (other prompt embeddings), same seed: another picture.
    torch.manual_seed(1)
    other = ThinkDiffGenerator(vlm=vlm, aligner=Aligner(AlignerConfig(in_dim=64, out_dim=32)), flux=flux, cfg=cfg)
    assert not np.array_equal(np.asarray(a), np.asarray(other([prompt], data)[0].image))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_batch_draws_each_row_as_alone(dtype):
    """The batched CoBSAT path: row i of a batch is the picture a batch of one draws from the same
    embeddings and seed (within the dtype's tolerance); other seeds give other pictures."""
    cfg = load_config("tiny", [f"models.flux.dtype={'bfloat16' if dtype == torch.bfloat16 else 'float32'}"])
    flux = load_flux(cfg.models.flux, device=CPU)
    torch.manual_seed(0)
    embeds = torch.randn(3, 16, flux.joint_dim)
    pooled = flux.pooled_clip("")
    draw = dict(steps=3, guidance=3.5, size=64)
    batch = [np.asarray(im, dtype=np.int16) for im in flux.draw_embeds(embeds, pooled, seeds=[5, 6, 7], **draw)]
    alone = [np.asarray(flux.draw_embeds(embeds[i: i + 1], pooled, seeds=[5 + i], **draw)[0], dtype=np.int16)
             for i in range(3)]
    for b, a in zip(batch, alone, strict=True):
        assert np.abs(b - a).max() <= (3 if dtype == torch.bfloat16 else 1)
    reseeded = np.asarray(flux.draw_embeds(embeds[:1], pooled, seeds=[6], **draw)[0], dtype=np.int16)
    assert np.abs(reseeded - alone[0]).mean() > 5


def test_text_bridge_draws_the_vlm_text(parts_env, monkeypatch):
    cfg, data, _, flux, _ = parts_env
    vlm = build_tiny_vlm(min_pixels=cfg.features.min_pixels, max_pixels=cfg.features.max_pixels)
    prompts = [build_prompt(get_task(2), 2, i) for i in range(2)]
    drawn = {}
    draw_text = flux.draw_text

    def recording(texts, **kwargs):
        drawn.update(texts=texts, seeds=kwargs["seeds"])
        return draw_text(texts, **kwargs)

    monkeypatch.setattr(flux, "draw_text", recording)
    drawn_images = TextBridgeGenerator(vlm=vlm, flux=flux, cfg=cfg)(prompts, data)
    assert [d.image.size for d in drawn_images] == [(cfg.eval.image_size, cfg.eval.image_size)] * 2
    # FLUX draws what the VLM wrote for each prompt (the same sampling seed gives the same text).
    answers = vlm_answers(vlm, cfg, [cobsat_parts(p, data) for p in prompts], seed=cfg.eval.seed + prompts[0].index)
    assert drawn["texts"] == [vlm.tokenizer.decode(a.token_ids, skip_special_tokens=True) for a in answers]
    assert len(set(drawn["texts"])) == 2 and all(drawn["texts"])
    assert drawn["seeds"] == [cfg.eval.seed, cfg.eval.seed + 1]


def test_aligner_for_other_models_is_rejected(parts_env, tmp_path):
    cfg, *_ = parts_env
    Aligner(AlignerConfig(in_dim=3584, out_dim=4096)).save_pretrained(tmp_path / "paper")
    with pytest.raises(ValueError, match=r"maps 3584 -> 4096, but models.vlm has width 64 and models.flux expects 32"):
        build_generator(cfg, str(tmp_path / "paper"))


def test_models_are_loaded_once_per_process(tmp_path):
    """The features stage, CoBSAT's generator and a Qwen2-VL judge of the same model share one
    VLM; a second evaluation in the process (a nightly's second model) loads nothing again."""
    from thinkdiff.data.extract import shared_extractor
    from thinkdiff.eval.judge import load_judge

    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=text-bridge", "eval.judge=qwen2-vl"])
    first, second = build_generator(cfg, None), build_generator(cfg, None)
    assert first.vlm is second.vlm is shared_extractor(cfg) is load_judge(cfg).vlm
    assert first.flux is second.flux
    other = load_config("tiny", [f"paths.root={tmp_path}", "features.max_pixels=12544"])  # other preprocessing: its own
    assert shared_extractor(other) is not first.vlm


def test_compiled_flux_draws_the_eager_pictures():
    """eval.compile: FLUX with fused query/key/value projections and compiled repeated blocks
    draws the eager, unfused path's images."""
    from thinkdiff.models.flux import wrap_flux
    from thinkdiff.models.tiny import build_tiny_flux_pipeline

    eager = wrap_flux(build_tiny_flux_pipeline(), "tiny", device=CPU, compile=False)
    compiled = wrap_flux(build_tiny_flux_pipeline(), "tiny", device=CPU, compile=True)
    torch.manual_seed(0)
    embeds, pooled = torch.randn(2, 16, eager.joint_dim), torch.randn(1, 32)
    draw = dict(steps=3, guidance=3.5, size=64, seeds=[1, 2])
    for a, b in zip(eager.draw_embeds(embeds, pooled, **draw), compiled.draw_embeds(embeds, pooled, **draw),
                    strict=True):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    assert compiled.pipe.transformer.transformer_blocks[0]._compiled_call_impl is not None
    blocks = compiled.pipe.transformer.transformer_blocks[0], compiled.pipe.transformer.single_transformer_blocks[0]
    assert all(block.attn.fused_projections for block in blocks)
    assert not eager.pipe.transformer.transformer_blocks[0].attn.fused_projections


def test_generate_command_writes_its_image_once(parts_env, tmp_path, capsys):
    from thinkdiff.cli import main

    cfg, data, vlm, flux, aligner = parts_env
    aligner.save_pretrained(tmp_path / "aligner")
    red = data.item(get_task(1), "red", "leaf")
    red.save(tmp_path / "red.png")
    argv = ["generate", "--config", "tiny", f"paths.root={cfg.paths.root}", "--aligner", str(tmp_path / "aligner"),
            "--text", "red: ", "--image", str(tmp_path / "red.png"), "--text", "blue: ",
            "--out", str(tmp_path / "out.png")]
    assert main(argv) == 0
    written = (tmp_path / "out.png").read_bytes()
    assert Image.open(tmp_path / "out.png").size == (cfg.eval.image_size, cfg.eval.image_size)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # Again: refused before any model runs, the first image untouched.
    assert main(argv) == 2
    assert "out.png exists; an output is never overwritten" in capsys.readouterr().err
    assert (tmp_path / "out.png").read_bytes() == written
    assert main([*argv[:-1], str(tmp_path / "out.tiff2")]) == 2
    assert "unknown image type '.tiff2'" in capsys.readouterr().err
