"""Covers: the ThinkDiff CoBSAT prompt to the VLM (REFERENCE.md section 6, exact strings), exactly
gen_tokens generated tokens with EOS ignored, the aligner output reaching FLUX as prompt_embeds
(other embeddings, another image) with the pooled CLIP of "", seeded images, the text-bridge path,
a clear error for an aligner trained for other models, and models loaded once per process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
from thinkdiff.models.vlm import build_tiny_vlm, encode_chat, generate_with_states

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


def test_exactly_gen_tokens_with_eos_ignored(parts_env):
    _, _, vlm, *_ = parts_env
    with torch.no_grad():  # make EOS the likely next token everywhere
        vlm.model.lm_head.weight[vlm.eos_token_ids[0]] += 50 * vlm.model.model.language_model.norm.weight
    batch = encode_chat(vlm, [[Image.new("RGB", (56, 56)), "hi"]], "sys")
    stopped = generate_with_states(vlm, batch, max_new_tokens=20, temperature=0.6, top_p=0.9, seed=0)
    ignored = generate_with_states(vlm, batch, max_new_tokens=20, temperature=0.6, top_p=0.9, seed=0, ignore_eos=True)
    assert len(stopped[0].token_ids) < 20
    assert len(ignored[0].token_ids) == 20 and ignored[0].states_LD.shape == (20, vlm.hidden_size)
    assert any(t in vlm.eos_token_ids for t in ignored[0].token_ids)


def test_aligned_states_drive_flux(parts_env):
    cfg, data, _, flux, aligner = parts_env
    vlm = build_tiny_vlm(min_pixels=cfg.features.min_pixels, max_pixels=cfg.features.max_pixels)
    generator = ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg)
    assert torch.equal(generator.pooled, flux.pooled_clip(""))
    prompt = build_prompt(get_task(3), 2, 5)
    (a,) = generator([prompt], data)
    assert a.size == (cfg.eval.image_size, cfg.eval.image_size)
    assert np.array_equal(np.asarray(a), np.asarray(generator([prompt], data)[0]))  # seeded
    # Another aligner (other prompt embeddings), same seed: another picture.
    torch.manual_seed(1)
    other = ThinkDiffGenerator(vlm=vlm, aligner=Aligner(AlignerConfig(in_dim=64, out_dim=32)), flux=flux, cfg=cfg)
    assert not np.array_equal(np.asarray(a), np.asarray(other([prompt], data)[0]))


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
    alone = [np.asarray(flux.draw_embeds(embeds[i: i + 1], pooled, seeds=[5 + i], **draw)[0], dtype=np.int16) for i in range(3)]
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
    images = TextBridgeGenerator(vlm=vlm, flux=flux, cfg=cfg)(prompts, data)
    assert [im.size for im in images] == [(cfg.eval.image_size, cfg.eval.image_size)] * 2
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
    from thinkdiff.models.flux import build_tiny_flux_pipeline, wrap_flux

    eager = wrap_flux(build_tiny_flux_pipeline(), "tiny", device=CPU, compile=False)
    compiled = wrap_flux(build_tiny_flux_pipeline(), "tiny", device=CPU, compile=True)
    torch.manual_seed(0)
    embeds, pooled = torch.randn(2, 16, eager.joint_dim), torch.randn(1, 32)
    draw = dict(steps=3, guidance=3.5, size=64, seeds=[1, 2])
    for a, b in zip(eager.draw_embeds(embeds, pooled, **draw), compiled.draw_embeds(embeds, pooled, **draw), strict=True):
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
            "--text", "red: ", "--image", str(tmp_path / "red.png"), "--text", "blue: ", "--out", str(tmp_path / "out.png")]
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
