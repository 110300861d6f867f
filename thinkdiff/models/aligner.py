"""The aligner: the only trainable module of ThinkDiff (docs/method.md, The aligner).

    Linear(in_dim, out_dim) -> GELU (exact erf) -> Linear(out_dim, out_dim) -> RMSNorm(out_dim, eps 1e-6)

applied per token, no dropout, no residual. The RMSNorm weight starts as a copy of the T5 encoder's
`final_layer_norm` (without it training is unstable, paper Fig. 7); the Linear layers start at
PyTorch's default or, as the release's ThinkDiff-CLIP, N(0, 0.02) with zero biases
(`init_linears_normal`). Saved as config.json + model.safetensors; `import_official_checkpoint`
converts the released `.pth`.

Shape legend: B batch, S source rows (VLM tokens), D_in VLM width, D T5 width.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from thinkdiff.errors import DataContractError, first_line
from thinkdiff.storage import atomic_write_bytes, sha256_file, temp_dir_for

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(kw_only=True)
class AlignerConfig:
    in_dim: int
    """Width of the source features (Qwen2-VL-7B: 3584)."""
    out_dim: int
    """T5 d_model (flan-t5-xxl: 4096); the hidden width equals it."""
    norm_eps: float = 1e-6


class Aligner(nn.Module):
    """Maps VLM token features (B, S, D_in) to T5-encoder-output space (B, S, D)."""

    def __init__(self, config: AlignerConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.in_dim, config.out_dim)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(config.out_dim, config.out_dim)
        # torch computes RMSNorm in fp32 under bf16 autocast, as T5LayerNorm does.
        self.norm = nn.RMSNorm(config.out_dim, eps=config.norm_eps)

    def forward(self, features_BSD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(self.act(self.fc1(features_BSD))))

    @torch.no_grad()
    def init_linears_normal(self, std: float = 0.02) -> None:
        """Both Linear layers' weights from N(0, std), their biases zero (`train.aligner_init: normal`).
        The release builds ThinkDiff-CLIP as a transformers Blip2PreTrainedModel loaded from BLIP-2
        with `from_pretrained` (thinkdiff/models/blip_vision_t5_decoder.py at 3ed85e6, `from_config`),
        which initialises the weights the checkpoint lacks, the projector's, with the model's
        `_init_weights`: Linear weights N(0, initializer_range = 0.02), biases zero. Draws from
        torch's global generator."""
        for linear in (self.fc1, self.fc2):
            linear.weight.normal_(0.0, std)
            linear.bias.zero_()

    @torch.no_grad()
    def init_norm_from(self, weight: torch.Tensor) -> None:
        """Copy the T5 encoder's final_layer_norm weight into the output norm (paper Fig. 7)."""
        if weight.shape != self.norm.weight.shape:
            raise ValueError(f"norm init weight has shape {tuple(weight.shape)}, "
                             f"aligner expects {tuple(self.norm.weight.shape)}")
        self.norm.weight.copy_(weight.float())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors atomically (a temp dir renamed into place)."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} exists; refusing to overwrite an aligner "
                                  "(remove it or pick another path)")
        tmp = temp_dir_for(directory)
        try:
            atomic_write_bytes(tmp / CONFIG_NAME,
                               json.dumps({"architecture": "thinkdiff-aligner", **asdict(self.config)},
                                          indent=2).encode())
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
            # Bytes, then our own write: safetensors' save_file leaves its file 0600 and unflushed.
            atomic_write_bytes(tmp / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Aligner:
        """Load an aligner saved by `save_pretrained`.

        Raises:
            FileNotFoundError: config.json or model.safetensors is missing.
            DataContractError: either file is unreadable, or the weights do not match the config.
        """
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: "
                                        f"an aligner directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
            meta.pop("architecture", None)
            model = cls(AlignerConfig(**meta))
        except (ValueError, TypeError, AttributeError) as err:  # not JSON, not an object, unknown or mistyped fields
            raise DataContractError(f"{directory / CONFIG_NAME} is not an aligner config ({err}); "
                                    "save the aligner again (`save_pretrained`) or restore the file from its "
                                    "checkpoint") from None
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated or foreign file
            raise DataContractError(f"{directory / WEIGHTS_NAME} is unreadable ({first_line(err)}): "
                                    "restore it from the run's checkpoint, or train again") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise DataContractError(f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                                    f"{err}") from err
        return model


# Official layout: nn.Sequential(Linear, GELU, Linear, T5LayerNorm) stored as `mm_projector.{0,2,3}`.
_OFFICIAL_KEYS = {
    "mm_projector.0.weight": "fc1.weight",
    "mm_projector.0.bias": "fc1.bias",
    "mm_projector.2.weight": "fc2.weight",
    "mm_projector.2.bias": "fc2.bias",
    "mm_projector.3.weight": "norm.weight",
}


def import_official_checkpoint(pth_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the officially released aligner (`.pth`, key "model") into a safetensors directory.

    The file is read with `torch.load(weights_only=True)`: no code in it is ever executed.

    Raises:
        FileNotFoundError: the input does not exist.
        DataContractError: the file is not a dict with key "model" holding exactly the five
            `mm_projector.*` tensors with consistent shapes.
    """
    pth_path = Path(pth_path)
    if not pth_path.is_file():
        what = "is a directory" if pth_path.is_dir() else "not found"
        raise FileNotFoundError(f"{pth_path} {what}: give the released aligner file (.pth)")
    try:
        blob = torch.load(pth_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a weights-only checkpoint"
        # The first line only: PyTorch's message goes on to suggest weights_only=False, which would
        # run whatever code the file holds.
        raise DataContractError(f"{pth_path}: cannot be read as a weights-only torch checkpoint "
                                f"({first_line(err)}); this project never loads pickled code: "
                                "give the released aligner file") from None
    if not isinstance(blob, dict) or "model" not in blob or not isinstance(blob["model"], dict):
        keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise DataContractError(
            f"{pth_path}: expected a dict whose key 'model' holds the aligner state dict "
            f"(mm_projector.0/2/3.*), found {keys}"
        )
    state = blob["model"]
    missing = sorted(set(_OFFICIAL_KEYS) - set(state))
    extra = sorted(set(state) - set(_OFFICIAL_KEYS))
    if missing or extra:
        raise DataContractError(
            f"{pth_path}: key 'model' does not hold the official aligner layout; missing {missing}, "
            f"unexpected {extra[:8]}"
        )
    for key in _OFFICIAL_KEYS:
        if not isinstance(state[key], torch.Tensor):
            raise DataContractError(f"{pth_path}: {key} is a {type(state[key]).__name__}, expected a tensor; "
                                    "give the released aligner file")
    first, bias = state["mm_projector.0.weight"], state["mm_projector.0.bias"]
    if first.ndim != 2:  # the widths below are read from it: a matrix (out_dim, in_dim)
        rows = bias.shape[0] if bias.ndim == 1 else "out_dim"
        raise DataContractError(f"{pth_path}: mm_projector.0.weight has shape {tuple(first.shape)}, expected "
                                f"({rows}, in_dim), a matrix; give the released aligner file")
    out_dim, in_dim = first.shape
    expected = {
        "mm_projector.0.bias": (out_dim,),
        "mm_projector.2.weight": (out_dim, out_dim),
        "mm_projector.2.bias": (out_dim,),
        "mm_projector.3.weight": (out_dim,),
    }
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise DataContractError(f"{pth_path}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                                    f"(out_dim {out_dim} from mm_projector.0.weight); give the released aligner file")
    aligner = Aligner(AlignerConfig(in_dim=in_dim, out_dim=out_dim))
    aligner.load_state_dict({new: state[old].float() for old, new in _OFFICIAL_KEYS.items()}, strict=True)
    out = aligner.save_pretrained(out_dir)
    log.info("imported %s (in_dim %d, out_dim %d) -> %s", pth_path, in_dim, out_dim, out)
    return out


def weights_sha256(spec: str | Path) -> str:
    """The sha256 of an aligner's safetensors weights: of a saved directory, or of what an official
    `.pth` converts to (so the file and its imported directory are one aligner)."""
    path = Path(spec)
    if path.is_dir():
        return sha256_file(path / WEIGHTS_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        return sha256_file(import_official_checkpoint(path, Path(tmp) / "aligner") / WEIGHTS_NAME)
