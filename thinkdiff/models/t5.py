"""The frozen T5 decoder that supervises the aligner (REFERENCE.md sections 1 and 5).

Only the decoder stack and `lm_head` are loaded (`T5DecoderCheckpoint`), and the encoder's
`final_layer_norm` weight, which initialises the aligner's output norm; ThinkDiff-CLIP also keeps
the encoder. `T5DecoderLM.loss` computes teacher-forced token cross-entropy with the aligned
features as the encoder-side states, projecting only the non-padded target positions to the
vocabulary (no full (B, T, V) logits).

The encoder-side states come packed: one row per real source row of the batch (R rows), with
`source_slots_BS` saying which row sits in each (sample, position) slot (-1: padding). The
cross-attention keys and values are projected from those rows only, then gathered into the padded
layout attention needs (`packed_source_sdpa`); padding costs no projection FLOPs and no (B, heads,
T, S) bias is built per layer.

Shape legend: B batch, S source slots, R source rows (packed), T target tokens, D d_model,
V vocabulary, N real target tokens, H heads, K head dim.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5PreTrainedModel, T5Stack

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.errors import DataContractError
from thinkdiff.models.common import default_device, torch_dtype

log = logging.getLogger(__name__)

TINY_REVISION = "tiny-v1"
IGNORE_INDEX = -100
PACKED_SOURCE_SDPA = "thinkdiff_packed_source_sdpa"
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
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if source_slots_BS is None:
            raise TypeError("the T5 decoder's cross-attention reads packed source rows: pass source_slots_BS")
        rows_RHK = lambda x: x[0].transpose(0, 1)  # noqa: E731  (1, H, R, K) -> (R, H, K), the projection's own layout
        key_BHSK, value_BHSK = (gather_slots(rows_RHK(x), source_slots_BS).transpose(1, 2) for x in (key, value))
        out = F.scaled_dot_product_attention(query, key_BHSK, value_BHSK, attn_mask=(source_slots_BS >= 0)[:, None, None, :],
                                             dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SOURCE_SDPA, packed_source_sdpa)
AttentionMaskInterface.register(PACKED_SOURCE_SDPA, sdpa_mask)  # the causal mask as transformers' SDPA path gets it


def gather_slots(rows_R: torch.Tensor, slots_BS: torch.Tensor) -> torch.Tensor:
    """Packed rows (R, ...) laid out in their (B, S, ...) slots; padding slots (-1) get row 0."""
    return rows_R.index_select(0, slots_BS.clamp(min=0).flatten()).view(*slots_BS.shape, *rows_R.shape[1:])


def padded_slots(mask_BS: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """The slots of rows that stay padded, `states_BSD.flatten(0, 1)` (numbered from `first_row`):
    each real position its own row, -1 where `mask_BS` is 0. For callers holding padded states."""
    rows = first_row + torch.arange(mask_BS.numel(), device=mask_BS.device).view(mask_BS.shape)
    return torch.where(mask_BS.bool(), rows, -1)


class T5DecoderLM(nn.Module):
    """T5 decoder stack + lm_head, frozen, scoring targets given encoder-side states. Takes over
    `model`'s decoder: its attention becomes `packed_source_sdpa`, so its cross-attention then
    needs packed rows and their slots (`loss`)."""

    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__()
        self.config: T5Config = model.config
        self.decoder = model.decoder
        self.lm_head = model.lm_head
        # Original T5 scales the decoder output by d_model**-0.5 before lm_head; T5 v1.1 / Flan-T5 do
        # not. transformers 5 records which in `scale_decoder_outputs` (older: tie_word_embeddings).
        scaled = getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings)
        self.output_scale = self.config.d_model**-0.5 if scaled else 1.0
        self.decoder.set_attn_implementation(PACKED_SOURCE_SDPA)
        for block in self.decoder.block:
            block.layer[1].EncDecAttention.reads_packed_rows = True
        self.eval().requires_grad_(False)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def train(self, mode: bool = True) -> T5DecoderLM:
        # Frozen: dropout stays off whatever the caller does to parent modules.
        return super().train(False)

    def compile_decoder(self) -> None:
        """torch.compile each decoder block with dynamic shapes.

        Dynamic shapes: one graph serves every (source, target) length of the length-bucketed batches,
        where static shapes would recompile for each new pair (and fall back to eager past dynamo's
        recompile limit). Per block: the blocks run the same code, so dynamo compiles the first block
        (the one holding the relative position bias) and one graph that every later block reuses, its
        weights passed as inputs. Compiling the whole 24-layer stack as one graph took longer than the
        380 s left of an H200 benchmark call; at 24 small layers on a CPU, 344 s against 48 s per block.
        The loss's gather of the real target tokens (a data-dependent shape) stays outside the graphs."""
        for block in self.decoder.block:
            block.compile(dynamic=True)

    def shift_right(self, labels_BT: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(labels_BT[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels_BT[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def loss(
        self, source_rows_RD: torch.Tensor, source_slots_BS: torch.Tensor, labels_BT: torch.Tensor,
        target_positions_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean token cross-entropy over target positions whose label is not -100.

        `source_rows_RD`: the encoder-side states, packed; `source_slots_BS`: each sample's rows, by
        row number, -1 for padding (`padded_slots` for states held padded). `target_positions_N`:
        the real target positions in `labels_BT.flatten()` (`target_positions`), made on the CPU
        with the batch. Given, the loss needs no host sync; else they are found here, and on a GPU
        the CPU then waits for the step so far (the count sets a shape).
        """
        hidden_BTD = self.decoder(
            input_ids=self.shift_right(labels_BT),
            encoder_hidden_states=source_rows_RD[None],
            source_slots_BS=source_slots_BS,
            use_cache=False,
        ).last_hidden_state
        if target_positions_N is None:
            target_positions_N = target_positions(labels_BT)
        hidden_ND = hidden_BTD.flatten(0, 1).index_select(0, target_positions_N)
        logits_NV = self.lm_head(hidden_ND * self.output_scale)
        return F.cross_entropy(logits_NV.float(), labels_BT.flatten().index_select(0, target_positions_N))


def key_mask_4d(mask_BS: torch.Tensor) -> torch.Tensor:
    """A (B, S) 0/1 key mask as the (B, 1, 1, S) boolean mask transformers builds from it for SDPA.
    Given in 4-D, T5 uses it as is; from a 2-D mask transformers first asks whether it is all ones,
    which on a GPU makes the CPU wait for the GPU."""
    return mask_BS.bool()[:, None, None, :]


def target_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """(N,) positions of the real target tokens (label not -100) in `labels_BT.flatten()`, in order."""
    return (labels_BT.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


class T5DecoderCheckpoint(T5PreTrainedModel):
    """What the aligner's loss needs from a T5 checkpoint, loaded by `from_pretrained`: the shared
    embedding, the decoder stack, `lm_head` and the encoder's `final_layer_norm` (the aligner norm's
    init). The encoder's blocks are unexpected keys, never allocated and, from safetensors files,
    never read (about half of flan-t5-xxl), the way transformers' own `T5EncoderModel` skips the
    decoder."""

    _keys_to_ignore_on_load_unexpected = [r"^encoder\.(?!final_layer_norm\.)",
                                          *T5ForConditionalGeneration._keys_to_ignore_on_load_unexpected]
    _tied_weights_keys = {"decoder.embed_tokens.weight": "shared.weight", "lm_head.weight": "shared.weight"}

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.Module()
        self.encoder.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.use_cache = False
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = T5Stack(decoder_config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()


@dataclass
class T5Parts:
    decoder_lm: T5DecoderLM
    tokenizer: PreTrainedTokenizerBase
    encoder_final_norm: torch.Tensor
    """The T5 encoder's final_layer_norm weight (D,), fp32 on CPU: the aligner norm's init."""
    encoder: nn.Module | None
    """The frozen T5 encoder stack, kept only for ThinkDiff-CLIP (it encodes caption part 1)."""
    model_id: str
    revision: str


def load_t5(src: ModelSource, *, device: torch.device | None = None, keep_encoder: bool = False) -> T5Parts:
    """Load T5 by Hugging Face id or local directory (`tiny`: same class, random-init), keep the decoder
    (and, for ThinkDiff-CLIP, the encoder). Without `keep_encoder` the encoder's blocks are never
    read (`T5DecoderCheckpoint`).

    Raises:
        DataContractError: the checkpoint lacks weights the kept parts need.
    """
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        model, tokenizer, revision = build_tiny_t5(), ByT5Tokenizer(), TINY_REVISION
    else:
        revision = None if Path(src.id).is_dir() else src.revision
        log.info("loading T5 %s (revision %s, %s)%s", src.id, revision, src.dtype, "" if keep_encoder else ", decoder only")
        model_class = T5ForConditionalGeneration if keep_encoder else T5DecoderCheckpoint
        model, loading = model_class.from_pretrained(src.id, revision=revision, dtype=torch_dtype(src.dtype),
                                                     trust_remote_code=False, output_loading_info=True)
        missing = sorted(loading["missing_keys"])
        if missing:
            # transformers would start them from random weights: a frozen random decoder trains nothing.
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataContractError(f"models.t5={src.id}: the checkpoint lacks {len(missing)} weight(s) needed by the "
                                    f"{'encoder and ' if keep_encoder else ''}decoder ({shown}); "
                                    "point models.t5 at a complete T5 checkpoint (e.g. google/flan-t5-xxl)")
        tokenizer = AutoTokenizer.from_pretrained(src.id, revision=revision, trust_remote_code=False)
        revision = src.revision if revision else "local"
    norm = model.encoder.final_layer_norm.weight.detach().float().cpu().clone()
    decoder_lm = T5DecoderLM(model)
    encoder = model.encoder.eval().requires_grad_(False).to(device=device, dtype=torch_dtype(src.dtype)) if keep_encoder else None
    # Only the decoder parts (and, for ThinkDiff-CLIP, the encoder) move to the device.
    del model
    gc.collect()
    decoder_lm.to(device=device, dtype=torch_dtype(src.dtype))
    return T5Parts(decoder_lm=decoder_lm, tokenizer=tokenizer, encoder_final_norm=norm, encoder=encoder,
                   model_id=src.id, revision=revision)


def build_tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A Flan-T5-shaped model (gated-gelu, no decoder-output scaling) with small dims and fixed random weights."""
    config = T5Config(
        vocab_size=len(ByT5Tokenizer()),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        # Random init leaves final_layer_norm at ones; give it structure so the aligner-norm init is visible.
        with torch.no_grad():
            model.encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
    return model.eval()
