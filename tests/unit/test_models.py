"""Covers: tiny builders make the real classes with fixed weights and offline tokenizers; the T5
loader keeps only decoder + lm_head and hands out the encoder's final_layer_norm; both loaders
read a local directory the way they read a Hub id; the decoder loss equals transformers' own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration, T5ForConditionalGeneration

from thinkdiff.config import ModelSource
from thinkdiff.errors import DataContractError
from thinkdiff.models.t5 import load_t5, padded_slots, target_positions
from thinkdiff.models.tiny import build_tiny_t5, build_tiny_vlm
from thinkdiff.models.vlm import load_vlm

TINY = ModelSource(id="tiny", revision="tiny-v1", dtype="float32")
CPU = torch.device("cpu")


def test_tiny_vlm_is_the_real_class_and_deterministic():
    a = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    b = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    assert isinstance(a.model, Qwen2VLForConditionalGeneration)
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert a.tokenizer.decode(a.tokenizer("a cat, 3 dogs")["input_ids"]) == "a cat, 3 dogs"


def test_tiny_qwen_tokenizer_learns_word_level_merges_from_a_corpus():
    """The benchmarks' prompts come out in about as many tokens as with Qwen's BPE; without a
    corpus, one token per byte (byte b is id b); special tokens stay whole either way."""
    from thinkdiff.models.tiny import build_tiny_qwen_tokenizer
    from thinkdiff.models.vlm import IM_START

    corpus = ["You are a helpful assistant.", "Describe the image concisely.",
              "Summarize the visual content of the image."]
    plain, merged = build_tiny_qwen_tokenizer(), build_tiny_qwen_tokenizer(corpus)
    text = "Describe the image concisely."
    assert plain(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    ids = merged(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 6 and merged.decode(ids) == text
    unseen = "zebra on ice, 3 m"  # outside the corpus: falls back to bytes, still round-trips
    assert merged.decode(merged(unseen, add_special_tokens=False)["input_ids"]) == unseen
    for tok in (plain, merged):
        assert tok(f"{IM_START}user", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids(IM_START)


def test_t5_loader_keeps_decoder_only_and_encoder_norm():
    reference = build_tiny_t5()
    parts = load_t5(TINY, device=CPU)
    names = [n for n, _ in parts.decoder_lm.named_parameters()]
    assert names and not any(n.startswith("encoder") for n in names)
    assert all(n.startswith(("decoder.", "lm_head.")) for n in names)
    assert torch.equal(parts.encoder_final_norm, reference.encoder.final_layer_norm.weight)
    assert not any(p.requires_grad for p in parts.decoder_lm.parameters())


def packed(states_BSD: torch.Tensor, mask_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded states as the training batches hold them: the real rows packed, and their slots."""
    rows = (mask_BS.flatten().cumsum(0) - 1).view(mask_BS.shape)
    return states_BSD[mask_BS.bool()], torch.where(mask_BS.bool(), rows, -1)


def test_decoder_loss_equals_transformers_loss(monkeypatch):
    """Packed source rows (as training batches hold them) or padded ones: the loss of transformers'
    own model, whose padded source rows are masked; cross-attention gets a (B, 1, 1, S) key mask;
    no attention may run on cuDNN."""
    reference = build_tiny_t5()
    parts = load_t5(TINY, device=CPU)
    states = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])
    expected = reference(encoder_outputs=(states,), attention_mask=mask, labels=labels).loss
    sdpa, masks = F.scaled_dot_product_attention, []

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype))
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # DECODER_SDPA_BACKENDS
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    rows, slots = packed(states, mask)
    assert rows.shape == (7, 32) and slots.tolist() == [[0, 1, 2, 3, 4], [5, 6, -1, -1, -1]]
    torch.testing.assert_close(parts.decoder_lm.loss(rows, slots, labels), expected)
    assert masks[1::2] == [((2, 1, 1, 5), torch.bool)] * 2  # the two layers' cross-attention
    torch.testing.assert_close(parts.decoder_lm.loss(states.flatten(0, 1), padded_slots(mask), labels), expected)
    # Padded source rows are never read: other values there give the same loss.
    torch.testing.assert_close(parts.decoder_lm.loss((states + 9 * (1 - mask)[..., None]).flatten(0, 1),
                                                     padded_slots(mask), labels),
                               expected)
    # With the target positions made beforehand (as the training batches carry them): the same loss.
    positions = target_positions(labels)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(parts.decoder_lm.loss(rows, slots, labels, positions),
                       parts.decoder_lm.loss(rows, slots, labels))


