"""Covers: the learning-rate schedule (its cosine horizon past max_steps) and weight-decay groups of
docs/method.md; the aligner's initial weights (train.aligner_init); the masked-split
collate; the streaming sample order and its resume position; length buckets (less padding than one
sort, ranks' slices) and their loss weight (every token weighs as in plain random batches); the
frozen decoder's dropout (train.t5_dropout: seeded by torch, eager and compiled, refused with
flex); checkpoints (atomic, keep_last, weights_only); a run stopped after step K and resumed equals
an uninterrupted run bitwise, dropout on, and logs its metrics rows, stopped between logging steps;
one training per run directory (a second refused naming the holder, or waiting with --wait; a
killed holder frees it); the aligner learns on a fixed feature set."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from transformers import ByT5Tokenizer

from thinkdiff import pipeline, registry
from thinkdiff.cli import main
from thinkdiff.config import load_config
from thinkdiff.data.features import FeatureStore, StoredFeatures
from thinkdiff.errors import ConfigError, DataContractError
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.models.attention import gather_slots
from thinkdiff.models.t5 import IGNORE_INDEX
from thinkdiff.models.tiny import build_tiny_qwen_tokenizer
from thinkdiff.storage import read_manifest, stage_dir, write_manifest
from thinkdiff.train.checkpoint import list_checkpoints, load_trainer_state, read_meta
from thinkdiff.train.data import MaskedSplitCollator, Sample, SampleStream, StreamPosition, lvlm_usable, take
from thinkdiff.train.loop import lr_multiplier, param_groups, train_aligner


def test_lr_schedule_warmup_then_cosine_to_final():
    t = load_config("paper-lvlm", ["train.lr_horizon_steps=25000"]).train
    lr = lambda step: t.lr * lr_multiplier(t)(step)  # noqa: E731
    assert lr(0) == pytest.approx(1e-6)
    assert lr(1000) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr(2000) == pytest.approx(1e-4)
    mid = 2000 + (25000 - 2000) // 2
    assert lr(mid) == pytest.approx(8e-5 + (1e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(25000) == pytest.approx(8e-5)
    tiny = load_config("tiny").train  # horizon = max_steps: the run ends at final_lr
    assert tiny.lr_horizon_steps == tiny.max_steps
    assert tiny.lr * lr_multiplier(tiny)(tiny.max_steps) == pytest.approx(tiny.final_lr)


def test_lr_cosine_runs_to_its_horizon_past_the_last_step():
    """The paper presets, as the official release: the cosine spans 200,000 steps of which the run
    trains 25,000, so its rate ends near 1e-4, not at final_lr."""
    t = load_config("paper-lvlm").train
    assert (t.max_steps, t.lr_horizon_steps, t.warmup_steps) == (25000, 200000, 2000)
    assert (t.lr, t.final_lr, t.warmup_start_lr) == (1e-4, 8e-5, 1e-6)
    lr = lambda step: t.lr * lr_multiplier(t)(step)  # noqa: E731

    def cosine(step: int) -> float:
        progress = (step - 2000) / (200000 - 2000)
        return 8e-5 + (1e-4 - 8e-5) * (1 + math.cos(math.pi * progress)) / 2

    assert lr(1000) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    for step in (2000, 13500, 25000, 120000):
        assert lr(step) == pytest.approx(cosine(step), rel=1e-12)
    assert lr(25000) == pytest.approx(9.9e-5, abs=5e-7)  # the release's rate there: still about 9.9e-5
    assert lr(200000) == pytest.approx(8e-5) and lr(250000) == pytest.approx(8e-5)


@pytest.mark.parametrize(("preset", "init"), [("tiny", "pytorch"), ("tiny-clip", "normal")])
def test_aligner_init_follows_the_preset(preset, init):
    """normal (ThinkDiff-CLIP): Linear weights N(0, 0.02), biases exactly zero; pytorch
    (ThinkDiff-LVLM): nn.Linear's default, uniform within 1/sqrt(fan_in), biases too. Either way the
    norm is the T5 encoder's, and the same seed gives the same aligner."""
    from thinkdiff.train.loop import build_aligner

    t = load_config(preset).train
    assert t.aligner_init == init
    norm = torch.rand(256) + 0.5
    aligner = build_aligner(t, 512, 256, norm)
    assert torch.equal(aligner.norm.weight.detach(), norm)
    for linear in (aligner.fc1, aligner.fc2):
        weight, bias = linear.weight.detach(), linear.bias.detach()
        if init == "normal":
            assert weight.std().item() == pytest.approx(0.02, rel=0.03) and abs(weight.mean().item()) < 1e-3
            assert torch.count_nonzero(bias) == 0
        else:
            bound = linear.in_features**-0.5
            assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
            assert torch.count_nonzero(bias) == bias.numel() and bias.abs().max() <= bound
    again = build_aligner(t, 512, 256, norm)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in aligner.state_dict().items())


