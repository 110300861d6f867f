"""Covers: the VLM families run by models.vlm.id: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL3-hf and
LLaVA-OneVision (tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-internvl, tiny-llava-onevision
offline: their real classes, random weights), each decoding the same ids and states on both paths as a
teacher-forced pass gives them, and each through features -> training -> CoBSAT (TBDN beside it), with
the project's attention kernels exact against transformers' SDPA; a processor family loads from a
saved directory through its chat template; a VLM of another family, one without a vision tower and
one without a chat template are refused in one line, before their weights load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    InternVLForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
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
from thinkdiff.models.vlm import (
    chat_text,
    encode_chat,
    final_norm_states,
    generate_with_states,
    load_vlm,
    vlm_family,
)

FAMILY_CLASSES = [("tiny-qwen2-vl", Qwen2VLForConditionalGeneration),
                  ("tiny-qwen2.5-vl", Qwen2_5_VLForConditionalGeneration),
                  ("tiny-qwen3-vl", Qwen3VLForConditionalGeneration),
                  ("tiny-internvl", InternVLForConditionalGeneration),
                  ("tiny-llava-onevision", LlavaOnevisionForConditionalGeneration)]


@pytest.mark.parametrize("model_id, model_class", FAMILY_CLASSES)
def test_each_family_decodes_the_same_ids_and_states_on_both_paths_and_its_kernels_are_exact(model_id, model_class):
    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136 * 4, model_id=model_id)
    assert type(vlm.model) is model_class and vlm.model_id == model_id
    chats = [[Image.new("RGB", (56, 56)), "hi"],
             [Image.new("RGB", (112, 56), "red"), "a question", Image.new("RGB", (28, 70), "blue"), "and more"]]
    batch = encode_chat(vlm, chats, "sys", picture_labels=True)
    static, dynamic = (generate_with_states(vlm, batch, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=0,
                                            ban_eos=True, kv_cache=path) for path in ("static", "dynamic"))
    assert [s.token_ids for s in static] == [s.token_ids for s in dynamic]
    # Both paths' states are those of one teacher-forced pass over image, prompt and generated ids.
    reference = final_norm_states(vlm, batch, torch.tensor([s.token_ids for s in static]), [8, 8])
    for path in (static, dynamic):
        for sample, expected in zip(path, reference, strict=True):
            torch.testing.assert_close(sample.states_LD, expected, rtol=1e-4, atol=1e-5)
    # The chat the VLM was given labels each picture, in order.
    text = chat_text(vlm, chats[1], "sys", picture_labels=True)
    assert text.index("Picture 1: ") < text.index("a question") < text.index("Picture 2: ") < text.index("and more")
    with torch.no_grad():
        ours = vlm.model(**batch).logits
        vlm.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        reference = vlm.model(**batch).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_id", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision"])
def test_features_training_and_cobsat_run_on_each_family(demo_corpus, tmp_path, model_id):
    _, corpus_dir = demo_corpus
    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"models.vlm.id={model_id}", "train.max_steps=4",
                               "train.warmup_steps=1", "train.log_every=2", "train.batch_size=4", "eval.limit=1",
                               "eval.tasks=[1]", "eval.shots=[2]", "eval.baselines=[tbdn, text-bridge@tiny]"])
    features_dir = pipeline.cache_features(cfg, corpus_dir)
    store = FeatureStore(features_dir, expect_model_id=model_id)
    assert store.info.dim == load_vlm(cfg.models.vlm, min_pixels=3136, max_pixels=3136).hidden_size
    result = pipeline.train_aligner(cfg, features_dir)
    assert result.step == 4
    evaluation = stage.evaluate_cobsat(cfg, model=str(result.aligner_dir))
    assert evaluation.summary.num_prompts == 1 and evaluation.baselines["tbdn"].num_prompts == 1
    # One row per (generator, VLM, shot): the text bridge drew with the VLM its entry names.
    measured = evaluation.comparison_md.read_text().split("Measured here:")[1]
    rows = [line.split(" | ")[:3] for line in measured.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [["| thinkdiff", model_id, "2"], ["| tbdn", model_id, "2"], ["| text-bridge", "tiny", "2"]]
    # A store of one family is never read as another's.
    with pytest.raises(Exception, match=model_id):
        FeatureStore(features_dir, expect_model_id="tiny")


def test_a_baseline_names_another_vlm_only_for_a_generator_without_an_aligner():
    cfg = load_config("tiny", ["eval.baselines=[text-bridge, text-bridge@Qwen/Qwen2.5-VL-7B-Instruct, tbdn@tiny]"])
    assert cfg.eval.baselines == ["text-bridge", "text-bridge@Qwen/Qwen2.5-VL-7B-Instruct", "tbdn@tiny"]
    for entry in ("hybrid@tiny-qwen3-vl", "text-bridge@"):
        with pytest.raises(ConfigError, match=r"eval.baselines=.*name another VLM only for text-bridge and tbdn"):
            load_config("tiny", [f"eval.baselines=[{entry}]"])


def test_a_vlm_of_another_family_is_refused_before_its_weights_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditional"
                                                                                                "Generation"]}))
    src = ModelSource(id=str(tmp_path), revision="main", dtype="float32")
    with pytest.raises(ConfigError) as err:
        load_vlm(src, min_pixels=3136, max_pixels=3136)
    assert str(err.value).startswith(f"models.vlm.id={tmp_path} is a llava model; the VLM families this version runs "
                                     "are qwen2-vl, qwen2.5-vl, qwen3-vl, internvl, llava-onevision")
    assert vlm_family(ModelSource(id="tiny", revision="tiny-v1", dtype="float32")) == "qwen2-vl"
    # A language model without a vision tower is refused as such.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ConfigError, match=f"models.vlm.id={tmp_path} is a qwen2 model without image support"):
        load_vlm(src, min_pixels=3136, max_pixels=3136)


@pytest.mark.parametrize("model_id", ["tiny-internvl", "tiny-llava-onevision"])
def test_a_processor_family_loads_from_its_directory_and_one_without_a_chat_template_is_refused(tmp_path, model_id):
    tiny = build_tiny_vlm(min_pixels=3136, max_pixels=3136, model_id=model_id)
    saved = tmp_path / "saved"
    tiny.model.save_pretrained(saved)
    tiny.processor.save_pretrained(saved)
    loaded = load_vlm(ModelSource(id=str(saved), revision="main", dtype="float32"), min_pixels=3136, max_pixels=3136,
                      device=torch.device("cpu"))
    assert (loaded.revision, loaded.family, loaded.hidden_size) == ("local", tiny.family, tiny.hidden_size)
    chats = [[Image.new("RGB", (40, 60), "green"), "what is this?"]]
    batch = encode_chat(loaded, chats, "sys", picture_labels=True)
    for key, value in encode_chat(tiny, chats, "sys", picture_labels=True).items():
        assert torch.equal(batch[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, tiny.model(**batch).logits)

    # The config and processor of a checkpoint saved without its chat template, and no weights at all:
    # refused from those files alone.
    bare = tmp_path / "bare"
    tiny.model.config.save_pretrained(bare)
    tiny.processor.chat_template = None
    tiny.processor.save_pretrained(bare)
    with pytest.raises(ConfigError) as err:
        load_vlm(ModelSource(id=str(bare), revision="main", dtype="float32"), min_pixels=3136, max_pixels=3136)
    assert str(err.value).startswith(f"models.vlm.id={bare} has no chat template")
    assert "use the instruction-tuned chat checkpoint" in str(err.value)


def test_the_tbdn_internvl3_preset_is_paper_tbdn_with_internvl3():
    """conf/paper-tbdn-internvl3.yaml is TBDN's InternVL3-8B run: paper-tbdn with only the VLM changed."""
    from thinkdiff.registry import flatten

    internvl, qwen = (flatten(load_config(name).to_dict()) for name in ("paper-tbdn-internvl3", "paper-tbdn"))
    assert {k for k in qwen if internvl[k] != qwen[k]} == {"preset", "models.vlm.id"}
    assert internvl["models.vlm.id"] == "OpenGVLab/InternVL3-8B-hf" and internvl["eval.generator"] == "tbdn"


@pytest.mark.parametrize("model_id", ["tiny-internvl", "tiny-llava-onevision"])
def test_the_vlm_judge_asks_a_processor_family(model_id, monkeypatch):
    """eval.judge=qwen2-vl takes any VLM family as eval.judge_model: two replies per image, each
    decoded from what that VLM generated for its own question."""
    from thinkdiff.eval import judge as judge_module
    from thinkdiff.eval.cobsat import TASKS
    from thinkdiff.eval.judge import Qwen2VLJudge, load_judge

    # Random weights seldom stop early: CoBSAT's 512-token replies would take a minute on the CPU.
    monkeypatch.setattr(judge_module, "MAX_ANSWER_TOKENS", 16)

    cfg = load_config("tiny", ["eval.judge=qwen2-vl", f"eval.judge_model.id={model_id}", "eval.dataset=data/cobsat"])
    judge = load_judge(cfg)
    assert isinstance(judge, Qwen2VLJudge) and judge.vlm.model_id == model_id
    images, tasks = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue")], [TASKS[1], TASKS[2]]
    replies = judge.replies(images, tasks)
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert [v.replies for v in judge(images, tasks)] == [tuple(replies[0:2]), tuple(replies[2:4])]
