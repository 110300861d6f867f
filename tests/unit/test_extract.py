"""Covers: chat prompts with left padding and mm_token_type_ids; the teacher-forced final-norm
states equal the states captured during generation (the state that produced each token); seeded
instruction choice; the features stage end to end on the demo corpus (schema, stored rows,
determinism, resume of a missing shard, corrupt images recorded and skipped, rerun skipped)."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.data import extract
from thinkdiff.data.corpus import read_corpus_shard
from thinkdiff.data.features import FeatureStore, decode_features, read_shard_failures
from thinkdiff.errors import DataContractError, DiskFullError
from thinkdiff.models.attention import PACKED_GQA_SDPA
from thinkdiff.models.tiny import build_tiny_vlm
from thinkdiff.models.vlm import IMAGE_PAD, encode_chat, final_norm_states, generate_with_states
from thinkdiff.storage import exclusive, stage_dir, write_manifest

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm(min_pixels=28 * 28, max_pixels=112 * 112)


def two_prompts():
    return [
        [Image.new("RGB", (56, 56), (200, 10, 10)), "Describe the image concisely."],
        [Image.new("RGB", (112, 56), (10, 200, 10)),
         "Write a clear prompt to guide a 2D diffusion model in recreating the image."],
    ]


def test_encode_chat_left_pads_and_marks_image_tokens(vlm):
    batch = encode_chat(vlm, two_prompts(), SYSTEM)
    ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    pad_id = vlm.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert torch.equal(mm, (ids == pad_id).long())
    per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert mm.sum(1).tolist() == per_image and per_image[1] == 2 * per_image[0]
    # Left padding: every row ends with the assistant header; the shorter one starts with masked pads.
    for row, m in zip(ids, mask, strict=True):
        text = vlm.tokenizer.decode(row[m.bool()])
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert mask[0, 0] == 0 and mask[1].all()


@pytest.mark.parametrize("path", ["dynamic", "static", "static, top-p by threshold"])
def test_sampled_ids_and_states_equal_hf_generate(vlm, path, monkeypatch):
    """Both paths (HF generate + states from its cache; the static-cache decode loop, with top-p
    by sorting as uncompiled or by threshold as compiled) sample the ids HF generate samples from
    the same seed, with the states generate() itself saw; both stop once every row has ended."""
    from thinkdiff.models import decode, sampling

    kv_cache = path.split(",")[0]
    if path.endswith("threshold"):
        real_scores = decode.token_scores
        monkeypatch.setattr(decode, "token_scores", lambda *args, **kwargs: real_scores(*args, compile=True))
        monkeypatch.setattr(sampling, "compiled_top_p_keep", lambda: sampling.top_p_keep)  # compiled: test_sampling
    decode_steps = []
    real_step = decode._decode_step
    monkeypatch.setattr(decode, "_decode_step", lambda *args: decode_steps.append(1) or real_step(*args))
    batch = encode_chat(vlm, two_prompts(), SYSTEM)
    samples = generate_with_states(vlm, batch, max_new_tokens=40, temperature=0.6, top_p=0.9, seed=8, kv_cache=kv_cache)
    # The same sampling, with the hidden states generate() itself saw at every step.
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=0, repetition_penalty=1.0,
                              max_new_tokens=40, eos_token_id=vlm.eos_token_ids, pad_token_id=vlm.pad_token_id,
                              suppress_tokens=vlm.vision_token_ids, output_hidden_states=True,
                              return_dict_in_generate=True)
    with torch.random.fork_rng():
        torch.manual_seed(8)
        out = vlm.model.generate(**batch, generation_config=config)
    prompt_len = batch["input_ids"].shape[1]
    # Step 0 holds the whole prompt (its last position produced token 0); later steps one position each.
    seen = torch.stack([out.hidden_states[0][-1][:, -1]] + [h[-1][:, -1] for h in out.hidden_states[1:]], dim=1)
    assert [len(s.token_ids) for s in samples] == [23, 25]  # both rows end at EOS, before the limit
    if kv_cache == "static":  # its end-of-rows check comes every EOS_CHECK_EVERY steps
        assert 25 <= len(decode_steps) < 25 + decode.EOS_CHECK_EVERY
    for i, sample in enumerate(samples):
        n = len(sample.token_ids)
        assert sample.token_ids == out.sequences[i, prompt_len: prompt_len + n].tolist()
        assert sample.states_LD.shape == (n, vlm.hidden_size)
        torch.testing.assert_close(sample.states_LD, seen[i, :n], rtol=1e-5, atol=1e-5)
    # A shorter length masks the tail without changing the states before it.
    gen = out.sequences[:, prompt_len:]
    short = final_norm_states(vlm, batch, gen, [3, 5])
    torch.testing.assert_close(short[0], samples[0].states_LD[:3], rtol=1e-5, atol=1e-5)


def test_threaded_preprocessing_gives_the_same_inputs(vlm):
    from concurrent.futures import ThreadPoolExecutor

    prompts = two_prompts() + [[Image.new("RGB", (84, 140), (1, 2, 3)), "Describe."]]
    with ThreadPoolExecutor(3) as pool:
        threaded = encode_chat(vlm, prompts, SYSTEM, pool=pool)
    plain = encode_chat(vlm, prompts, SYSTEM)
    assert threaded.keys() == plain.keys()
    for key in plain:
        assert torch.equal(threaded[key], plain[key]), key


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_production_path_equals_plain_path_under_greedy_decoding(kv_cache, dtype):
    """The features stage's path (static or dynamic cache, packed-GQA decode attention, states from
    the prompt's KV cache) against the plain one (HF generate with its defaults and transformers' SDPA,
    then a full teacher-forced pass): same ids, same states within the dtype's tolerance."""
    vlm = build_tiny_vlm(min_pixels=28 * 28, max_pixels=112 * 112)
    vlm.model.to(dtype)
    batch = encode_chat(vlm, two_prompts(), SYSTEM)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    fast = generate_with_states(vlm, batch, max_new_tokens=16, temperature=0, top_p=1.0, seed=0,
                                kv_cache=kv_cache, compile=True)
    assert vlm.model.config.text_config._attn_implementation == PACKED_GQA_SDPA
    vlm.model.set_attn_implementation({"text_config": "sdpa"})
    plain = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=vlm.eos_token_ids,
                             pad_token_id=vlm.pad_token_id, suppress_tokens=vlm.vision_token_ids)
    sequences = vlm.model.generate(**batch, generation_config=plain)
    generated = sequences[:, batch["input_ids"].shape[1]:]
    assert [s.token_ids for s in fast] == [row[: len(s.token_ids)]
                                           for s, row in zip(fast, generated.tolist(), strict=True)]
    assert all(len(s.token_ids) == 16 or s.token_ids[-1] in vlm.eos_token_ids for s in fast)
    expected = final_norm_states(vlm, batch, generated, [len(s.token_ids) for s in fast])
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for sample, states in zip(fast, expected, strict=True):
        torch.testing.assert_close(sample.states_LD, states, **tol)


