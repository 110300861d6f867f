"""FLUX: the diffusion model that draws from aligned features (docs/method.md, Inference).

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
from diffusers import FluxPipeline
from PIL import Image

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
            [text], padding="max_length", max_length=self.pipe.tokenizer_max_length, truncation=True,
            return_tensors="pt",
        )
        out = self.pipe.text_encoder(tokens.input_ids.to(self.device), output_hidden_states=False)
        return out.pooler_output.to(self.dtype)

    @torch.no_grad()
    def draw_embeds(
        self, prompt_embeds_BLD: torch.Tensor, pooled: torch.Tensor, *, steps: int, guidance: float, size: int,
        seeds: list[int],
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
    def draw_text(
        self, prompts: list[str], *, steps: int, guidance: float, size: int, seeds: list[int]
    ) -> list[Image.Image]:
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
        from thinkdiff.models.tiny import build_tiny_flux_pipeline

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
