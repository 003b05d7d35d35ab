"""Memory and cost arithmetic: weight bytes, KV bytes per token, what fits a budget, $ per token.

The GPU tier figures are estimates from sizes alone (weights + KV cache + a stated overhead), not
measurements: this project has no GPU.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

GPU_TIERS_GB = (24, 48, 80)
GPU_OVERHEAD = 0.10  # activations, CUDA context and allocator slack, as a share of the memory


def _tensor_headers(directory: Path) -> Iterator[dict]:
    """The header entry (dtype, shape, data_offsets) of every tensor in a directory's *.safetensors."""
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        yield from (entry for name, entry in header.items() if name != "__metadata__")


def safetensors_bytes(directory: Path) -> int:
    """Bytes of every tensor in a directory's *.safetensors files, read from their headers."""
    return sum(end - start for start, end in (t["data_offsets"] for t in _tensor_headers(directory)))


def parameter_count(directory: Path) -> int:
    """Parameters of a dense checkpoint (elements of its tensors)."""
    return sum(math.prod(t["shape"]) for t in _tensor_headers(directory))


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    """K and V of one token in every layer."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def max_sequences(budget_bytes: int, weight_bytes: int, kv_per_token: int, tokens_per_sequence: float, overhead: float = 0.0) -> int:
    """How many sequences of `tokens_per_sequence` fit in a memory budget after the weights."""
    room = budget_bytes * (1 - overhead) - weight_bytes
    return max(0, int(room // (kv_per_token * tokens_per_sequence)))


def gpu_tiers(weight_bytes: dict[str, int], kv_per_token: int, concurrency: int, context_tokens: int,
              tiers_gb: tuple[int, ...] = GPU_TIERS_GB) -> list[dict]:
    """For each tier and weight format: does the model plus `concurrency` full-context sequences fit,
    and how many sequences of that context would."""
    rows = []
    kv = kv_per_token * concurrency * context_tokens
    for gb in tiers_gb:
        budget = gb * 10**9
        for name, weights in weight_bytes.items():
            need = (weights + kv) / (1 - GPU_OVERHEAD)
            rows.append({"tier_gb": gb, "weights": name, "need_bytes": need, "fits": need <= budget,
                         "max_sequences": max_sequences(budget, weights, kv_per_token, context_tokens, GPU_OVERHEAD)})
    return rows


def dollars_per_million_tokens(price_per_hour: float, tokens_per_second: float) -> float:
    return price_per_hour / 3600 / tokens_per_second * 1e6


def memory_report(artifact: Path, baseline_dir: Path, workload_tokens: list[int], budget_bytes: int, concurrency: int,
                  context_tokens: int) -> dict:
    """Weight bytes 16-bit vs int4, KV per token, sequences fitting `budget_bytes`, GPU tier estimates."""
    config = json.loads((artifact / "config.json").read_text())
    weights = {"fp16": 2 * parameter_count(baseline_dir), "int4": safetensors_bytes(artifact)}
    kv = kv_bytes_per_token(config)
    mean_tokens = sum(workload_tokens) / len(workload_tokens)
    return {
        "weight_bytes": weights,
        "int4_over_fp16_weight_bytes": weights["int4"] / weights["fp16"],
        "kv_bytes_per_token_bf16": kv,
        "budget_bytes": budget_bytes,
        "mean_tokens_per_sequence": mean_tokens,
        "max_sequences_in_budget": {name: max_sequences(budget_bytes, w, kv, mean_tokens) for name, w in weights.items()},
        "gpu_tiers_estimate": {"concurrency": concurrency, "context_tokens": context_tokens, "overhead_share": GPU_OVERHEAD,
                               "rows": gpu_tiers(weights, kv, concurrency, context_tokens)},
    }