def test_generation_is_seeded(vlm):
    batch = encode_chat(vlm, two_prompts(), SYSTEM)
    a = generate_with_states(vlm, batch, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=1)
    b = generate_with_states(vlm, batch, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=1)
    c = generate_with_states(vlm, batch, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=2)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_instruction_choice_is_seeded_per_key():
    options = [f"instruction {i}" for i in range(16)]
    picks = [extract.pick_instruction(options, 0, f"{k:09d}") for k in range(400)]
    assert picks == [extract.pick_instruction(options, 0, f"{k:09d}") for k in range(400)]
    assert set(picks) == set(options)
    assert picks != [extract.pick_instruction(options, 1, f"{k:09d}") for k in range(400)]


def test_feature_store_rows_are_the_producing_states(tiny_store):
    cfg, features_dir = tiny_store
    store = FeatureStore(features_dir, expect_model_id="tiny")
    assert store.num_samples == 40 and len(store.shards) == 3
    assert store.info.dim == 64 and store.info.dtype == "bfloat16" and store.info.model_revision == "tiny-v1"
    vlm = build_tiny_vlm(min_pixels=cfg.features.min_pixels, max_pixels=cfg.features.max_pixels)
    table = pq.read_table(store.shards[0])
    assert table.schema.names == ["key", "instruction", "text", "token_ids", "num_tokens", "num_rows", "features"]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["num_rows"] == min(row["num_tokens"], cfg.features.max_feature_rows)
    assert row["text"] == vlm.tokenizer.decode(row["token_ids"], skip_special_tokens=True)
    assert row["instruction"] == extract.pick_instruction(cfg.features.instructions, cfg.features.seed, row["key"])
    # Recompute the states for this image from its stored ids (batch of one, full teacher-forced
    # pass): the stored rows are them rounded to bf16 (half an ulp, 2**-9 relative, plus fp32 noise).
    corpus_shard = features_dir.parent.parent / "corpus" / stage_dir(cfg, "corpus").name / "00000.parquet"
    image = next(i for i in read_corpus_shard(corpus_shard) if i.key == row["key"]).image
    batch = encode_chat(vlm, [[image, row["instruction"]]], cfg.features.system_prompt)
    ids = torch.tensor([row["token_ids"]])
    expected = final_norm_states(vlm, batch, ids, [row["num_tokens"]])[0][: row["num_rows"]]
    stored = decode_features(row["features"], row["num_rows"], 64, "bfloat16")
    torch.testing.assert_close(stored.float(), expected, rtol=2**-8, atol=1e-5)