def test_flex_decoder_attention_scores_like_sdpa(monkeypatch):
    """train.decoder_attention=flex: the same loss as the SDPA path (T5's relative position bias,
    the causal mask, the packed cross-attention's key mask), and it really runs on FlexAttention.
    Eager and forward only: on a CPU FlexAttention has no backward and does not compile at these
    shapes (`train_step.py --decoder-attention flex` checks the compiled training step on a GPU)."""
    import thinkdiff.models.attention as attention
    import thinkdiff.models.t5 as t5

    config = build_tiny_t5().config
    config.num_decoder_layers = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = t5.T5DecoderLM(T5ForConditionalGeneration(config))
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    rows, slots = packed(torch.randn(3, 6, 32, generator=g), mask)
    labels = torch.randint(2, config.vocab_size, (3, 9), generator=g)
    labels[1, 4:], labels[2, 7:] = -100, -100
    with torch.no_grad():
        expected = decoder.loss(rows, slots, labels)
        decoder.set_attention("flex")
        calls = []
        flex = attention.flex_attention
        monkeypatch.setattr(attention, "flex_attention", lambda *a, **k: calls.append(1) or flex(*a, **k))
        torch.testing.assert_close(decoder.loss(rows, slots, labels), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2 * config.num_decoder_layers
    with pytest.raises(ValueError, match="decoder attention 'cudnn': choose one of sdpa, flex"):
        decoder.set_attention("cudnn")


def test_flex_self_attention_takes_a_boolean_mask_as_sdpa_does():
    """Under torch.compile transformers may hand the causal mask over as a (B, 1, T, T) boolean
    instead of None (the path the test above takes): the same output as the SDPA path with it."""
    import thinkdiff.models.attention as attention

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    query, key, value = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, generator=g)
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6).clone()
    mask[1, 0, :, 1] = False  # a key masked in one sample only (no row left empty): its batch index is read
    expected, _ = attention.packed_source_sdpa(module, query, key, value, mask, scaling=1.0, position_bias=bias)
    out, _ = attention.packed_source_flex(module, query, key, value, mask, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    unmasked, _ = attention.packed_source_flex(module, query, key, value, None, scaling=1.0, position_bias=bias)
    assert not torch.allclose(unmasked[1], out[1], atol=1e-3) and torch.allclose(unmasked[0], out[0], atol=1e-5)


def test_decoder_loss_reads_no_tensor_value_on_the_host(monkeypatch):
    """Given the target positions, the loss never turns a tensor into a Python value (on a GPU, each
    such read makes the CPU wait for the GPU): transformers' mask checks included."""
    parts = load_t5(TINY, device=CPU)
    rows, slots = packed(torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]))
    rows.requires_grad_(True)
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])
    positions = target_positions(labels)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss = parts.decoder_lm.loss(rows, slots, labels, positions)
    loss.backward()
    monkeypatch.undo()
    torch.testing.assert_close(loss, parts.decoder_lm.loss(rows, slots, labels))


def test_decoder_stays_in_eval_mode():
    parts = load_t5(TINY, device=CPU)
    parts.decoder_lm.train()
    assert not parts.decoder_lm.training


