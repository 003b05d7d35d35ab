"""The Llama family (Llama 2/3, Mistral without sliding window, SmolLM2) over the kernels' surface.

Every projection comes from quantkit.kernels.build_linear, so the same code runs packed int4
artifacts and dense fp16/bf16/fp32 checkpoints. Tokens of all sequences in a step are flattened
into one [num_tokens, hidden] batch; attention reads and writes the paged KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels.attention import AttentionMetadata, paged_attention, store_kv
from quantkit.kernels.linear import build_fused_linear


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4 and 5 spellings of RoPE settings)."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"RoPE type {rope_type!r} is not supported (supported: default, llama3)")
        if config.get("sliding_window") and config["sliding_window"] < config.get("max_position_embeddings", 0):
            raise ValueError(f"sliding-window attention ({config['sliding_window']}) is not supported")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
    s = config.rope_scaling
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin per position, computed in fp32 as transformers does, applied in the compute dtype."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.inv_freq = rope_inverse_frequencies(config)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for the step's positions: computed once, used by every layer."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], -1).to(dtype).unsqueeze(1), torch.cat([-sin, sin], -1).to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = roll(x, D/2) * [-1, 1]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (it accumulates in fp32 for bf16 input); the unfused form costs ~6 ops per
        # norm, which at batch-1 decode is ~15% of the step.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = build_fused_linear(tensors, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], dtype)
        self.o_proj = build_fused_linear(tensors, [f"{prefix}.o_proj"], dtype)
        self.scale = self.head_dim**-0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk, v = self.qkv_proj(x).split([q_size + kv_size, kv_size], dim=-1)
        qk = apply_rotary(qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)  # q and k in one go
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        store_kv(k, v, kv_cache[0], kv_cache[1], meta)
        out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = build_fused_linear(tensors, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], dtype)
        self.down_proj = build_fused_linear(tensors, [f"{prefix}.down_proj"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(tensors[f"{prefix}.input_layernorm.weight"].to(dtype), config.rms_norm_eps)
        self.self_attn = Attention(config, tensors, f"{prefix}.self_attn", dtype)
        self.post_attention_layernorm = RMSNorm(tensors[f"{prefix}.post_attention_layernorm.weight"].to(dtype), config.rms_norm_eps)
        self.mlp = MLP(tensors, f"{prefix}.mlp", dtype)

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.embed_tokens = tensors["model.embed_tokens.weight"].to(dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, tensors, f"model.layers.{i}", dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["model.norm.weight"].to(dtype), config.rms_norm_eps)
        tied = config.tie_word_embeddings or "lm_head.weight" not in tensors
        self.lm_head = self.embed_tokens if tied else tensors["lm_head.weight"].to(dtype)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x = F.embedding(input_ids, self.embed_tokens)
        rope = self.rotary(positions, self.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits for the rows that sample."""
        return F.linear(hidden, self.lm_head).float()
