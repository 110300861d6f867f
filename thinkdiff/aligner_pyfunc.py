"""A registered aligner as an MLflow Model: a pyfunc that maps VLM token features to aligned embeddings.

    save_aligner_model(aligner_dir, path)            # an MLflow Model directory; registry.py logs it
    mlflow.pyfunc.load_model("models:/thinkdiff-aligner@champion").predict(features_BSD)  # -> (B, S, D)

The model is saved as "models from code": MLflow keeps this very file (it ends with
`mlflow.models.set_model`) and runs it to load the model, so nothing is pickled; the weights are the
aligner's config.json + model.safetensors, kept as the model's artifact `aligner` (under its
`artifacts/` folder) and read with `Aligner.from_pretrained`. The `thinkdiff` package travels in the
model's `code/` folder, so it loads where this repository is not installed; the requirements are the
installed versions of what loading imports. Input and output are float32 tensors (batch, tokens,
width), described by the model's signature; `mlflow models serve` answers {"inputs": [...]}.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types.schema import Schema, TensorSpec

from thinkdiff.errors import DataContractError
from thinkdiff.models.aligner import CONFIG_NAME, Aligner

ARTIFACT = "aligner"
"""The name of the aligner directory among the model's artifacts (`context.artifacts`)."""
# What loading the model imports: MLflow, the aligner (torch, safetensors) and what its module
# brings in through thinkdiff.storage and thinkdiff.config (pyarrow, pillow, pyyaml).
REQUIREMENTS = ("mlflow", "torch", "safetensors", "numpy", "pyarrow", "pillow", "pyyaml")


class AlignerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: float32 (batch, tokens, in_dim) -> float32 numpy (batch, tokens, out_dim)."""

    def load_context(self, context) -> None:
        self.aligner = Aligner.from_pretrained(context.artifacts[ARTIFACT]).eval()

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        if isinstance(model_input, torch.Tensor):
            features_BSD = model_input.detach().to("cpu", torch.float32)
        else:
            features_BSD = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
        in_dim = self.aligner.config.in_dim
        if features_BSD.ndim != 3 or features_BSD.shape[-1] != in_dim:
            raise ValueError(f"the aligner takes features of shape (batch, tokens, {in_dim}), "
                             f"got {tuple(features_BSD.shape)}")
        with torch.no_grad():
            return self.aligner(features_BSD).numpy()


def pinned_requirements() -> list[str]:
    """`name==version` for each of REQUIREMENTS as installed (without a local label such as +cpu,
    so the pin also matches a CUDA build of the same torch)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def save_aligner_model(aligner_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow Model of the aligner saved in `aligner_dir` (config.json + model.safetensors)
    to `path`, which must not exist or be empty."""
    aligner_dir, path = Path(aligner_dir), Path(path)
    config = json.loads((aligner_dir / CONFIG_NAME).read_text())
    in_dim, out_dim = int(config["in_dim"]), int(config["out_dim"])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, in_dim))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, out_dim))]))
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(Path(__file__).resolve()),
        artifacts={ARTIFACT: str(aligner_dir.resolve())},
        code_paths=[str(Path(__file__).resolve().parent)],  # the thinkdiff package (MLflow skips __pycache__)
        signature=signature,
        input_example=np.zeros((1, 2, in_dim), dtype=np.float32),
        pip_requirements=pinned_requirements(),
    )
    return path


def aligner_files(model_dir: str | Path) -> Path:
    """The directory holding config.json + model.safetensors in a downloaded registered version: the
    MLflow Model's `aligner` artifact, or the folder itself for a version registered before aligners
    were logged as MLflow Models (the bare files, which only `Aligner.from_pretrained` loads)."""
    model_dir = Path(model_dir)
    if not (model_dir / MLMODEL_FILE_NAME).is_file():
        return model_dir
    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    saved = flavor.get("artifacts", {}).get(ARTIFACT, {}).get("path")
    found = (model_dir / saved).resolve() if saved else None
    if found is None or not found.is_relative_to(model_dir.resolve()):
        raise DataContractError(f"{model_dir / MLMODEL_FILE_NAME} names no {ARTIFACT!r} artifact inside the model: "
                                "this MLflow Model is not a ThinkDiff aligner")
    return found


mlflow.models.set_model(AlignerModel())
