"""Covers: TBDN's generator (arXiv 2601.06169): the hint in the instruction, query-contrastive
decoding whose every greedy token is the argmax of (1 + a) * logits(prompt) - a * logits(prompt
without its query text), computed here from scratch at each step as TBDN's own code does; a = 0
samples exactly what a plain text bridge with TBDN's sampling samples; a rerun is identical; and
the generator draws the text it decoded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from thinkdiff.config import load_config
from thinkdiff.eval.cobsat import build_prompt, get_task
from thinkdiff.eval.dataset import make_synthetic_dataset
from thinkdiff.generate import (
    COBSAT_INSTRUCTION,
    TBDN_MAX_NEW_TOKENS,
    TBDN_TEMPERATURE,
    TBDN_TOP_P,
    TBDNGenerator,
    tbdn_parts,
)
from thinkdiff.models.flux import load_flux
from thinkdiff.models.tiny import build_tiny_vlm
from thinkdiff.models.vlm import encode_chat, generate_with_states

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cfg = load_config("tiny", [f"paths.root={tmp_path_factory.mktemp('tbdn')}"])
    data = make_synthetic_dataset(tmp_path_factory.mktemp("cobsat"), 64)
    vlm = build_tiny_vlm(min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels)
    prompts = [build_prompt(get_task(1), 2, i) for i in range(2)]
    conversations = [tbdn_parts(p, data, cfg.eval.tbdn_hint) for p in prompts]
    return cfg, data, vlm, prompts, conversations


def test_the_hint_follows_the_instruction_and_the_query_is_the_last_part(env):
    cfg, data, _, prompts, conversations = env
    assert conversations[0][0] == COBSAT_INSTRUCTION.rstrip() + " " + cfg.eval.tbdn_hint + "\n\n"
    assert conversations[0][-1] == "\n\nWord 3: orange, "
    assert tbdn_parts(prompts[0], data, "")[0] == COBSAT_INSTRUCTION


def _logits_from_scratch(vlm, conversations, generated: list[list[int]], system_prompt: str) -> torch.Tensor:
    """The next-token logits of each chat followed by its generated ids: one full forward, no cache."""
    batch = encode_chat(vlm, conversations, system_prompt, picture_labels=True)
    extra = torch.tensor(generated, dtype=torch.long)
    input_ids = torch.cat([batch["input_ids"], extra], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(extra)], dim=1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    out = vlm.model(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm,
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return out.logits[:, -1].float()


def test_each_contrastive_token_is_the_formula_over_both_prompts_recomputed(env):
    cfg, _, vlm, _, conversations = env
    a, steps = 4.0, 6
    without = [c[:-1] for c in conversations]
    batch = encode_chat(vlm, conversations + without, cfg.features.system_prompt, picture_labels=True)
    samples = generate_with_states(vlm, batch, max_new_tokens=steps, temperature=0.0, top_p=1.0, seed=0,
                                   ban_eos=True, contrast=a)
    ids = [s.token_ids for s in samples]
    assert all(len(row) == steps for row in ids)
    banned = vlm.vision_token_ids + vlm.eos_token_ids
    for j in range(steps):
        full = _logits_from_scratch(vlm, conversations, [row[:j] for row in ids], cfg.features.system_prompt)
        bare = _logits_from_scratch(vlm, without, [row[:j] for row in ids], cfg.features.system_prompt)
        assert not torch.allclose(full, bare)  # the query text changes the logits: the formula is not trivial
        combined = (1 + a) * full - a * bare
        combined[:, banned] = -float("inf")
        assert combined.argmax(-1).tolist() == [row[j] for row in ids]
    plain = generate_with_states(vlm, encode_chat(vlm, conversations, cfg.features.system_prompt, picture_labels=True),
                                 max_new_tokens=steps, temperature=0.0, top_p=1.0, seed=0, ban_eos=True)
    assert [s.token_ids for s in plain] != ids  # the contrast changes what is decoded


def test_alpha_zero_samples_what_the_plain_text_bridge_samples_and_a_rerun_is_identical(env):
    cfg, _, vlm, _, conversations = env
    system = cfg.features.system_prompt
    sampling = dict(max_new_tokens=TBDN_MAX_NEW_TOKENS, temperature=TBDN_TEMPERATURE, top_p=TBDN_TOP_P, seed=7)
    both = encode_chat(vlm, conversations + [c[:-1] for c in conversations], system, picture_labels=True)
    contrastive = generate_with_states(vlm, both, **sampling, contrast=0.0)
    plain = generate_with_states(vlm, encode_chat(vlm, conversations, system, picture_labels=True), **sampling,
                                 kv_cache="static")
    assert [s.token_ids for s in contrastive] == [s.token_ids for s in plain]
    again = generate_with_states(vlm, both, **sampling, contrast=0.5)
    once_more = generate_with_states(vlm, both, **sampling, contrast=0.5)
    assert [s.token_ids for s in again] == [s.token_ids for s in once_more]


def test_the_generator_draws_the_text_it_decoded(env, monkeypatch):
    cfg, data, vlm, prompts, conversations = env
    flux = load_flux(cfg.models.flux, device=CPU)
    drawn = {}
    draw_text = flux.draw_text

    def recording(texts, **kwargs):
        drawn.update(texts=texts, seeds=kwargs["seeds"])
        return draw_text(texts, **kwargs)

    monkeypatch.setattr(flux, "draw_text", recording)
    tbdn_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, generator="tbdn"))
    drawings = TBDNGenerator(vlm=vlm, flux=flux, cfg=tbdn_cfg)(prompts, data)
    both = encode_chat(vlm, conversations + [c[:-1] for c in conversations], cfg.features.system_prompt,
                       picture_labels=cfg.eval.picture_labels)
    answers = generate_with_states(vlm, both, max_new_tokens=TBDN_MAX_NEW_TOKENS, temperature=TBDN_TEMPERATURE,
                                   top_p=TBDN_TOP_P, seed=cfg.eval.seed + prompts[0].index,
                                   contrast=cfg.eval.tbdn_alpha)
    assert drawn["texts"] == [vlm.tokenizer.decode(a.token_ids, skip_special_tokens=True) for a in answers]
    assert [d.vlm_text for d in drawings] == [vlm.tokenizer.decode(a.token_ids, skip_special_tokens=False)
                                              for a in answers]


def test_tbdn_is_evaluated_on_cobsat_in_its_own_results_directory(tmp_path):
    from thinkdiff.eval import stage

    overrides = [f"paths.root={tmp_path}", "eval.generator=tbdn", "eval.limit=1", "eval.tasks=[1]", "eval.shots=[2]",
                 "eval.baselines=[]"]
    result = stage.evaluate_cobsat(load_config("tiny", overrides))
    row = json.loads(result.results_jsonl.read_text().splitlines()[0])  # a whole batch is drawn, the limit scored
    assert row["vlm_prompt"].startswith("<|im_start|>system")
    assert load_config("tiny").eval.tbdn_hint in row["vlm_prompt"]
    assert result.summary.num_prompts == 1 and result.results_dir.parent.name == "eval"
    # Its settings key its directory; the other generators' directories ignore them.
    other = stage.evaluate_cobsat(load_config("tiny", [*overrides, "eval.tbdn_alpha=0.25"]))
    assert other.results_dir != result.results_dir
    bridge = [o for o in overrides if not o.startswith("eval.generator")]
    plain = stage.evaluate_cobsat(load_config("tiny", [*bridge, "eval.generator=text-bridge"]))
    assert plain.results_dir == stage.evaluate_cobsat(load_config("tiny", [*bridge, "eval.generator=text-bridge",
                                                                           "eval.tbdn_alpha=0.25"])).results_dir
    assert load_config("tiny", ["eval.baselines=[text-bridge, tbdn]"]).eval.baselines == ["text-bridge", "tbdn"]