def test_weight_decay_only_on_matrices():
    aligner = Aligner(AlignerConfig(in_dim=4, out_dim=6))
    decay, no_decay = param_groups(aligner, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(aligner.fc1.weight), id(aligner.fc2.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(aligner.fc1.bias), id(aligner.fc2.bias), id(aligner.norm.weight)}


def test_masked_split_collate():
    qwen, t5 = build_tiny_qwen_tokenizer(), ByT5Tokenizer()
    text = "a small red circle on a blue background"
    ids = qwen(text)["input_ids"] + [qwen.convert_tokens_to_ids("<|im_end|>")]
    samples = [Sample(ids, StoredFeatures.encode(torch.randn(min(len(ids), 16), 8))),
               Sample(ids[:3], StoredFeatures.encode(torch.randn(3, 8)))]
    collate = MaskedSplitCollator(qwen, t5, max_source_rows=16, max_target_tokens=12, seed=0)
    for step in range(50):
        s = collate.split_points([len(ids), 3], step)
        assert 1 <= s[0] <= min(len(ids) - 1, 16) and 1 <= s[1] <= 2
        batch = collate(samples, step)
        assert batch.features_RD.shape == (sum(s), 8) and batch.source_slots_BS.shape == (2, max(s))
        assert batch.source_mask_BS.sum(1).tolist() == s
        for i in (0, 1):
            assert torch.equal(batch.features_RD[batch.source_slots_BS[i, : s[i]]],
                               samples[i].features.decode()[: s[i]])
        # Target: the rest of the caption re-tokenized by T5 with </s>, truncated, padded with -100.
        expected = t5(qwen.decode(ids[s[0]:], skip_special_tokens=True), max_length=12, truncation=True)["input_ids"]
        labels = batch.labels_BT[0]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        assert expected[-1] == t5.eos_token_id and len(expected) <= 12
    # The same step draws the same splits; different steps differ somewhere.
    assert collate.split_points([40] * 8, 3) == collate.split_points([40] * 8, 3)
    assert collate.split_points([40] * 8, 3) != collate.split_points([40] * 8, 4)


def test_stream_resumes_at_saved_position_across_epochs(tiny_store):
    _, features_dir = tiny_store
    store = FeatureStore(features_dir)
    stream = SampleStream(store, seed=0, position=StreamPosition(), usable=lvlm_usable)
    it = iter(stream)
    first = take(it, 30)
    saved = StreamPosition(stream.position.epoch, stream.position.index)
    rest = take(it, 70)  # crosses into the next epochs (40 samples per epoch)
    assert stream.position.epoch >= 2
    resumed = take(iter(SampleStream(store, seed=0, position=saved, usable=lvlm_usable)), 70)
    assert [s.token_ids for s in resumed] == [s.token_ids for s in rest]
    assert all(torch.equal(a.features.decode(), b.features.decode()) for a, b in zip(resumed, rest, strict=True))
    # An epoch is a permutation of the store; the next epoch is another permutation.
    epoch0 = [tuple(s.token_ids) for s in first + rest[:10]]
    epoch1 = [tuple(s.token_ids) for s in rest[10:50]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_resumed_run_equals_uninterrupted_run_bitwise(tiny_store, tmp_path):
    """With the decoder's dropout on (the preset's): the checkpoint holds the random state its masks
    are drawn from, and the resumed run draws what the uninterrupted one did."""
    cfg, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=12", "train.warmup_steps=3",
                               "train.checkpoint_every=4", "train.keep_last=2", "train.log_every=2",
                               "train.batch_size=8"])
    assert cfg.train.t5_dropout
    full = train_aligner(cfg, features_dir, tmp_path / "full")
    first = train_aligner(cfg, features_dir, tmp_path / "resumed", stop_after_steps=6)
    assert first.step == 6 and not (tmp_path / "resumed" / "manifest.json").exists()
    # Make it a crash between checkpoints: step 6's checkpoint never completed (a writer's temporary
    # directory is left), while metrics.jsonl already holds step 6's line and half of step 8's.
    checkpoints = tmp_path / "resumed" / "checkpoints"
    shutil.rmtree(checkpoints / "step_000006")
    (checkpoints / ".step_000006.x1y2.tmp" / "aligner").mkdir(parents=True)
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == 6
    metrics.write_text(metrics.read_text() + '{"step": 8, "lo')
    assert len(load_trainer_state(checkpoints / "step_000004")["rng_cpu"]) == 1  # one per process
    torch.manual_seed(1234)  # a new process: its global generator is not where the killed one left it
    second = train_aligner(cfg, features_dir, tmp_path / "resumed")
    assert second.step == 12 == full.step
    a, b = Aligner.from_pretrained(full.aligner_dir), Aligner.from_pretrained(second.aligner_dir)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # The resumed run's metrics are one clean history, the same as the uninterrupted one.
    read = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["step"], r["loss"]) for r in read(tmp_path / "resumed")] == [(r["step"], r["loss"])
                                                                           for r in read(tmp_path / "full")]
    assert not list(checkpoints.glob(".step_*.tmp"))


def test_a_run_directory_of_other_settings_is_neither_resumed_nor_reused(tiny_store, tmp_path):
    """`train --out DIR` naming another config's run: refused mid-run (its checkpoint would be
    resumed under settings it was not trained with) and complete (its result would be returned as
    this config's); the run is left as it was."""
    _, features_dir = tiny_store
    base = [f"paths.root={tmp_path}", "train.max_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2",
            "train.batch_size=4"]
    cfg, other = load_config("tiny", base), load_config("tiny", [*base, "train.lr=5e-4"])
    run = tmp_path / "run"
    train_aligner(cfg, features_dir, run, stop_after_steps=2)
    for when in ("mid-run", "complete"):
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        with pytest.raises(DataContractError,
                           match=rf"{run} holds a training run of other settings .* give a new --out"):
            train_aligner(other, features_dir, run)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, when
        train_aligner(cfg, features_dir, run)  # its own config resumes, then finds it complete
    assert read_manifest(run, "train")["step"] == 4


