"""The frozen T5 decoder that supervises the aligner (ThinkDiff, arXiv 2502.10458).

Only the decoder stack and `lm_head` are loaded (`T5DecoderCheckpoint`), and the encoder's
`final_layer_norm` weight, which initialises the aligner's output norm; ThinkDiff-CLIP also keeps
the encoder. `T5DecoderLM.loss` computes teacher-forced token cross-entropy with the aligned
features as the encoder-side states, projecting only the non-padded target positions to the
vocabulary (no full (B, T, V) logits).

The encoder-side states come packed: one row per real source row of the batch (R rows), with
`source_slots_BS` saying which row sits in each (sample, position) slot (-1: padding). The
cross-attention keys and values are projected from those rows only, then gathered into the padded
layout attention needs (`packed_source_sdpa`, with the other attention kernels in
thinkdiff.models.attention); padding costs no projection FLOPs and no (B, heads, T, S) bias is
built per layer. The `tiny` model id's random-weight T5 is built by thinkdiff.models.tiny.

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
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5PreTrainedModel, T5Stack

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.errors import DataContractError
from thinkdiff.models.attention import DECODER_ATTENTIONS
from thinkdiff.models.common import default_device, torch_dtype

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def padded_slots(mask_BS: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """The slots of rows that stay padded, `states_BSD.flatten(0, 1)` (numbered from `first_row`):
    each real position its own row, -1 where `mask_BS` is 0. For callers holding padded states."""
    rows = first_row + torch.arange(mask_BS.numel(), device=mask_BS.device).view(mask_BS.shape)
    return torch.where(mask_BS.bool(), rows, -1)


class T5DecoderLM(nn.Module):
    """T5 decoder stack + lm_head, frozen, scoring targets given encoder-side states. Takes over
    `model`'s decoder: its attention becomes `packed_source_sdpa` (or, `set_attention("flex")`,
    `packed_source_flex`), so its cross-attention then needs packed rows and their slots (`loss`).
    Its weights never train; its dropout (the T5 config's `dropout_rate`) is off unless
    `set_dropout(True)` turns it on (`train.t5_dropout`)."""

    def __init__(self, model: T5ForConditionalGeneration):
        super().__init__()
        self.config: T5Config = model.config
        self.decoder = model.decoder
        self.lm_head = model.lm_head
        # Original T5 scales the decoder output by d_model**-0.5 before lm_head; T5 v1.1 / Flan-T5 do
        # not. transformers 5 records which in `scale_decoder_outputs` (older: tie_word_embeddings).
        scaled = getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings)
        self.output_scale = self.config.d_model**-0.5 if scaled else 1.0
        for block in self.decoder.block:
            block.layer[1].EncDecAttention.reads_packed_rows = True
        self.set_attention("sdpa")
        self.dropout_enabled = False
        self.eval().requires_grad_(False)

    def set_attention(self, kind: str) -> None:
        """The decoder's attention kernel, `train.decoder_attention`: `sdpa` or `flex`. Set it before
        `compile_decoder`."""
        if kind not in DECODER_ATTENTIONS:
            raise ValueError(f"decoder attention {kind!r}: choose one of {', '.join(DECODER_ATTENTIONS)}")
        self.decoder.set_attn_implementation(DECODER_ATTENTIONS[kind][0])

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def set_dropout(self, enabled: bool) -> None:
        """Run the decoder with its config's dropout (train mode) or without (eval mode); the weights
        stay frozen either way. The official release trains with the whole model in train mode
        (thinkdiff/runners/runner_clip_t5.py at 3ed85e6, `train_epoch`: `self.model.train()`), so
        flan-t5-xxl's dropout of 0.1 is on while the aligner trains."""
        self.dropout_enabled = enabled
        super().train(enabled)

    def train(self, mode: bool = True) -> T5DecoderLM:
        # Frozen: dropout only where `set_dropout` turned it on, whatever the caller does to parent modules.
        return super().train(mode and self.dropout_enabled)

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
        from thinkdiff.models.tiny import TINY_REVISION, build_tiny_t5

        model, tokenizer, revision = build_tiny_t5(), ByT5Tokenizer(), TINY_REVISION
    else:
        revision = None if Path(src.id).is_dir() else src.revision
        log.info("loading T5 %s (revision %s, %s)%s", src.id, revision, src.dtype,
                 "" if keep_encoder else ", decoder only")
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
    encoder = (model.encoder.eval().requires_grad_(False).to(device=device, dtype=torch_dtype(src.dtype))
               if keep_encoder else None)
    # Only the decoder parts (and, for ThinkDiff-CLIP, the encoder) move to the device.
    del model
    gc.collect()
    decoder_lm.to(device=device, dtype=torch_dtype(src.dtype))
    return T5Parts(decoder_lm=decoder_lm, tokenizer=tokenizer, encoder_final_norm=norm, encoder=encoder,
                   model_id=src.id, revision=revision)