def test_loaders_read_local_directories(tmp_path):
    t5 = build_tiny_t5()
    t5.save_pretrained(tmp_path / "t5")
    load_t5(TINY, device=CPU).tokenizer.save_pretrained(tmp_path / "t5")
    parts = load_t5(ModelSource(id=str(tmp_path / "t5"), revision="main", dtype="float32"), device=CPU)
    assert parts.revision == "local"
    assert torch.equal(parts.decoder_lm.lm_head.weight, t5.lm_head.weight)
    assert torch.equal(parts.encoder_final_norm, t5.encoder.final_layer_norm.weight)
    assert isinstance(t5, T5ForConditionalGeneration)
    # The encoder's blocks are never read: a checkpoint without them loads to the same decoder.
    weights = load_file(tmp_path / "t5" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("encoder.block.")},
              tmp_path / "t5" / "model.safetensors", metadata={"format": "pt"})
    lean = load_t5(ModelSource(id=str(tmp_path / "t5"), revision="main", dtype="float32"), device=CPU)
    for (name, p), (_, q) in zip(parts.decoder_lm.state_dict().items(), lean.decoder_lm.state_dict().items(),
                                 strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(lean.encoder_final_norm, t5.encoder.final_layer_norm.weight)
    assert lean.encoder is None and not any(k.startswith("encoder") for k in lean.decoder_lm.state_dict())
    # ThinkDiff-CLIP keeps the encoder, read from the (full) checkpoint.
    t5.save_pretrained(tmp_path / "t5-full")
    load_t5(TINY, device=CPU).tokenizer.save_pretrained(tmp_path / "t5-full")
    clip = load_t5(ModelSource(id=str(tmp_path / "t5-full"), revision="main", dtype="float32"), device=CPU,
                   keep_encoder=True)
    assert torch.equal(clip.encoder.block[0].layer[0].SelfAttention.q.weight,
                       t5.encoder.block[0].layer[0].SelfAttention.q.weight)
    # A checkpoint missing weights that are needed is an error, not a silently random model.
    with pytest.raises(DataContractError,
                       match=r"lacks \d+ weight\(s\) needed by the encoder and decoder \(encoder\.block\.0"):
        load_t5(ModelSource(id=str(tmp_path / "t5"), revision="main", dtype="float32"), device=CPU, keep_encoder=True)

    vlm = build_tiny_vlm(min_pixels=3136, max_pixels=3136)
    vlm.model.save_pretrained(tmp_path / "vlm")
    vlm.tokenizer.save_pretrained(tmp_path / "vlm")
    vlm.image_processor.save_pretrained(tmp_path / "vlm")
    loaded = load_vlm(ModelSource(id=str(tmp_path / "vlm"), revision="main", dtype="float32"),
                      min_pixels=3136, max_pixels=3136, device=CPU)
    assert loaded.model_id == str(tmp_path / "vlm") and loaded.revision == "local"
    for (name, p), (_, q) in zip(vlm.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert loaded.tokenizer("hi <|image_pad|>")["input_ids"] == vlm.tokenizer("hi <|image_pad|>")["input_ids"]


def test_compiled_decoder_blocks_share_one_graph_and_match_eager():
    """train.compile: one graph for the first block (relative position bias) and one for all later
    blocks, whatever the depth and the batch shape; loss and the gradient reaching the aligner equal eager."""
    from torch._dynamo.utils import counters

    from thinkdiff.models.t5 import T5DecoderLM

    tiny = build_tiny_t5()
    config = tiny.config
    config.num_decoder_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = T5DecoderLM(T5ForConditionalGeneration(config))
    g = torch.Generator().manual_seed(0)
    # (batch, source slots, target tokens); none equals a model dim (4 heads, 8 per head), where
    # dynamo would specialise the size and compile once more.
    shapes = [(2, 6, 5), (3, 9, 7), (2, 12, 11)]
    batches = []
    for b, s, t in shapes:
        # Padding in all but the last batch: no other graph.
        mask = ((torch.arange(s) < torch.randint(1, s, (b, 1), generator=g)).long() if s != 12
                else torch.ones(b, s, dtype=torch.long))
        labels = torch.randint(2, config.vocab_size, (b, t), generator=g)
        labels[0, t // 2:] = -100
        batches.append((*packed(torch.randn(b, s, config.d_model, generator=g), mask), labels))

    def loss_and_grad(rows, slots, labels):
        rows = rows.clone().requires_grad_(True)
        loss = decoder.loss(rows, slots, labels)
        loss.backward()
        return loss.detach(), rows.grad

    eager = [loss_and_grad(*batch) for batch in batches]
    torch._dynamo.reset()
    counters.clear()
    decoder.compile_decoder()
    compiled = [loss_and_grad(*batch) for batch in batches]
    assert counters["stats"]["unique_graphs"] == 2
    for (loss_e, grad_e), (loss_c, grad_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
def test_packed_gqa_decode_attention_reads_each_kv_head_once(mask_kind, monkeypatch):
    """A one-token query: the same output as SDPA over K/V repeated to every query head, with K/V
    handed to SDPA at their own head count (no 7x copy per layer and step at Qwen2-VL-7B's shape).
    A mask that differs per head goes to transformers' SDPA, with the same output."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from thinkdiff.models import attention

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 6, 2, 7, 8
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    keep = torch.rand(batch, 1, 1, length, generator=g) > 0.3
    keep[..., 0] = True
    per_head = torch.rand(batch, heads, 1, length, generator=g) > 0.3
    per_head[..., 0] = True
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, float("-inf")),
            "per_head": per_head}[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    expected = F.scaled_dot_product_attention(query, repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=mask, scale=0.3)
    seen_heads = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen_heads.append(k.shape[1])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    out, _ = attention.packed_gqa_sdpa(module, query, key, value, mask, scaling=0.3)
    if mask_kind != "per_head":
        assert seen_heads == [kv_heads]
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", [[(56, 56)] * 3, [(56, 56), (112, 56), (56, 56)]], ids=["one size", "mixed sizes"])
def test_vision_tower_attends_per_image_in_one_sdpa_call(sizes, monkeypatch):
    """The vision tower's features equal transformers' SDPA path (one SDPA call per image); images
    of one size (the features stage's) take one SDPA call per layer over the batch of images, and
    the packed sequence never lets one image attend to another."""
    import numpy as np
    from PIL import Image

    from thinkdiff.models import attention
    from thinkdiff.models.attention import PER_IMAGE_SDPA
    from thinkdiff.models.vlm import preprocess_images

    vlm = build_tiny_vlm(min_pixels=56 * 56, max_pixels=112 * 112)
    assert vlm.model.config.vision_config._attn_implementation == PER_IMAGE_SDPA
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    inputs = preprocess_images(vlm.image_processor, pics)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, *args, **kwargs):
        calls.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        ours = torch.cat(vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    depth = vlm.model.config.vision_config.depth
    assert calls == ([len(sizes)] * depth if len(set(sizes)) == 1 else [1] * len(sizes) * depth)
    vlm.model.set_attn_implementation({"vision_config": "sdpa"})
    with torch.no_grad():
        reference = torch.cat(vlm.model.get_image_features(inputs["pixel_values"],
                                                           inputs["image_grid_thw"]).pooler_output)
        # Each image alone: nothing of another image leaks into its features.
        first = int(inputs["image_grid_thw"][0].prod())
        alone = torch.cat(vlm.model.get_image_features(inputs["pixel_values"][:first],
                                                       inputs["image_grid_thw"][:1]).pooler_output)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[: alone.shape[0]], alone, rtol=1e-5, atol=1e-5)
