"""A source model read from its safetensors shards a block at a time, never whole.

The model is built as a skeleton whose parameters live on the meta device (no memory); the
embeddings, final norm and head are loaded up front, each decoder block only while it is being
quantized. Peak memory is then one block plus the calibration activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .artifact import INDEX_NAME
from .errors import QuantkitError
from .models import ArchAdapter


class ShardedCheckpoint:
    """Which shard holds each tensor; reads named tensors, opening each shard once per call."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.files = _tensor_files(self.model_dir)
        self.dtype = _checkpoint_dtype(self.model_dir, self)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise QuantkitError(
                f"{self.model_dir} lacks tensors the model's config requires (e.g. {', '.join(missing[:3])}); "
                "the checkpoint does not match its config.json: re-save it with save_pretrained."
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    t = handle.get_tensor(name)
                    # As from_pretrained(dtype="auto") does: every float tensor in the model's dtype.
                    out[name] = t.to(self.dtype) if t.is_floating_point() else t
        return out


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if absent:
            raise QuantkitError(f"{index} names shards that are missing: {', '.join(absent)}; download or copy them too.")
        return {name: model_dir / f for name, f in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update({name: path for name in handle.keys()})
    return files


def _checkpoint_dtype(model_dir: Path, checkpoint: ShardedCheckpoint) -> torch.dtype:
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for name, path in checkpoint.files.items():  # no dtype in the config: the first float tensor's
        with safe_open(str(path), framework="pt") as handle:
            if handle.get_slice(name).get_dtype().startswith(("F", "BF")):
                return handle.get_tensor(name).dtype
    return torch.float32


def return_freed_blocks_to_the_os() -> None:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc), released on free.

    glibc's default threshold starts at 128 KiB but rises to 32 MiB after the first large free;
    from then on each block's multi-MiB tensors come from the heap, which fragments, so peak
    RSS crept up by ~20% of the model's size over depth (measured: BENCHMARKS.md). A fixed
    threshold keeps it flat. Harmless elsewhere: on other C libraries this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def skeleton_model(model_dir: Path) -> PreTrainedModel:
    """The model with every parameter on the meta device; buffers (rotary tables) are real."""
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def block_prefixes(adapter: ArchAdapter, model: nn.Module) -> tuple[str, ...]:
    return tuple(adapter.block_prefix(i) for i in range(len(adapter.blocks(model))))


def load_outside_blocks(model: PreTrainedModel, checkpoint: ShardedCheckpoint, adapter: ArchAdapter) -> None:
    """Load everything but the decoder blocks: embeddings, final norm, head (tied or not)."""
    prefixes = block_prefixes(adapter, model)
    names = [n for n in model.state_dict() if not n.startswith(prefixes)]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = [n for n in names if n not in checkpoint and tied and n.endswith("lm_head.weight")]
    model.load_state_dict(checkpoint.read([n for n in names if n not in head]), strict=False, assign=True)
    if head:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefixes)]
    if still_meta:
        raise QuantkitError(f"{checkpoint.model_dir} has no weights for {', '.join(still_meta)}; the checkpoint is incomplete.")


def load_block(block: nn.Module, prefix: str, checkpoint: ShardedCheckpoint) -> None:
    """Materialize one block's parameters from the shards (replacing its meta tensors)."""
    names = list(block.state_dict())
    tensors = checkpoint.read([prefix + n for n in names])
    block.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True, assign=True)


def release_block(block: nn.Module) -> None:
    """Back to the meta device: the block's memory is freed once nothing else refers to it."""
    block.to("meta")


def outside_block_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    prefixes = block_prefixes(adapter, model)
    return {n: t for n, t in model.state_dict().items() if not n.startswith(prefixes)}
