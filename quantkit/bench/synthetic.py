"""Synthetic Llama checkpoints of any depth, written shard by shard (never held whole in memory).

Used to measure how quantization's peak memory behaves as models grow; the weights are random
(fp16, std 0.02), one safetensors shard per decoder block plus an index, as large checkpoints ship.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ..artifact import INDEX_NAME, TOKENIZER_FILES


def synthetic_llama(out: Path, layers: int, hidden: int, intermediate: int, tokenizer_dir: Path, vocab: int | None = None, seed: int = 0) -> Path:
    """Write a random Llama with `layers` blocks to `out`; returns `out`. The vocabulary is the tokenizer's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_config = json.loads((Path(tokenizer_dir) / "config.json").read_text()) if (Path(tokenizer_dir) / "config.json").is_file() else {}
    config = LlamaConfig(
        vocab_size=vocab or tokenizer_config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer_config.get("eos_token_id"),
        dtype="float16",
    )
    with init_empty_weights():
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)

    def make(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.float16)
        return (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.float16)

    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    weight_map = {}
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups.values()):
        save_file({n: make(n) for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file() and name != "generation_config.json":
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
