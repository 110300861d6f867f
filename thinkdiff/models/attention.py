"""Attention kernels registered with transformers, under the names the frozen models select.

transformers looks up a model's attention function, and the mask it builds for it, by name in
`AttentionInterface` and `AttentionMaskInterface`
(https://huggingface.co/docs/transformers/attention_interface); a model picks one with
`set_attn_implementation`. Each kernel here takes transformers' attention signature and replaces its
SDPA path where the project's shapes make that path slow:
- `packed_gqa_sdpa` (`PACKED_GQA_SDPA`): Qwen2-VL's text attention; a decode step reads each
  key/value head once instead of copying it out to every query head;
- `per_image_sdpa` (`PER_IMAGE_SDPA`): Qwen2-VL's vision tower; one SDPA call over a batch of
  same-size images instead of one per image;
- `packed_source_sdpa` and `packed_source_flex` (`DECODER_ATTENTIONS`): the frozen T5 decoder's;
  its cross-attention reads the aligner's packed source rows (`gather_slots`) and no per-layer
  (B, H, T, S) bias is written.
Importing this module registers them all; thinkdiff.models.vlm and thinkdiff.models.t5 select
them. The kernels depend on no model class, so the model modules import them, never the reverse.

Shape legend: B batch, H heads, T target tokens, S source slots, R source rows (packed), K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_GQA_SDPA = "thinkdiff_packed_gqa_sdpa"


def packed_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a one-token query (a decode step) never copies the
    key/value heads out to the query heads.

    Qwen2-VL-7B has 28 query heads over 4 key/value heads. With a mask (always there with a static
    cache) transformers repeats K and V 7 times per layer and step under torch.compile (its own
    packing is eager-only): at batch 256 and 512 cached positions, about 2 GB written and read per
    layer and step, far more than the weights. Here the 7 query heads of each key/value head are
    passed as 7 query positions of that head instead, so SDPA reads each cached K/V once; the mask,
    shared by all heads, broadcasts over them. Prompts and the states pass (many query tokens),
    and a mask that differs per head, go to transformers' SDPA unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or groups == 1 or per_head_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, head_dim = query.shape
    packed_BKGD = query.reshape(batch, heads // groups, groups, head_dim)
    out = F.scaled_dot_product_attention(packed_BKGD, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)
AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)  # the masks SDPA gets (else none: padding ignored)


def per_image_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                   cu_seq_lens_q: torch.Tensor, max_length_q: int, **kwargs) -> tuple[torch.Tensor, None]:
    """The vision tower's attention (each image attends within itself) as one SDPA call over a batch
    of images, where transformers' SDPA path makes one call per image.

    Qwen2-VL's vision tower packs all images' patches into one sequence and gives attention the
    image boundaries (`cu_seq_lens_q`) only when the implementation's name says flash; any other
    implementation gets a per-image loop: at batch 256, 8,192 small SDPA calls over the 32 layers,
    and a host sync per layer. When every image has the longest image's length (one image size, as in
    the features stage), the packed sequence is a (images, patches) batch; other mixes keep the
    per-image loop. Query/key/value: (1, heads, patches, head dim); returns (1, patches, heads, head
    dim), the layout flash implementations return."""
    _, heads, total, _ = query.shape
    images = cu_seq_lens_q.shape[0] - 1
    if images * max_length_q == total:  # every image at most the longest and the sum is the total: all equal

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x[0].reshape(heads, images, max_length_q, x.shape[-1]).transpose(0, 1)

        out = F.scaled_dot_product_attention(per_image(query), per_image(key), per_image(value), dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).reshape(1, total, heads, -1), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
            for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)), strict=True)]
    return torch.cat(outs, dim=2).transpose(1, 2), None


# "flash" in the name is what makes Qwen2-VL's vision attention pass the image boundaries.
PER_IMAGE_SDPA = "thinkdiff_per_image_sdpa_flash_interface"
AttentionInterface.register(PER_IMAGE_SDPA, per_image_sdpa)


DECODER_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""No cuDNN: its SDPA backward returns NaN query gradients under a mask when the key length is 64
mod 128 and all of a row's logits are below about -88 (pytorch/pytorch#196678, seen from torch
2.11 to 2.13 on H100/H200, where cuDNN is the default); T5 does not scale its logits, which get
large. The other backends are exact there."""



