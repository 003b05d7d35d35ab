"""Gemma 3 text models (Gemma3ForCausalLM) over the kernels' surface, reusing the Llama pieces.

What differs from Llama:
- RMSNorm scales by (1 + w), in fp32, then casts back; q and k get such a norm per head;
- four norms per layer: the attention and MLP outputs are normalized before their residual adds;
- GeGLU MLP (tanh-approximated GELU), embeddings scaled by sqrt(hidden) in the compute dtype;
- attention scale query_pre_attn_scalar ** -0.5, head_dim independent of hidden / heads;
- `layer_types` mixes sliding-window layers (local RoPE base) with global ones (global RoPE,
  possibly linearly scaled); final logits optionally soft-capped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels.attention import AttentionMetadata

from quantkit.kernels.backend import CPU, KernelBackend

from .llama import MLP, Attention, RotaryEmbedding, output_head, parse_rope, qk_norm_weight, windows_from_layer_types


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    global_rope: tuple[float, dict | None]  # (theta, scaling) of full-attention layers
    local_rope: tuple[float, dict | None]  # of sliding-window layers
    local_layers: tuple[bool, ...]  # sliding_attention layers: local RoPE (and the window, if shorter than the context)
    layer_windows: tuple[int | None, ...]
    final_logit_softcapping: float | None
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: Mapping) -> Gemma3Config:
        """From a config.json of model_type gemma3_text (transformers 5 and 4 spellings of RoPE)."""
        if config.get("attn_logit_softcapping") is not None:
            raise ValueError("attention logit soft-capping (attn_logit_softcapping) is not supported")
        if config.get("use_bidirectional_attention"):
            raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
        if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {config['hidden_activation']!r} is not supported (supported: gelu_pytorch_tanh)")
        n = config["num_hidden_layers"]
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope:  # transformers 5: one parameter set per layer type
            global_rope = parse_rope(rope["full_attention"], 1_000_000.0)
            local_rope = parse_rope(rope.get("sliding_attention"), 10_000.0)
        else:  # transformers 4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
            global_rope = parse_rope(config.get("rope_scaling"), config.get("rope_theta", 1_000_000.0))
            local_rope = (float(config.get("rope_local_base_freq", 10_000.0)), None)
        pattern = config.get("sliding_window_pattern", 6)
        types = config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=n,
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim", 256),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
            global_rope=global_rope,
            local_rope=local_rope,
            local_layers=tuple(t == "sliding_attention" for t in types),
            layer_windows=windows_from_layer_types(config, types, config.get("sliding_window")),
            final_logit_softcapping=config.get("final_logit_softcapping"),
            max_position_embeddings=config.get("max_position_embeddings", 131_072),
        )


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w) in fp32, cast back to x's dtype; w is [D] or one row per head [heads, D]."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = 1.0 + weight.float(), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, index: int,
                 backend: KernelBackend):
        super().__init__()
        self.local = config.local_layers[index]
        window = config.layer_windows[index]

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(tensors[f"{prefix}.{name}.weight"], config.rms_norm_eps)

        qk_norm = GemmaRMSNorm(qk_norm_weight(config, tensors, f"{prefix}.self_attn"), config.rms_norm_eps)
        self.input_layernorm = norm("input_layernorm")
        self.self_attn = Attention(config, tensors, f"{prefix}.self_attn", dtype, window=window,
                                   scale=config.query_pre_attn_scalar**-0.5, qk_norm=qk_norm, backend=backend)
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.mlp = MLP(tensors, f"{prefix}.mlp", dtype, act=partial(F.gelu, approximate="tanh"), backend=backend)
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: Gemma3Config, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, int8_head: bool | None = False,
                 backend: KernelBackend = CPU):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.embed_tokens = tensors["model.embed_tokens.weight"].to(dtype)
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=dtype, device=self.embed_tokens.device)  # rounded to the dtype, as transformers does
        self.layers = nn.ModuleList(
            DecoderLayer(config, tensors, f"model.layers.{i}", dtype, i, backend) for i in range(config.num_layers)
        )
        self.norm = GemmaRMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)
        self.lm_head = output_head(tensors, self.embed_tokens, False, dtype, int8_head, backend)  # tied checkpoints omit lm_head.weight
        self.global_rotary = RotaryEmbedding(config.head_dim, *config.global_rope, device=self.embed_tokens.device)
        self.local_rotary = RotaryEmbedding(config.head_dim, *config.local_rope, device=self.embed_tokens.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x = F.embedding(input_ids, self.embed_tokens) * self.embed_scale
        global_rope, local_rope = self.global_rotary(positions, self.dtype), self.local_rotary(positions, self.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, local_rope if layer.local else global_rope, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits of the given rows, soft-capped if the config says so: fp32, or (upcast=False and no
        cap) in the compute dtype; the cap is always applied in fp32."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits.float() if upcast else logits
        return torch.tanh(logits.float() / cap) * cap
