"""The frozen vision encoder of ThinkDiff-CLIP (docs/method.md, ThinkDiff-CLIP).

The vision tower of BLIP-2 (`Salesforce/blip2-flan-t5-xxl`: EVA-CLIP ViT-g/14, width 1408, 224 px)
or any CLIP vision model. Per image: the CLS token plus the patch grid bilinearly downsampled by
2 (16x16 -> 8x8), so 65 tokens for ViT-g/14. From a BLIP-2 checkpoint only the `vision_model.*`
weights are read: the 11B language model is never loaded for this.

Shape legend: B images, T tokens (1 + (g/2)^2), G grid side g, D width.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    Blip2Config,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPVisionModel,
    PreTrainedModel,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from thinkdiff.config import TINY_MODEL_ID, ModelSource
from thinkdiff.errors import DataContractError
from thinkdiff.models.common import default_device, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class VisionEncoder:
    model: PreTrainedModel
    processor: BlipImageProcessorPil
    model_id: str
    revision: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 1 + (g/2)^2, D) float32 on CPU: CLS, then the patch grid downsampled by 2 (bilinear)."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        hidden_BTD = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state.float()
        cls_B1D, patches_BPD = hidden_BTD[:, :1], hidden_BTD[:, 1:]
        side = math.isqrt(patches_BPD.shape[1])
        grid_BDGG = patches_BPD.reshape(len(images), side, side, -1).permute(0, 3, 1, 2)
        small_BDGG = F.interpolate(grid_BDGG, size=(side // 2, side // 2), mode="bilinear", align_corners=False)
        return torch.cat([cls_B1D, small_BDGG.flatten(2).transpose(1, 2)], dim=1).cpu()


def load_vision(src: ModelSource, *, image_size: int, device: torch.device | None = None) -> VisionEncoder:
    """A BLIP-2 (vision weights only) or CLIP vision tower by Hugging Face id or local directory."""
    device = device or default_device()
    if src.id == TINY_MODEL_ID:
        from thinkdiff.models.tiny import build_tiny_vision

        encoder = build_tiny_vision(image_size=image_size)
    else:
        revision = None if Path(src.id).is_dir() else src.revision
        config = AutoConfig.from_pretrained(src.id, revision=revision, trust_remote_code=False)
        if isinstance(config, Blip2Config):
            model = _blip2_vision_only(src.id, revision, config.vision_config)
        else:
            model = CLIPVisionModel.from_pretrained(src.id, revision=revision, trust_remote_code=False)
        processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
        encoder = VisionEncoder(model=model, processor=processor, model_id=src.id,
                                revision=src.revision if revision else "local")
    encoder.model.to(device=device, dtype=torch_dtype(src.dtype)).eval().requires_grad_(False)
    return encoder


def _blip2_vision_only(model_id: str, revision: str | None, config: Blip2VisionConfig) -> Blip2VisionModel:
    """Read only `vision_model.*` from a BLIP-2 checkpoint (sharded or not)."""
    directory = Path(model_id)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(model_id, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for key, f in weight_map.items() if key.startswith("vision_model.")})
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update({k.removeprefix("vision_model."): v
                      for k, v in load_file(directory / name).items() if k.startswith("vision_model.")})
    if not state:
        raise DataContractError(f"{directory}: no vision_model.* weights in {files}; "
                                "is this a BLIP-2 checkpoint in safetensors?")
    model = Blip2VisionModel(config)
    model.load_state_dict(state, strict=True)
    return model
