"""FLUX: the diffusion model that draws from aligned features (REFERENCE.md section 6).

ThinkDiff hands FLUX the aligner output as `prompt_embeds` (1 x L x 4096) and the pooled CLIP
embedding of "" (or of a text); FLUX's own T5 is not used then. The text-bridge baseline uses the
pipeline as published: a text prompt through FLUX's CLIP and T5. No fork of diffusers.

Shape legend: B batch, L prompt tokens, D joint attention width (T5 width).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.models.common import default_device, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class Flux:
    pipe: FluxPipeline
    model_id: str

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def joint_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    @torch.no_grad()
    def pooled_clip(self, text: str) -> torch.Tensor:
        """FLUX's pooled CLIP text embedding (1, D_clip); ThinkDiff-LVLM uses the one of ""."""
        tokens = self.pipe.tokenizer(
            [text], padding="max_length", max_length=self.pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
        )
        out = self.pipe.text_encoder(tokens.input_ids.to(self.device), output_hidden_states=False)
        return out.pooler_output.to(self.dtype)

    @torch.no_grad()
    def draw_embeds(
        self, prompt_embeds_BLD: torch.Tensor, pooled: torch.Tensor, *, steps: int, guidance: float, size: int, seeds: list[int]
    ) -> list[Image.Image]:
        """Images from prompt embeddings (ThinkDiff: the aligner output), one per batch row; row i starts
        from the noise of `seeds[i]`, so it is the same picture at any batch size."""
        return self.pipe(
            prompt_embeds=prompt_embeds_BLD.to(self.device, self.dtype),
            pooled_prompt_embeds=pooled.to(self.device, self.dtype).expand(prompt_embeds_BLD.shape[0], -1),
            num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
            generator=_row_generators(seeds), output_type="pil",
        ).images

    @torch.no_grad()
    def draw_text(self, prompts: list[str], *, steps: int, guidance: float, size: int, seeds: list[int]) -> list[Image.Image]:
        """The published path: text prompts through FLUX's own CLIP and T5 (the text-bridge baseline)."""
        return self.pipe(
            prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
            generator=_row_generators(seeds), output_type="pil",
        ).images


def _row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per batch row: diffusers then draws each row's initial noise on its own."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def load_flux(src: ModelSource, *, device: torch.device | None = None, compile: bool = False) -> Flux:
    """FluxPipeline by Hugging Face id or local directory (`tiny`: the same classes, random-init)."""
    if src.id == TINY_MODEL_ID:
        pipe = build_tiny_flux_pipeline()
        if src.dtype != "float32":
            pipe.to(dtype=torch_dtype(src.dtype))
    else:
        revision = None if Path(src.id).is_dir() else src.revision
        log.info("loading FLUX %s (revision %s, %s)", src.id, revision, src.dtype)
        pipe = FluxPipeline.from_pretrained(src.id, revision=revision, torch_dtype=torch_dtype(src.dtype))
    return wrap_flux(pipe, src.id, device=device or default_device(), compile=compile)


def wrap_flux(pipe: FluxPipeline, model_id: str, *, device: torch.device, compile: bool) -> Flux:
    """The pipeline on `device`, quiet. `compile`, the fast path:
    - each attention's query/key/value projections fused into one matmul (diffusers'
      `fuse_qkv_projections`; the same weights concatenated, so the same images within bf16
      rounding; the unfused copies stay, about 4 GB for FLUX.1-dev);
    - torch.compile of the transformer's repeated blocks (diffusers' regional compilation: one
      graph per block type, reused by every block of that type, a far shorter compile than the
      whole model's; one graph per batch shape)."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return Flux(pipe=pipe, model_id=model_id)


def build_tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (word-final bytes carry `</w>`); needs no files."""
    chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_flux_pipeline(seed: int = 0, joint_dim: int = 32) -> FluxPipeline:
    """FLUX with small dims and fixed random weights; `joint_dim` matches the tiny T5 (aligner output)."""
    clip_tokenizer = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=joint_dim, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
        )
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        ))
        t5_tokenizer = ByT5Tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=joint_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=t5_tokenizer,
    )