@pytest.mark.parametrize("damage", [b"", b"\x80not a torch file", b"PK\x03\x04cut", "truncated", "OSError"])
def test_an_unreadable_trainer_state_names_the_checkpoint_to_delete(tmp_path, monkeypatch, damage):
    checkpoint = tmp_path / "checkpoints" / "step_000004"
    checkpoint.mkdir(parents=True)
    path = checkpoint / "trainer_state.pt"
    if damage == "truncated":  # a real state cut where a killed copy or a full disk leaves it
        torch.save({"step": 4, "optimizer": {"state": {0: {"exp_avg": torch.ones(64, 64)}}},
                    "rng_cpu": [torch.get_rng_state()]}, path)
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "OSError":  # what torch.load raises for some truncated files, rather than a RuntimeError
        path.write_bytes(b"PK\x03\x04")
        monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(
            OSError("PytorchStreamReader failed reading zip archive: failed finding central directory")))
    else:
        path.write_bytes(damage)
    with pytest.raises(DataContractError,
                       match=rf"trainer_state.pt is unreadable \(.+\): delete {checkpoint} to resume"):
        load_trainer_state(checkpoint)


def test_checkpoints_are_complete_pruned_and_weights_only(tiny_store, tmp_path):
    _, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=10", "train.warmup_steps=2",
                               "train.checkpoint_every=3", "train.keep_last=2", "train.batch_size=4"])
    result = train_aligner(cfg, features_dir, tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000009", "step_000010"]
    assert sorted(p.name for p in result.checkpoint.iterdir()) == ["aligner", "meta.json", "trainer_state.pt"]
    state = load_trainer_state(result.checkpoint)  # torch.load(weights_only=True) inside
    assert state["step"] == 10 and set(state) >= {"optimizer", "scheduler", "rng_cpu", "batcher"}
    meta = read_meta(result.checkpoint)
    assert meta["step"] == 10 and meta["config"]["train"]["max_steps"] == 10
    assert meta["features_fingerprint"] == read_manifest(features_dir)["fingerprint"] and meta["git_revision"]
    assert meta["corpus_fingerprint"] == read_manifest(features_dir)["corpus_fingerprint"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["checkpoint"] == "checkpoints/step_000010"  # relative: the run directory may move
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # Complete: a rerun is skipped and returns the same checkpoint.
    assert train_aligner(cfg, features_dir, tmp_path / "run").checkpoint == result.checkpoint


def test_a_store_of_another_corpus_trains_into_a_run_of_its_own(tiny_store, tmp_path, capsys):
    """`train --features DIR` with a store made from another corpus: another run directory, and the
    checkpoint, the run and the registered version name that store, not the config's."""
    _, features_dir = tiny_store
    overrides = [f"paths.root={tmp_path}", "train.max_steps=2", "train.warmup_steps=1", "train.batch_size=4"]
    cfg = load_config("tiny", overrides)
    other = shutil.copytree(features_dir, tmp_path / "other-features")
    manifest = read_manifest(other)
    write_manifest(other, {**manifest, "fingerprint": "f" * 16, "corpus_fingerprint": "c" * 16})
    result = pipeline.train_aligner(cfg, features_dir=other)
    assert result.run_dir == stage_dir(cfg, "train", other) != stage_dir(cfg, "train")
    meta = read_meta(result.checkpoint)
    assert (meta["features_fingerprint"], meta["corpus_fingerprint"]) == ("f" * 16, "c" * 16)
    # Registered from the command line by naming the run (the config alone points at its own).
    assert main(["registry", "register", "--config", "tiny", "--run", str(result.run_dir), *overrides]) == 0
    ref = registry.Registry(cfg).resolve_model(capsys.readouterr().out.strip())
    tags = MlflowClient(tracking_uri=registry.tracking_uri(cfg)).get_run(ref.run_id).data.tags
    assert (tags[registry.TAG_FEATURES_FP], tags[registry.TAG_CORPUS_FP]) == ("f" * 16, "c" * 16)


def test_aligner_learns_on_a_fixed_feature_set(tiny_store, tmp_path):
    _, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=150", "train.warmup_steps=5",
                               "train.lr=3e-3", "train.final_lr=3e-4", "train.log_every=10", "train.batch_size=8"])
    train_aligner(cfg, features_dir, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses


def test_float8_store_trains_within_one_percent_of_bf16(demo_corpus, tiny_store, tmp_path):
    from thinkdiff import pipeline

    cfg, bf16_dir = tiny_store
    _, corpus_dir = demo_corpus
    overrides = [f"paths.root={tmp_path}", "corpus.demo_images=40", "corpus.shard_size=16", "corpus.demo_broken=3",
                 "train.max_steps=60", "train.warmup_steps=5", "train.log_every=20", "train.batch_size=8"]
    fp8_cfg = load_config("tiny", [*overrides, "features.storage_dtype=float8_e4m3"])
    fp8_dir = pipeline.cache_features(fp8_cfg, corpus_dir)
    assert FeatureStore(fp8_dir).info.dtype == "float8_e4m3"
    train_cfg = load_config("tiny", overrides)
    final = {}
    for name, features_dir in (("bf16", bf16_dir), ("fp8", fp8_dir)):
        train_aligner(train_cfg, features_dir, tmp_path / name)
        final[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert abs(final["fp8"] - final["bf16"]) <= 0.01 * final["bf16"], final


def test_training_path_equals_the_naive_padded_path():
    """The project's step (decoder only, source rows packed, targets padded to the batch's longest,
    logits for real tokens only) gives the loss and aligner gradients of transformers' full model
    padded to 128 on the same samples."""
    from thinkdiff.models.t5 import T5DecoderLM
    from thinkdiff.models.tiny import build_tiny_t5
    from thinkdiff.train.data import Prepared, pad
    from thinkdiff.train.loop import encoder_states

    full = build_tiny_t5().requires_grad_(False)
    decoder = T5DecoderLM(build_tiny_t5())
    g = torch.Generator().manual_seed(0)
    src, tgt = [5, 17, 9], [8, 3, 12]
    feats = torch.randn(3, 128, 64, generator=g)
    labels = [torch.randint(2, 300, (t,), generator=g) for t in tgt]
    aligner = Aligner(AlignerConfig(in_dim=64, out_dim=32))

    mask = (torch.arange(128) < torch.tensor(src)[:, None]).long()
    padded_labels = torch.full((3, 128), IGNORE_INDEX)
    for i, t in enumerate(tgt):
        padded_labels[i, :t] = labels[i]
    naive = full(encoder_outputs=(aligner(feats * mask[..., None]),), attention_mask=mask, labels=padded_labels).loss
    naive_grads = torch.autograd.grad(naive, list(aligner.parameters()))
    batch = pad([Prepared(StoredFeatures.encode(feats[i, :s]), source_rows=s, target_ids=labels[i].tolist())
                 for i, s in enumerate(src)], pad_id=0)
    assert batch.features_RD.shape == (sum(src), 64) and batch.labels_BT.shape == (3, max(tgt))
    rows, slots = encoder_states(aligner, None, batch)
    project = decoder.loss(rows, slots, batch.labels_BT)
    project_grads = torch.autograd.grad(project, list(aligner.parameters()))
    torch.testing.assert_close(project, naive, rtol=1e-5, atol=1e-5)
    for a, b in zip(project_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _target_padding(batch):
    return (batch.labels_BT == IGNORE_INDEX).float().mean().item()


def test_length_buckets_cut_padding_and_split_ranks(tiny_store):
    from thinkdiff.train.data import Batcher, BatcherState

    cfg, features_dir = tiny_store
    store = FeatureStore(features_dir)
    collate = MaskedSplitCollator(build_tiny_qwen_tokenizer(), ByT5Tokenizer(), max_source_rows=16,
                                  max_target_tokens=32, seed=0)

    def batches(window, batch_size=4, world=1, rank=0, n=40):
        it = iter(Batcher(store, collate, lvlm_usable, seed=0, batch_size=batch_size, world=world, rank=rank,
                          window=window, state=BatcherState()))
        return [next(it) for _ in range(n)]

    plain = [_target_padding(b) for b in batches(window=1)]
    bucketed = [_target_padding(b) for b in batches(window=10)]
    assert sum(bucketed) < 0.5 * sum(plain)  # target padding: the decoder's work (source rows are packed)
    # Two processes: each takes its half of every global batch; together they are the global batch.
    whole = batches(window=5, batch_size=8, n=6)
    halves = [batches(window=5, batch_size=8, world=2, rank=r, n=6) for r in (0, 1)]
    for k in range(6):
        joined = torch.cat([halves[0][k].features_RD, halves[1][k].features_RD])
        assert torch.equal(joined, whole[k].features_RD)
        assert halves[0][k].labels_BT.shape[0] == halves[1][k].labels_BT.shape[0] == 4
    with pytest.raises(ValueError, match="a global batch of 8 does not split over 3 processes"):
        Batcher(store, collate, lvlm_usable, seed=0, batch_size=8, world=3, rank=0, window=5, state=BatcherState())


def test_length_buckets_group_by_target_length():
    """Every index once, in groups of the batch size, each group's targets a run of the sorted
    targets: under the decoder's cost (target tokens padded, source rows packed), no grouping of the
    pool pads less."""
    from thinkdiff.train.data import length_buckets

    rng = np.random.default_rng(0)
    costs = list(zip(rng.integers(8, 129, 2048).tolist(), rng.integers(1, 129, 2048).tolist(), strict=True))
    groups = length_buckets(costs, 32)
    assert sorted(i for g in groups for i in g) == list(range(2048)) and {len(g) for g in groups} == {32}
    for first, second in zip(groups[:-1], groups[1:], strict=True):
        assert max(costs[i][0] for i in first) <= min(costs[i][0] for i in second)
    padded = sum(32 * max(costs[i][0] for i in g) for g in groups) - sum(t for t, _ in costs)
    unsorted = sum(32 * max(t for t, _ in costs[k: k + 32]) for k in range(0, 2048, 32)) - sum(t for t, _ in costs)
    assert padded < 0.05 * unsorted
    assert [len(g) for g in length_buckets(costs[:70], 32)] == [32, 32, 6]  # a short pool: the last group short


def test_prefetched_batches_are_the_batchers_with_their_states(tiny_store, tmp_path):
    """The background thread hands over the batcher's own batches in order, each with the state a
    checkpoint after it must hold; its errors reach the consumer; leaving the context stops it."""
    import threading

    from thinkdiff.train.data import Batcher, BatcherState, prefetched

    cfg, features_dir = tiny_store
    store = FeatureStore(features_dir)
    collate = MaskedSplitCollator(build_tiny_qwen_tokenizer(), ByT5Tokenizer(), max_source_rows=16,
                                  max_target_tokens=32, seed=0)
    make = lambda state: Batcher(store, collate, lvlm_usable, seed=0, batch_size=4, world=1, rank=0,  # noqa: E731
                                 window=3, state=state)
    plain = make(BatcherState())
    expected = []
    for batch in plain:
        expected.append((batch, BatcherState(**plain.state.__dict__)))
        if len(expected) == 14:  # past an epoch (40 samples) and several pools
            break
    with prefetched(make(BatcherState()), depth=4) as batches:
        got = [next(batches) for _ in range(14)]
    assert [s for _, s in got] == [s for _, s in expected]
    for (a, _), (b, _) in zip(got, expected, strict=True):
        assert torch.equal(a.features_RD, b.features_RD) and torch.equal(a.labels_BT, b.labels_BT)
        assert torch.equal(a.target_positions_N, (b.labels_BT.flatten() != IGNORE_INDEX).nonzero().squeeze(1))
    # A batcher started from a consumed batch's state continues with the next batch.
    with prefetched(make(got[5][1]), depth=4) as batches:
        assert torch.equal(next(batches)[0].labels_BT, expected[6][0].labels_BT)
    assert not [t for t in threading.enumerate() if t.name == "batches"]
    # Nothing is read before the first request (a resumed run that is already complete asks none).
    reads = []

    class Counting(Batcher):
        def __iter__(self):
            reads.append(1)
            yield from super().__iter__()

    with prefetched(Counting(store, collate, lvlm_usable, seed=0, batch_size=4, world=1, rank=0, window=3,
                             state=BatcherState()), depth=2):
        pass
    assert reads == []

    class Broken(Batcher):
        def __iter__(self):
            yield from ()
            raise ValueError("features.parquet: no sample can be split")

    with pytest.raises(ValueError, match="no sample can be split"), \
            prefetched(Broken(store, collate, lvlm_usable, seed=0, batch_size=4, world=1, rank=0, window=3,
                              state=BatcherState()), depth=2) as batches:
        next(batches)
    assert not [t for t in threading.enumerate() if t.name == "batches"]


def test_a_batch_decodes_only_its_own_source_rows(tiny_store, monkeypatch):
    """Each process decodes the features of its own slice of a global batch, and of each sample
    only the source rows its split keeps, into the batch; the rest of a pool stays encoded."""
    from thinkdiff.train.data import Batcher, BatcherState

    cfg, features_dir = tiny_store
    store = FeatureStore(features_dir)
    decoded = []
    full_decode = StoredFeatures.decode

    def recording(self, rows=None, out=None):
        decoded.append((rows, self.num_rows))
        return full_decode(self, rows, out)

    monkeypatch.setattr(StoredFeatures, "decode", recording)
    collate = MaskedSplitCollator(build_tiny_qwen_tokenizer(), ByT5Tokenizer(), max_source_rows=8,
                                  max_target_tokens=12, seed=0)
    batches = iter(Batcher(store, collate, lvlm_usable, seed=0, batch_size=6, world=2, rank=1, window=4,
                           state=BatcherState()))
    for _ in range(8):  # two pools
        start = len(decoded)
        batch = next(batches)
        mine = decoded[start:]
        assert len(mine) == 3  # this rank's 3 samples, not the global batch of 6 or the pool of 24
        assert sorted(rows for rows, _ in mine) == sorted(batch.source_mask_BS.sum(1).tolist())
    assert all(rows <= min(8, num_rows - 1) for rows, num_rows in decoded)  # the split's rows, never a whole sample


def test_threaded_batching_puts_each_sample_in_its_rows():
    from concurrent.futures import ThreadPoolExecutor

    from thinkdiff.train.data import Prepared, pad

    g = torch.Generator().manual_seed(0)
    prepared = [Prepared(StoredFeatures.encode(torch.randn(9, 5, generator=g), "bfloat16"), source_rows=s,
                         target_ids=[7] * (s + 1))
                for s in (3, 9, 1, 6, 6, 2)]
    with ThreadPoolExecutor(4) as pool:
        batch = pad(prepared, 0, decoders=pool)
    assert torch.equal(batch.features_RD, pad(prepared, 0).features_RD) and batch.features_RD.shape == (27, 5)
    assert batch.source_slots_BS.shape == (6, 9)
    laid_out = gather_slots(batch.features_RD, batch.source_slots_BS)
    for i, p in enumerate(prepared):
        assert torch.equal(laid_out[i, : p.source_rows], p.features.decode()[: p.source_rows])
        assert (batch.source_slots_BS[i, p.source_rows:] == -1).all()
        assert (batch.source_mask_BS[i].sum() == p.source_rows
                and (batch.labels_BT[i] != IGNORE_INDEX).sum() == p.source_rows + 1)


def test_a_store_with_fewer_rows_than_the_split_is_refused(tiny_store, tmp_path):
    cfg, features_dir = tiny_store
    stored = FeatureStore(features_dir).info.max_feature_rows
    more = load_config("tiny", [f"paths.root={tmp_path}", f"features.max_feature_rows={stored + 8}",
                                f"train.max_source_rows={stored + 8}"])
    with pytest.raises(DataContractError, match=rf"keeps {stored} feature rows .* set train.max_source_rows={stored}"):
        train_aligner(more, features_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_flex_decoder_attention_is_refused_on_a_cpu_before_anything_is_written(tiny_store, tmp_path):
    cfg, features_dir = tiny_store
    flex = load_config("tiny", [f"paths.root={tmp_path}", "train.decoder_attention=flex", "train.compile=true",
                                "train.t5_dropout=false"])
    with pytest.raises(ConfigError,
                       match="train.decoder_attention=flex needs a CUDA GPU .* use train.decoder_attention=sdpa"):
        train_aligner(flex, features_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # Dropout asked of the flex kernel, which has none: refused, naming both settings, on any device.
    with pytest.raises(ConfigError, match=r"train.decoder_attention=flex runs the T5 decoder without dropout .* "
                                          r"train.t5_dropout=true .* use train.decoder_attention=sdpa, or set "
                                          r"train.t5_dropout=false"):
        train_aligner(load_config("tiny", [f"paths.root={tmp_path}", "train.decoder_attention=flex",
                                           "train.compile=true"]),
                      features_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_compiled_decoder_trains_like_eager_with_one_graph(tiny_store, tmp_path, monkeypatch):
    """train.compile: the same losses as eager, and no new graph for batches of new (rows, source, target) shapes."""
    from torch._dynamo.utils import counters

    from thinkdiff.models.t5 import T5DecoderLM

    cfg, features_dir = tiny_store
    shapes = set()
    eager_loss = T5DecoderLM.loss

    def recording_loss(self, rows, slots, labels, positions):
        shapes.add((rows.shape[0], slots.shape[1], labels.shape[1]))
        return eager_loss(self, rows, slots, labels, positions)

    monkeypatch.setattr(T5DecoderLM, "loss", recording_loss)
    # Dropout off: compiled code draws other masks than eager (test_t5_dropout_... has it on).
    overrides = [f"paths.root={tmp_path}", "train.max_steps=6", "train.warmup_steps=2", "train.log_every=1",
                 "train.batch_size=4", "train.t5_dropout=false"]
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        train_aligner(load_config("tiny", [*overrides, f"train.compile={compiled}"]), features_dir,
                      tmp_path / f"run-{compiled}")
        losses[compiled] = [json.loads(line)["loss"]
                            for line in (tmp_path / f"run-{compiled}" / "metrics.jsonl").read_text().splitlines()]
    assert len(shapes) >= 4
    # Per kind of decoder block (first, later), plus one where dynamo specialises a size (a batch of
    # 4 equals the tiny T5's head count), not per batch shape (at least 4 shapes, each compiled for
    # both blocks, would make 8).
    assert 2 <= counters["stats"]["unique_graphs"] <= 4
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


def _decoder_batch():
    """Packed source rows, their slots and padded labels for the tiny T5 decoder."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    states = torch.randn(3, 6, 32, generator=g)
    slots = torch.where(mask.bool(), (mask.flatten().cumsum(0) - 1).view(mask.shape), -1)
    labels = torch.randint(2, 200, (3, 7), generator=g)
    labels[1, 3:], labels[2, 5:] = IGNORE_INDEX, IGNORE_INDEX
    return states[mask.bool()], slots, labels


@pytest.mark.parametrize("compiled", [False, True])
def test_t5_dropout_draws_from_the_torch_seed_only_when_on(compiled, monkeypatch):
    """train.t5_dropout: the frozen decoder (flan-t5's dropout 0.1 in the tiny T5) in train
    mode, its attention dropout reaching SDPA, so two torch seeds give two losses on one batch and
    a seed repeats its loss, eager and compiled (train.compile); off, every seed gives the
    eval-mode loss. The weights stay frozen either way."""
    import torch.nn.functional as F

    from thinkdiff.config import ModelSource
    from thinkdiff.models.t5 import load_t5

    decoder = load_t5(ModelSource(id="tiny", revision="tiny-v1", dtype="float32"),
                      device=torch.device("cpu")).decoder_lm
    assert decoder.config.dropout_rate == 0.1
    rows, slots, labels = _decoder_batch()
    with torch.no_grad():
        eval_loss = decoder.loss(rows, slots, labels)
    if compiled:
        torch._dynamo.reset()
        decoder.compile_decoder()
    sdpa, dropout_p = F.scaled_dot_product_attention, []

    def recording_sdpa(*args, **kwargs):
        dropout_p.append(kwargs.get("dropout_p", 0.0))
        return sdpa(*args, **kwargs)

    if not compiled:  # what the attention kernels are asked for (compiled code calls no Python)
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)

    def loss_with_seed(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        source = rows.clone().requires_grad_(True)
        loss = decoder.loss(source, slots, labels)
        loss.backward()  # the training step's backward: the gradient reaches the aligned rows only
        assert source.grad is not None and source.grad.abs().sum() > 0
        return loss.detach()

    decoder.set_dropout(True)
    decoder.eval().train()  # a parent's train() / eval() leaves the setting as it is
    assert decoder.training and all(m.training for m in decoder.modules())
    on = [loss_with_seed(seed) for seed in (0, 1, 0)]
    assert torch.equal(on[0], on[2]) and not torch.allclose(on[0], on[1], rtol=1e-4)
    assert not torch.allclose(on[0], eval_loss, rtol=1e-4)
    assert not any(p.requires_grad or p.grad is not None for p in decoder.parameters())
    if compiled:  # compiled in eval mode: test_models.py's test_compiled_decoder_blocks_share_one_graph_and_match_eager
        return
    assert dropout_p and set(dropout_p) == {0.1}  # self- and cross-attention, both layers
    decoder.set_dropout(False)
    decoder.train()
    assert not any(m.training for m in decoder.modules())
    dropout_p.clear()
    off = [loss_with_seed(seed) for seed in (0, 1)]
    assert torch.equal(off[0], off[1])
    torch.testing.assert_close(off[0], eval_loss, rtol=1e-5, atol=1e-6)
    assert set(dropout_p) == {0.0}
    assert not any(p.requires_grad or p.grad is not None for p in decoder.parameters())


@pytest.mark.parametrize("dropout", [True, False])
def test_training_runs_the_frozen_decoder_with_dropout_as_set(tiny_store, tmp_path, monkeypatch, dropout):
    """The loop hands train.t5_dropout to the decoder: train mode while the aligner trains, the
    weights frozen; and a run with dropout repeats its losses (seeded)."""
    from thinkdiff.models.t5 import T5DecoderLM

    _, features_dir = tiny_store
    seen = []
    scored = T5DecoderLM.loss

    def recording_loss(self, *args, **kwargs):
        seen.append((self.training, {m.training for m in self.decoder.modules()},
                     any(p.requires_grad for p in self.parameters())))
        return scored(self, *args, **kwargs)

    monkeypatch.setattr(T5DecoderLM, "loss", recording_loss)
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=3", "train.warmup_steps=1",
                               "train.log_every=1", "train.batch_size=4", f"train.t5_dropout={dropout}"])
    losses = []
    for run in ("a", "b"):
        train_aligner(cfg, features_dir, tmp_path / run)
        losses.append([json.loads(line)["loss"]
                       for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    assert seen == [(dropout, {dropout}, False)] * 6
    assert losses[0] == losses[1]  # seeded: dropout or not, a run repeats


def _target_lengths(batch) -> torch.Tensor:
    return (batch.labels_BT != IGNORE_INDEX).sum(1)


def test_bucketed_batches_weigh_every_token_as_random_batches_do(tiny_store):
    """A batch's summed token loss is divided by the mean target tokens per global batch of its
    bucketing pool. Over each pool the step weights then add up to the pool's batches exactly, and
    over many steps a per-token quantity (here the token's own target length, which bucketing
    sorts by) weighs as in plain random batches, which take each batch's token mean: the mean over
    steps matches within sampling noise (under 1% here), where the token mean of each bucketed
    batch, weighing a short target's tokens more, comes out about 9% lower. `window=1` is each
    batch's own token mean, exactly."""
    from thinkdiff.train.data import Batcher, BatcherState

    _, features_dir = tiny_store
    store = FeatureStore(features_dir)
    collate = MaskedSplitCollator(build_tiny_qwen_tokenizer(), ByT5Tokenizer(), max_source_rows=16,
                                  max_target_tokens=32, seed=0)

    def batches(window, n, batch_size=8, world=1, rank=0):
        it = iter(Batcher(store, collate, lvlm_usable, seed=0, batch_size=batch_size, world=world, rank=rank,
                          window=window, state=BatcherState()))
        return [next(it) for _ in range(n)]

    def step_value(batch) -> float:
        """What a step descends for a per-token value equal to its target's length: the summed
        value over the step's normaliser (`train_step`: token mean x loss_weight)."""
        lengths = _target_lengths(batch).double()
        return ((lengths * lengths).sum() / lengths.sum()).item() * batch.loss_weight

    plain = batches(window=1, n=480)
    for batch in plain:  # the release's per-batch token mean, exactly
        assert batch.loss_tokens == batch.num_target_tokens and batch.loss_weight == 1.0
    window = 12
    bucketed = batches(window=window, n=480)
    for k in range(0, len(bucketed), window):
        assert sum(b.loss_weight for b in bucketed[k: k + window]) == pytest.approx(window, rel=1e-12)
    plain_mean = np.mean([step_value(b) for b in plain])
    bucketed_mean = np.mean([step_value(b) for b in bucketed])
    own_count_mean = np.mean([step_value(b) / b.loss_weight for b in bucketed])
    assert bucketed_mean == pytest.approx(plain_mean, rel=0.03)
    assert own_count_mean < 0.95 * plain_mean  # what bucketing did before: short targets weighed more
    # Two processes: each divides its share by half the global mean, and the average of their
    # gradients (accelerate's) is the one process's step on the whole global batch.
    halves = [batches(window=window, n=2 * window, world=2, rank=rank) for rank in (0, 1)]
    for whole, half0, half1 in zip(bucketed[: 2 * window], *halves, strict=True):
        assert half0.loss_tokens == half1.loss_tokens == whole.loss_tokens / 2
        summed = [(_target_lengths(b).double() ** 2).sum().item() / b.loss_tokens for b in (whole, half0, half1)]
        assert (summed[1] + summed[2]) / 2 == pytest.approx(summed[0], rel=1e-12)


def _train_in_two_processes(features_dir, run_dir, overrides: list[str]) -> None:
    """`thinkdiff train` in two CPU processes (torchrun; gloo), as `accelerate launch` runs it on two GPUs."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "thinkdiff", "train", "--config", "tiny",
                           "--features", str(features_dir), "--out", str(run_dir),
                           *overrides, "train.num_processes=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_train_as_one_and_resume_exactly(tiny_store, tmp_path):
    """Two processes, each on its half of every (bucketed) global batch, gradients averaged: dropout
    off, the weights of one process's run on the whole batches (each process divides its summed
    token loss by half the pool's mean tokens per global batch; a token mean per process would be
    off by about 1e-3 here). Dropout on: each process draws its own masks, and a run resumed from
    its step-4 checkpoint ends bitwise as the uninterrupted one (the checkpoint holds both
    processes' random states)."""
    _, features_dir = tiny_store
    overrides = [f"paths.root={tmp_path}", "train.max_steps=8", "train.warmup_steps=2", "train.log_every=2",
                 "train.checkpoint_every=4", "train.keep_last=3", "train.batch_size=8"]
    one = train_aligner(load_config("tiny", [*overrides, "train.t5_dropout=false"]), features_dir, tmp_path / "one")
    _train_in_two_processes(features_dir, tmp_path / "two", [*overrides, "train.t5_dropout=false"])
    two = Aligner.from_pretrained(list_checkpoints(tmp_path / "two" / "checkpoints")[-1] / "aligner")
    for key, value in Aligner.from_pretrained(one.aligner_dir).state_dict().items():
        torch.testing.assert_close(two.state_dict()[key], value, rtol=0, atol=1e-6)

    run = tmp_path / "dropout"
    _train_in_two_processes(features_dir, run, overrides)
    rng = load_trainer_state(run / "checkpoints" / "step_000004")["rng_cpu"]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1])
    uninterrupted = Aligner.from_pretrained(run / "checkpoints" / "step_000008" / "aligner").state_dict()
    shutil.rmtree(run / "checkpoints" / "step_000008")
    (run / "manifest.json").unlink()
    _train_in_two_processes(features_dir, run, overrides)
    resumed = Aligner.from_pretrained(run / "checkpoints" / "step_000008" / "aligner").state_dict()
    assert all(torch.equal(value, resumed[key]) for key, value in uninterrupted.items())


def test_a_run_stopped_between_logging_steps_logs_the_uninterrupted_rows(tiny_store, tmp_path):
    """Resumed at steps that are not multiples of train.log_every (from the checkpoint before a stop,
    and from the stop's own): the same metrics rows (step, loss, lr) as an uninterrupted run, bitwise,
    and the same recorded loss. The checkpoint keeps the open logging window's sums."""
    _, features_dir = tiny_store
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "train.max_steps=9", "train.warmup_steps=2",
                               "train.log_every=2", "train.checkpoint_every=3", "train.keep_last=3",
                               "train.batch_size=4"])
    full = train_aligner(cfg, features_dir, tmp_path / "full")
    run = tmp_path / "resumed"
    train_aligner(cfg, features_dir, run, stop_after_steps=5)  # logs its open window at 5; checkpoints 3 and 5
    assert [r["step"] for r in _metrics(run)] == [2, 4, 5]
    shutil.rmtree(run / "checkpoints" / "step_000005")  # died before step 5's checkpoint: resumes at 3
    train_aligner(cfg, features_dir, run, stop_after_steps=7)
    assert load_trainer_state(run / "checkpoints" / "step_000007")["log_window"][0]["steps"] == 1
    resumed = train_aligner(cfg, features_dir, run)  # at 7
    rows = lambda p: [(r["step"], r["loss"], r["lr"]) for r in _metrics(p)]  # noqa: E731
    assert rows(run) == rows(tmp_path / "full") and [r[0] for r in rows(run)] == [2, 4, 6, 8, 9]
    assert resumed.loss == full.loss == read_manifest(run, "train")["loss"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


_HOLD_RUN_DIRECTORY = """
import sys
from pathlib import Path
from thinkdiff.train.loop import hold_run_directory
with hold_run_directory(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_training_per_run_directory_and_a_killed_holder_frees_it(tmp_path, monkeypatch):
    """A second training of a held run directory is refused at once, naming the holder's pid and
    host; the training processes a launcher starts (and ranks past 0) find it held for them; once
    the holder is SIGKILLed the directory is free."""
    import socket
    import subprocess
    import sys

    from thinkdiff.train.loop import RUN_LOCK_ENV, RunDirectoryBusy, hold_run_directory, run_lock_path

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN_DIRECTORY, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirectoryBusy, match=rf"^{run} is being trained by pid {holder.pid} on "
                                                   rf"{socket.gethostname()}: wait for it, or pass --wait$"):
            with hold_run_directory(run):
                pass
        monkeypatch.setenv(RUN_LOCK_ENV, str(run.resolve()))  # what the launcher holding it sets
        with hold_run_directory(run):
            pass
        monkeypatch.delenv(RUN_LOCK_ENV)
        monkeypatch.setenv("RANK", "1")  # rank 0 of the same launch holds it
        with hold_run_directory(run):
            pass
        monkeypatch.delenv("RANK")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with hold_run_directory(run):
        assert run_lock_path(run).read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    assert not run.exists()  # the lock lies beside the run directory


def test_a_second_train_is_refused_or_with_wait_trains_after_the_first(tiny_store, tmp_path, capsys):
    import threading
    import time

    from thinkdiff.train.launch import launch_training
    from thinkdiff.train.loop import RunDirectoryBusy, hold_run_directory

    _, features_dir = tiny_store
    overrides = [f"paths.root={tmp_path}", "train.max_steps=2", "train.warmup_steps=1", "train.batch_size=4"]
    run = tmp_path / "run"
    command = ["train", "--config", "tiny", *overrides, "--features", str(features_dir), "--out", str(run)]
    held, release = threading.Event(), threading.Event()

    def first_training():
        with hold_run_directory(run):
            held.set()
            release.wait(60)

    first = threading.Thread(target=first_training)
    first.start()
    try:
        assert held.wait(10)
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{run} is being trained by pid {os.getpid()} on " in err and ": wait for it, or pass --wait" in err
        with pytest.raises(RunDirectoryBusy):  # the launcher refuses before it starts anything
            launch_training(load_config("tiny", overrides), features_dir, run)
        assert not run.exists()
        codes = []
        second = threading.Thread(target=lambda: codes.append(main([*command, "--wait"])))
        second.start()
        time.sleep(1)
        assert second.is_alive() and not run.exists()  # waiting, nothing written
    finally:
        release.set()
        first.join()
    second.join(120)
    assert codes == [0] and read_manifest(run, "train")["step"] == 2
