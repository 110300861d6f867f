"""Covers: the VLM families run by models.vlm.id: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tiny-qwen2-vl,
tiny-qwen2.5-vl, tiny-qwen3-vl offline: their real classes, random weights), each through features ->
training -> CoBSAT, with the
project's attention kernels exact against transformers' SDPA; a VLM of another family is refused in
one line, from its config, before its weights load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from thinkdiff import pipeline
from thinkdiff.config import ModelSource, load_config
from thinkdiff.data.features import FeatureStore
from thinkdiff.errors import ConfigError
from thinkdiff.eval import stage
from thinkdiff.models.tiny import build_tiny_vlm
from thinkdiff.models.vlm import encode_chat, generate_with_states, load_vlm, vlm_family


@pytest.mark.parametrize("model_id, model_class", [("tiny-qwen2-vl", Qwen2VLForConditionalGeneration),
                                                   ("tiny-qwen2.5-vl", Qwen2_5_VLForConditionalGeneration),
                                                   ("tiny-qwen3-vl", Qwen3VLForConditionalGeneration)])
def test_each_family_decodes_the_same_ids_on_both_paths_and_its_kernels_are_exact(model_id, model_class):
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136 * 4, model_id=model_id)
    assert type(vlm.model) is model_class and vlm.model_id == model_id
    batch = encode_chat(vlm, [[Image.new("RGB", (56, 56)), "hi"], [Image.new("RGB", (112, 56), "red"), "a question"]],
                        "sys")
    static, dynamic = (generate_with_states(vlm, batch, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=0,
                                            ban_eos=True, kv_cache=path) for path in ("static", "dynamic"))
    assert [s.token_ids for s in static] == [s.token_ids for s in dynamic]
    with torch.no_grad():
        ours = vlm.model(**batch).logits
        vlm.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        reference = vlm.model(**batch).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_id", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_features_training_and_cobsat_run_on_each_family(demo_corpus, tmp_path, model_id):
    _, corpus_dir = demo_corpus
    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"models.vlm.id={model_id}", "train.max_steps=4",
                               "train.warmup_steps=1", "train.log_every=2", "train.batch_size=4", "eval.limit=1",
                               "eval.tasks=[1]", "eval.shots=[2]", "eval.baselines=[]"])
    features_dir = pipeline.cache_features(cfg, corpus_dir)
    store = FeatureStore(features_dir, expect_model_id=model_id)
    assert store.info.dim == load_vlm(cfg.models.vlm, min_pixels=3136, max_pixels=3136).hidden_size
    result = pipeline.train_aligner(cfg, features_dir)
    assert result.step == 4
    evaluation = stage.evaluate_cobsat(cfg, model=str(result.aligner_dir))
    assert evaluation.summary.num_prompts == 1
    # A store of one family is never read as another's.
    with pytest.raises(Exception, match=model_id):
        FeatureStore(features_dir, expect_model_id="tiny")


def test_a_vlm_of_another_family_is_refused_before_its_weights_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditional"
                                                                                                "Generation"]}))
    src = ModelSource(id=str(tmp_path), revision="main", dtype="float32")
    with pytest.raises(ConfigError) as err:
        load_vlm(src, min_pixels=3136, max_pixels=3136)
    assert str(err.value).startswith(f"models.vlm.id={tmp_path} is a llava model; the VLM families this version runs "
                                     "are qwen2-vl, qwen2.5-vl, qwen3-vl")
    assert vlm_family(ModelSource(id="tiny", revision="tiny-v1", dtype="float32")) == "qwen2-vl"
