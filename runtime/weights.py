"""Where the runtime's weights come from: a quantkit artifact, or a dense checkpoint for comparison.

The artifact is read through quantkit.artifact only (hashes verified on load); a dense model is a
local Hugging Face directory, a hub id or the embedded "smollm2-135m" (quantkit.sources).
Weights are read with safetensors only, never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.artifact import MANIFEST_NAME, load_artifact
from quantkit.errors import QuantkitError
from quantkit.sources import check_model_dir, resolve_model


@dataclass
class ModelWeights:
    path: Path  # directory with config.json and the tokenizer files
    config: dict  # config.json
    tensors: dict[str, torch.Tensor]
    quantized: bool

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]


def load_weights(spec: str | Path) -> ModelWeights:
    """An artifact directory (has quantkit.json) or any model source quantkit.sources understands."""
    path = Path(spec)
    if (path / MANIFEST_NAME).is_file():
        artifact = load_artifact(path)  # verifies every file's sha256
        return ModelWeights(path, artifact.config, artifact.tensors(), quantized=True)
    model_dir = check_model_dir(resolve_model(spec))
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantkitError(f"{model_dir} has no *.safetensors weights; quantkit loads safetensors only (convert .bin checkpoints first).")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    config = json.loads((model_dir / "config.json").read_text())
    return ModelWeights(model_dir, config, tensors, quantized=False)