def test_features_stage_resumes_missing_shard_identically(demo_corpus, tmp_path):
    cfg, corpus_dir = demo_corpus
    out = pipeline.cache_features(cfg, corpus_dir, tmp_path / "features")
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3
    before = {p.name: p.read_bytes() for p in shards}
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    # A run killed after two shards: no manifest, one shard missing, a temp file left behind.
    (out / "manifest.json").unlink()
    shards[1].unlink()
    (out / ".part-00001.parquet.abc.tmp").write_bytes(b"partial")
    pipeline.cache_features(cfg, corpus_dir, out)
    assert shards[1].read_bytes() == before[shards[1].name]  # same seeds, same bytes
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]  # untouched
    assert not list(out.glob(".*.tmp"))
    assert FeatureStore(out).num_samples == 40


def test_a_full_disk_stops_the_stage_with_one_line_and_a_rerun_resumes(demo_corpus, tmp_path, monkeypatch):
    cfg, corpus_dir = demo_corpus
    out = tmp_path / "features"
    real_write, calls = pq.write_table, []

    def fills_the_disk(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:  # the second shard: half of it reaches the disk, then the disk is full
            with open(where, "wb") as fh:
                fh.write(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", fills_the_disk)
    with pytest.raises(DiskFullError, match=re.escape(f"{out}: no space left to write there (No space left on "
                                                      "device")) as caught:
        pipeline.cache_features(cfg, corpus_dir, out)
    assert len(str(caught.value).splitlines()) == 1 and "completed before it are kept" in str(caught.value)
    first = out / "part-00000.parquet"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".lock")) == [first.name]  # no temp file
    stamp = first.stat().st_mtime_ns
    monkeypatch.undo()
    pipeline.cache_features(cfg, corpus_dir, out)  # space freed: the rerun makes the two missing shards
    assert first.stat().st_mtime_ns == stamp and FeatureStore(out).num_samples == 40
    assert not list(out.glob(".*.tmp"))


