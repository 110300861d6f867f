"""Covers: the hybrid generator: FLUX's prompt embedding is exactly [aligned ThinkDiff tokens ; FLUX's
own T5 embedding of the text the VLM wrote in the same call], with the pooled CLIP embedding of that
text; it draws through CoBSAT in a results directory of its own, also beside ThinkDiff."""

from __future__ import annotations

import dataclasses

import torch

from thinkdiff.config import load_config
from thinkdiff.eval import stage
from thinkdiff.eval.cobsat import build_prompt, get_task
from thinkdiff.eval.dataset import make_synthetic_dataset
from thinkdiff.generate import ThinkDiffGenerator, cobsat_parts, vlm_answers
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.flux import load_flux
from thinkdiff.models.tiny import build_tiny_vlm

CPU = torch.device("cpu")


def test_the_hybrid_embedding_is_the_aligned_tokens_then_flux_t5_of_the_written_text(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=hybrid"])
    data = make_synthetic_dataset(tmp_path / "cobsat", 64)
    vlm = build_tiny_vlm(min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels)
    flux = load_flux(cfg.models.flux, device=CPU)
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(in_dim=vlm.hidden_size, out_dim=flux.joint_dim))
    conversations = [cobsat_parts(build_prompt(get_task(3), 2, i), data) for i in range(2)]
    hybrid = ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg, hybrid=True)
    embeds, pooled, samples = hybrid.conditioning(conversations, vlm_seed=5)

    answers = vlm_answers(vlm, cfg, conversations, seed=5, ban_eos=True)  # the same single VLM call
    assert [a.token_ids for a in answers] == [s.token_ids for s in samples]
    aligned = aligner(torch.stack([a.states_LD for a in answers]).float())
    texts = [vlm.tokenizer.decode(a.token_ids, skip_special_tokens=True) for a in answers]
    with torch.no_grad():  # as the generator runs it (grad mode picks other kernels)
        text_embeds, text_pooled, _ = flux.pipe.encode_prompt(prompt=texts, prompt_2=texts, device=CPU,
                                                              max_sequence_length=cfg.eval.clip_text_tokens)
    assert embeds.shape == (2, cfg.eval.gen_tokens + cfg.eval.clip_text_tokens, flux.joint_dim)
    assert torch.equal(embeds, torch.cat([aligned.to(text_embeds.dtype), text_embeds], dim=1))
    assert torch.equal(pooled, text_pooled)
    plain = dataclasses.replace(hybrid, hybrid=False)
    thinkdiff_embeds, thinkdiff_pooled, _ = plain.conditioning(conversations, vlm_seed=5)
    assert torch.equal(thinkdiff_embeds, aligned) and torch.equal(thinkdiff_pooled, flux.pooled_clip(""))


def test_hybrid_is_drawn_on_cobsat_beside_thinkdiff_with_the_same_aligner(tmp_path):
    aligner_dir = tmp_path / "aligner"
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    vlm_width = build_tiny_vlm(min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels).hidden_size
    torch.manual_seed(0)
    Aligner(AlignerConfig(in_dim=vlm_width, out_dim=load_flux(cfg.models.flux, device=CPU).joint_dim)).save_pretrained(
        aligner_dir)
    result = stage.evaluate_cobsat(load_config("tiny", [f"paths.root={tmp_path}", "eval.limit=1", "eval.tasks=[1]",
                                                        "eval.shots=[2]", "eval.baselines=[hybrid]"]),
                                   model=str(aligner_dir))
    assert set(result.baselines) == {"hybrid"} and result.baselines["hybrid"].num_prompts == 1
    assert "| hybrid | tiny | 2 |" in result.table and "| thinkdiff | tiny | 2 |" in result.table
