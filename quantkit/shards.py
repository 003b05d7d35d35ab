"""Safetensors checkpoints read by name (index, shards), and a source model read a block at a time.

The model is built as a skeleton whose parameters live on the meta device (no memory); the
embeddings, final norm and head are loaded up front, each decoder block only while it is being
quantized. Peak memory is then one block plus the calibration activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from .artifact import INDEX_NAME, open_safetensors, read_json_object
from .errors import QuantkitError
from .models import ArchAdapter
from .sources import refuse_missing_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ShardedCheckpoint:
    """Which shard holds each tensor; reads named tensors, opening each shard once per call."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.files = {name: self.model_dir / file for name, file in weight_map(self.model_dir).items()}
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


def weight_map(path: str | Path) -> dict[str, str]:
    """Tensor name -> weight file: from the shard index if there is one, else the single safetensors file."""
    path = Path(path)
    index_path = path / INDEX_NAME
    if index_path.is_file():
        mapping = read_json_object(index_path).get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise QuantkitError(f"{index_path} has no weight_map; the checkpoint is damaged: export it again.")
        for name, file in mapping.items():
            # The index names files in this directory only; anything else is damage or a trick.
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise QuantkitError(f"{index_path} maps {name} to {file!r}, which is not a .safetensors file in {path}; fix the index.")
        missing = sorted({f for f in mapping.values() if not (path / f).is_file()})
        if missing:
            raise QuantkitError(
                f"{path}: shard(s) {', '.join(missing)} named by {INDEX_NAME} are missing; copy the complete checkpoint "
                "(every file the index lists)."
            )
        return dict(mapping)
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        refuse_missing_safetensors(path, "AutoAWQ: save_quantized(out_dir, safetensors=True); transformers: save_pretrained(out_dir)")
    if len(files) > 1:
        raise QuantkitError(
            f"{path} has {len(files)} safetensors files ({', '.join(f.name for f in files)}) but no {INDEX_NAME} saying which "
            "tensor lives where; copy the index with the shards."
        )
    with open_safetensors(files[0]) as handle:
        return {name: files[0].name for name in handle.keys()}


_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _checkpoint_dtype(model_dir: Path, checkpoint: ShardedCheckpoint) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") picks: the config's, else the first float tensor's."""
    config = read_json_object(model_dir / "config.json")
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for name, path in checkpoint.files.items():
        with open_safetensors(path) as handle:
            dtype = _FLOAT_DTYPES.get(handle.get_slice(name).get_dtype())  # the header only: no tensor is read
        if dtype is not None:
            return dtype
    return torch.float32


def return_free_memory_to_the_os() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim), e.g. after freeing a block.

    glibc serves tensors under 32 MiB from its heap once a large free has raised its mmap
    threshold; freed blocks then stay resident as fragments between live allocations, and peak
    RSS crept up with depth (measured: BENCHMARKS.md). Trimming after each block releases them.
    (A fixed 1 MiB mmap threshold also kept it flat, but page-faulting every large temporary
    doubled AWQ's time.) On other C libraries this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def skeleton_model(model_dir: Path, dtype: torch.dtype) -> "PreTrainedModel":
    """The model with every parameter on the meta device; buffers (rotary tables) are real.

    Built in `dtype` (ShardedCheckpoint.dtype) as from_pretrained builds it, so that buffers
    created in the default dtype (Gemma's embed_scale) match an in-memory load even when the
    config names no dtype.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def block_prefixes(adapter: ArchAdapter, model: nn.Module) -> tuple[str, ...]:
    return tuple(adapter.block_prefix(i) for i in range(len(adapter.blocks(model))))


def _tied_head(model: "PreTrainedModel") -> list[str]:
    """The head's name when it is tied to the embeddings: from_pretrained ties it rather than loading it."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    return [n for n in model.state_dict() if n.endswith("lm_head.weight")]


def _to_read(module: nn.Module, names: list[str], prefix: str, checkpoint: ShardedCheckpoint) -> list[str]:
    """`names` less the persistent buffers the checkpoint lacks: those keep their initial values, as
    from_pretrained leaves them (the skeleton's buffers are real). A missing parameter is an error."""
    buffers = {n for n, _ in module.named_buffers()}
    return [n for n in names if n not in buffers or prefix + n in checkpoint]


def load_outside_blocks(model: "PreTrainedModel", checkpoint: ShardedCheckpoint, adapter: ArchAdapter) -> None:
    """Load everything but the decoder blocks: embeddings, final norm, head (tied or not)."""
    prefixes = block_prefixes(adapter, model)
    head = _tied_head(model)
    # A tied head is never read, even if the checkpoint stores it too: that would be a second
    # copy of the (large) embedding matrix, and from_pretrained ignores it as well.
    names = [n for n in model.state_dict() if not n.startswith(prefixes) and n not in head]
    model.load_state_dict(checkpoint.read(_to_read(model, names, "", checkpoint)), strict=False, assign=True)
    if head:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefixes)]
    if still_meta:
        raise QuantkitError(
            f"{checkpoint.model_dir} has no weights for {', '.join(still_meta)}; the checkpoint does not match its "
            "config.json: re-save it with save_pretrained."
        )


def load_block(block: nn.Module, prefix: str, checkpoint: ShardedCheckpoint) -> None:
    """Materialize one block's parameters from the shards (replacing its meta tensors)."""
    names = _to_read(block, list(block.state_dict()), prefix, checkpoint)
    tensors = checkpoint.read([prefix + n for n in names])
    block.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)  # not strict: see _to_read


def release_block(block: nn.Module) -> None:
    """Back to the meta device: the block's memory is freed once nothing else refers to it."""
    block.to("meta")
    return_free_memory_to_the_os()


def outside_block_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    prefixes = block_prefixes(adapter, model)
    return {n: t for n, t in model.state_dict().items() if not n.startswith(prefixes)}