def test_workers_on_one_store_split_the_shards(demo_corpus, tmp_path):
    """A shard another worker is extracting (its claim held) is left to it: this worker extracts the
    others, keeps the other writer's temporary file, then waits for the claimed shard; when the claim
    goes without a shard (that worker died), it extracts the shard itself."""
    cfg, corpus_dir = demo_corpus
    out = tmp_path / "features"
    out.mkdir()
    in_flight = out / ".part-00000.parquet.live.tmp"
    in_flight.write_bytes(b"the other worker is writing this")
    other_worker = contextlib.ExitStack()
    # held as another worker holds it
    assert other_worker.enter_context(exclusive(out / ".part-00000.parquet.lock", ""))
    assert extract.extract_feature_shard(cfg, corpus_dir / "00000.parquet", out, wait=False) is None
    stage = threading.Thread(target=pipeline.cache_features, args=(cfg, corpus_dir, out))
    stage.start()
    deadline = time.monotonic() + 120
    while not all((out / f"part-0000{i}.parquet").exists() for i in (1, 2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all((out / f"part-0000{i}.parquet").exists() for i in (1, 2)), (
        "the shards nobody claimed are extracted first")
    stage.join(timeout=1)
    assert stage.is_alive(), "the stage waits for the claimed shard"
    assert not (out / "part-00000.parquet").exists() and in_flight.exists()
    other_worker.close()  # that worker is gone and wrote nothing
    stage.join(timeout=120)
    assert not stage.is_alive() and (out / "manifest.json").is_file()
    assert FeatureStore(out).num_samples == 40 and not list(out.glob(".*.tmp"))


def test_complete_stage_is_skipped_without_loading_models(tiny_store, monkeypatch):
    cfg, features_dir = tiny_store

    def fail(*args, **kwargs):
        raise AssertionError("the VLM must not be loaded for a complete stage")

    monkeypatch.setattr(extract, "load_vlm", fail)
    assert pipeline.cache_features(cfg) == features_dir


def test_another_corpus_gets_a_features_directory_of_its_own(tiny_store, tmp_path, caplog):
    """`features --corpus DIR` (or the flow's corpus_dir) while the config's own store is complete:
    the other corpus is planned whole and extracted into its own directory, never answered by the
    config's store."""
    cfg, features_dir = tiny_store
    own = stage_dir(cfg, "corpus")
    # An img2dataset output made elsewhere: shards and stats, no manifest of this project.
    other = shutil.copytree(own, tmp_path / "other-corpus", ignore=shutil.ignore_patterns("manifest.json"))
    assert pipeline.pending_feature_shards(cfg, own) == []
    pending = pipeline.pending_feature_shards(cfg, other)
    assert [p.name for p in pending] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    with caplog.at_level(logging.INFO, logger="thinkdiff.data.extract"):
        written = pipeline.cache_feature_shard(cfg, pending[0])  # what the flow's mapped task runs
    rows = pq.ParquetFile(written).metadata.num_rows
    assert any(re.fullmatch(rf"features: wrote part-00000.parquet \({rows} images in \S+s\); "
                            rf"2 shards left, \S+ img/s, ETA \d+s",
                            r.getMessage()) for r in caplog.records)
    assert written.parent == stage_dir(cfg, "features", other) != features_dir
    assert [p.name for p in pipeline.pending_feature_shards(cfg, other)] == ["00001.parquet", "00002.parquet"]


def test_corrupt_images_are_recorded_and_skipped(demo_corpus, tmp_path):
    cfg, corpus_dir = demo_corpus
    copy = tmp_path / "corpus"
    shutil.copytree(corpus_dir, copy)
    shard = copy / "00000.parquet"
    table = pq.read_table(shard)
    ok = [i for i, status in enumerate(table.column("status").to_pylist()) if status == "success"]
    jpg = table.column("jpg").to_pylist()
    jpg[ok[2]] = b"not an image at all"
    jpg[ok[4]] = jpg[ok[4]][:40]  # truncated
    table = table.set_column(table.schema.get_field_index("jpg"), "jpg", pa.array(jpg, pa.binary()))
    pq.write_table(table, shard)
    out = pipeline.cache_features(cfg, copy, tmp_path / "features")
    store = FeatureStore(out)
    assert store.num_samples == 38
    failures = read_shard_failures(store.shards[0])
    keys = table.column("key").to_pylist()
    assert [f["key"] for f in failures] == [keys[ok[2]], keys[ok[4]]]
    assert all(f["error"] for f in failures)
    assert store.manifest["shards"][0]["num_failed"] == 2


def test_an_out_directory_of_another_stage_is_refused(demo_corpus, tmp_path):
    """`features --out` naming a training run: refused, where it was printed as a complete store."""
    cfg, corpus_dir = demo_corpus
    run = tmp_path / "run"
    write_manifest(run, {"stage": "train", "step": 5})
    with pytest.raises(DataContractError,
                       match=rf"{run} holds the output of the train stage; give the directory of a features"):
        pipeline.cache_features(cfg, corpus_dir=corpus_dir, out_dir=run)


def test_missing_corpus_is_a_clear_error(make_cfg):
    with pytest.raises(FileNotFoundError, match="run `thinkdiff corpus` with the same --config and overrides"):
        pipeline.cache_features(make_cfg())


def test_compiled_extraction_keeps_one_batch_size(demo_corpus, tmp_path, monkeypatch):
    """features.compile: every generate() call has features.batch_size rows (a shard's short last
    batch is filled with copies), and only the real images are stored."""
    _, corpus_dir = demo_corpus
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "features.compile=true", "features.batch_size=6"])
    sizes = []
    real_generate = extract.generate_with_states

    def recording(vlm, batch, **kwargs):
        sizes.append(batch["input_ids"].shape[0])
        return real_generate(vlm, batch, **kwargs)

    monkeypatch.setattr(extract, "generate_with_states", recording)
    out = pipeline.cache_features(cfg, corpus_dir, tmp_path / "features")
    per_shard = [pq.read_table(p, columns=["key"])["key"].to_pylist() for p in sorted(out.glob("part-*.parquet"))]
    assert any(len(keys) % 6 for keys in per_shard)  # some shard does end on a short batch
    assert set(sizes) == {6} and len(sizes) == sum(-(-len(keys) // 6) for keys in per_shard)
    keys = [k for shard in per_shard for k in shard]
    assert len(keys) == len(set(keys)) == 40


def test_compiled_decode_step_gives_the_eager_ids_and_states_with_one_graph(monkeypatch):
    """features.compile: the static-cache decode loop with its step compiled (forced onto the CPU
    here, without CUDA graphs; in production it compiles on CUDA only): the eager path's ids and
    states, one graph and one reused cache for two batches whose prompt lengths differ."""
    from torch._dynamo.utils import counters

    from thinkdiff.models import decode

    vlm = build_tiny_vlm(min_pixels=28 * 28, max_pixels=112 * 112)
    short = [[Image.new("RGB", (56, 56), (9, 9, 9)), "Hi."], two_prompts()[0]]
    batches = [encode_chat(vlm, short, SYSTEM), encode_chat(vlm, two_prompts(), SYSTEM)]
    # The second prompt is longer: without rounding the static cache up, it would need a new graph.
    assert batches[0]["input_ids"].shape[1] < batches[1]["input_ids"].shape[1]
    greedy = dict(max_new_tokens=12, temperature=0, top_p=1.0, seed=0, kv_cache="static")
    eager = [generate_with_states(vlm, b, **greedy) for b in batches]
    monkeypatch.setattr(decode, "decode_compile_options", lambda device: dict(mode="default", dynamic=False))
    torch._dynamo.reset()
    counters.clear()
    compiled, caches = [], []
    for b in batches:
        compiled.append(generate_with_states(vlm, b, **greedy, compile=True))
        caches.append(vlm.static_cache[1])
    assert counters["stats"]["unique_graphs"] == 1
    assert caches[0] is caches[1]  # one cache, reset and reused: the same tensors for the CUDA graphs
    for e_batch, c_batch in zip(eager, compiled, strict=True):
        for e, c in zip(e_batch, c_batch, strict=True):
            assert e.token_ids == c.token_ids
            torch.testing.assert_close(c.states_LD, e.states_LD, rtol=1e-5, atol=1e-5)