def packed_source_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                       source_slots_BS: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The T5 decoder's attention: transformers' SDPA path for self-attention; for cross-attention
    (modules marked `reads_packed_rows`), keys and values projected from the packed source rows,
    (1, H, R, K), gathered into the (B, H, S, K) slots and masked by the slots' padding.

    Packed, the projections skip the padded rows (about 6% of a step's FLOPs at paper shapes with
    length-bucketed batches); and the key mask reaches SDPA as one (B, 1, 1, S) boolean that
    broadcasts, where transformers' T5 path writes a (B, H, T, S) float bias for every layer (it
    merges T5's all-zero cross-attention position bias into the mask). Padded slots hold a copy of
    row 0: masked, they get no attention weight and pass back no gradient. Both attentions run on
    `DECODER_SDPA_BACKENDS`."""
    with sdpa_kernel(DECODER_SDPA_BACKENDS):
        if not getattr(module, "reads_packed_rows", False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        key_BHSK, value_BHSK = slotted_keys_values(key, value, source_slots_BS)
        out = F.scaled_dot_product_attention(query, key_BHSK, value_BHSK,
                                             attn_mask=(source_slots_BS >= 0)[:, None, None, :],
                                             dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def packed_source_flex(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                       source_slots_BS: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """`packed_source_sdpa` on FlexAttention (`train.decoder_attention: flex`): one Triton kernel,
    generated by torch.compile, whose score function adds T5's relative position bias and applies
    the masks as it goes, so no (B, H, T, K) bias is written and no SDPA backend is left out by
    the bias (flash takes none; cuDNN has the NaN backward of `DECODER_SDPA_BACKENDS`). Fast only
    compiled (`train.compile`), and only on a GPU: on a CPU it has no backward, and inductor (torch
    2.13) cannot lower it at these shapes. The cross-attention's position bias is T5's all-zero one
    and is not read."""
    if dropout:
        raise ValueError("FlexAttention has no dropout: run the T5 decoder with train.decoder_attention=sdpa for "
                         "train.t5_dropout=true")
    batch, length_q = query.shape[0], query.shape[2]
    if getattr(module, "reads_packed_rows", False):
        key, value = slotted_keys_values(key, value, source_slots_BS)
        causal, bias_1HQK = False, None
        keep_BQK = (source_slots_BS >= 0)[:, None, :].expand(batch, length_q, -1)  # the slots' padding
    else:
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError(f"FlexAttention here takes a boolean attention mask, got {attention_mask.dtype}")
        bias_1HQK = position_bias
        causal = attention_mask is None and getattr(module, "is_causal", True)
        keep_BQK = None if attention_mask is None else attention_mask[:, 0].expand(batch, length_q, key.shape[2])

    def score_mod(score, b, h, q, k):
        if bias_1HQK is not None:
            score = score + bias_1HQK[0, h, q, k]
        if causal:
            score = torch.where(q >= k, score, -float("inf"))
        if keep_BQK is not None:
            score = torch.where(keep_BQK[b, q, k], score, -float("inf"))
        return score

    out = flex_attention(query, key, value, score_mod=score_mod, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


DECODER_ATTENTIONS = {"sdpa": ("thinkdiff_packed_source_sdpa", packed_source_sdpa),
                      "flex": ("thinkdiff_packed_source_flex", packed_source_flex)}
"""`train.decoder_attention` -> the name the decoder's attention is registered under in
transformers, and the function."""
for _name, _attention in DECODER_ATTENTIONS.values():
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, sdpa_mask)  # the causal mask as transformers' SDPA path gets it


def slotted_keys_values(key: torch.Tensor, value: torch.Tensor,
                        source_slots_BS: torch.Tensor | None) -> list[torch.Tensor]:
    """The cross-attention's keys and values, projected from the packed source rows (1, H, R, K),
    gathered into each sample's slots: (B, H, S, K)."""
    if source_slots_BS is None:
        raise TypeError("the T5 decoder's cross-attention reads packed source rows: pass source_slots_BS")
    return [gather_slots(x[0].transpose(0, 1), source_slots_BS).transpose(1, 2) for x in (key, value)]


def gather_slots(rows_R: torch.Tensor, slots_BS: torch.Tensor) -> torch.Tensor:
    """Packed rows (R, ...) laid out in their (B, S, ...) slots; padding slots (-1) get row 0."""
    return rows_R.index_select(0, slots_BS.clamp(min=0).flatten()).view(*slots_BS.shape, *rows_R.shape[1:])
