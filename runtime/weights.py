"""Where the runtime's weights come from: a quantkit artifact, an AutoAWQ GEMM checkpoint, or a
dense checkpoint for comparison.

The artifact is read through quantkit.artifact only (hashes verified on load); a directory that
declares quantization without a quantkit manifest goes through quantkit.autoawq (settings and
tensor layout validated, unsupported ones refused); a dense model is a local Hugging Face
directory, a hub id or the embedded "smollm2-135m" (quantkit.sources).
Weights are read with safetensors only, never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.artifact import MANIFEST_NAME, load_artifact, read_json_object, read_tensors
from quantkit.autoawq import declares_quantization, load_autoawq_checkpoint
from quantkit.shards import weight_map
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
    """An artifact directory (has quantkit.json), a quantized checkpoint from elsewhere (AutoAWQ GEMM),
    or any model source quantkit.sources understands."""
    path = Path(spec)
    if (path / MANIFEST_NAME).is_file():
        artifact = load_artifact(path)  # verifies every listed file's sha256, refuses unlisted weights
        return ModelWeights(path, artifact.config, artifact.tensors(), quantized=True)
    # Before resolve_model: its pickle-only message suggests a dense conversion, wrong for AWQ.
    if declares_quantization(path):
        return _foreign_quantized(path)
    model_dir = check_model_dir(resolve_model(spec))
    if declares_quantization(model_dir):  # a hub download can be an AutoAWQ export too
        return _foreign_quantized(model_dir)
    config = read_json_object(model_dir / "config.json")
    tensors = read_tensors(model_dir, weight_map(model_dir))  # the index's files only, as transformers reads them
    return ModelWeights(model_dir, config, tensors, quantized=False)


def _foreign_quantized(path: Path) -> ModelWeights:
    """A checkpoint declaring quantization: served only if it is a valid AWQ GEMM export."""
    config, tensors = load_autoawq_checkpoint(path)  # refuses other methods, layouts and mixed settings
    return ModelWeights(path.resolve(), config, tensors, quantized=True)
