"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) over the kernels' surface.

The members differ in a few details, each a config field rather than a separate network:
- q/k/v biases (Qwen2): found in the checkpoint, build_fused_linear concatenates them;
- per-head RMSNorm of q and k before RoPE (Qwen3: `qk_norm`), head_dim from the config;
- a sliding window per layer (`layer_windows`: Mistral on every layer, Qwen2/3 where
  `layer_types` says so), handed to the paged attention.

Every projection comes from quantkit.kernels.build_linear, so the same code runs packed int4
artifacts and dense fp16/bf16/fp32 checkpoints. Tokens of all sequences in a step are flattened
into one [num_tokens, hidden] batch; attention reads and writes the paged KV cache.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels.attention import AttentionMetadata, paged_attention, rotate_and_store_kv
from quantkit.kernels.backend import CPU, KernelBackend
from quantkit.kernels.decoder import FusedDecoder, LayerWeights
from quantkit.kernels.linear import OutputHead, build_fused_linear, int8_error_ratio, pack_int8, quantize_int8
from quantkit.kernels.norm import add_rms_norm, rms_norm, silu_and_mul

# --- config ------------------------------------------------------------------------------


def parse_rope(rope: Mapping | None, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling) from a rope_parameters / rope_scaling dict; scaling is None for plain RoPE."""
    rope = dict(rope or {})
    theta = float(rope.pop("rope_theta", default_theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r} is not supported (supported: default, linear, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return theta, None if rope_type == "default" else {**rope, "rope_type": rope_type}


def windows_from_layer_types(config: Mapping, layer_types: list[str], window: int | None) -> tuple[int | None, ...]:
    """Per layer: `window` for a sliding_attention layer, None for a full_attention one.

    A window as long as the model's context never hides a position: it is dropped (None), so
    such layers run the plain causal kernels.
    """
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (supported: sliding_attention, full_attention)")
    if len(layer_types) != config["num_hidden_layers"]:
        raise ValueError(f"layer_types lists {len(layer_types)} layers, num_hidden_layers is {config['num_hidden_layers']}")
    if window is not None and window >= config.get("max_position_embeddings", 2048):
        window = None
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


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
    qk_norm: bool = False
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, or None for full attention

    @classmethod
    def from_hf(cls, config: Mapping) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4 and 5 spellings of RoPE settings)."""
        theta, scaling = parse_rope(config.get("rope_parameters") or config.get("rope_scaling"), config.get("rope_theta", 10000.0))
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
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=cls.qk_norm_from_hf(config),
            layer_windows=cls.windows_from_hf(config),
        )

    @staticmethod
    def qk_norm_from_hf(config: Mapping) -> bool:
        return False

    @staticmethod
    def windows_from_hf(config: Mapping) -> tuple[int | None, ...]:
        """Llama has no sliding window (transformers' LlamaModel ignores one in the config)."""
        return (None,) * config["num_hidden_layers"]


class MistralConfig(LlamaConfig):
    @staticmethod
    def windows_from_hf(config: Mapping) -> tuple[int | None, ...]:
        """`sliding_window` on every layer, as transformers' MistralModel does (it ignores layer_types)."""
        n = config["num_hidden_layers"]
        return windows_from_layer_types(config, ["sliding_attention"] * n, config.get("sliding_window"))


class Qwen2Config(LlamaConfig):
    @staticmethod
    def windows_from_hf(config: Mapping) -> tuple[int | None, ...]:
        """The window applies only with use_sliding_window, to the layers `layer_types` marks (older
        configs without layer_types: the layers from max_window_layers on, as transformers derives them)."""
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        types = config.get("layer_types") or [
            "sliding_attention" if window is not None and i >= config.get("max_window_layers", 28) else "full_attention"
            for i in range(config["num_hidden_layers"])
        ]
        return windows_from_layer_types(config, types, window)


class Qwen3Config(Qwen2Config):
    @staticmethod
    def qk_norm_from_hf(config: Mapping) -> bool:
        return True


# --- building blocks (shared with gemma3.py) -----------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # positions slowed down by `factor`
        return inv_freq / scaling["factor"]
    # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin per position, computed in fp32 as transformers does, applied in the compute dtype."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling).to(device)  # the step's positions' device

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for the step's positions: computed once, used by every layer."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], -1).to(dtype).unsqueeze(1), torch.cat([-sin, sin], -1).to(dtype).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, backend: KernelBackend = CPU):
        super().__init__()
        self.weight, self.eps, self.cpu_kernels = weight, eps, backend.cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.cpu_kernels)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm residual step in one pass (kernels/norm.py)."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.cpu_kernels)


def qk_norm_weight(config, tensors: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """q_norm's weight for each query head, then k_norm's for each kv head: [H + Hkv, D], to
    normalize q and k in one call on the fused [T, H + Hkv, D] projection."""
    return torch.cat([tensors[f"{prefix}.q_norm.weight"].expand(config.num_heads, -1),
                      tensors[f"{prefix}.k_norm.weight"].expand(config.num_kv_heads, -1)])


def output_head(tensors: Mapping[str, torch.Tensor], embed_tokens: torch.Tensor, tied: bool, dtype: torch.dtype,
                int8: bool | None = False, backend: KernelBackend = CPU) -> OutputHead:
    """The logits matrix: the embeddings when tied (or the checkpoint stores no head), else lm_head.

    int8: also keep an int8 copy for decode (kernels/linear.py, OutputHead), quantized from the
    checkpoint's own tensor (fp16/fp32), not from its copy in the compute dtype. None: keep it
    only where it is no further from the checkpoint than the dense copy (int8_error_ratio <= 1),
    as for a head that was int8 before (a GGUF Q8_0 tensor).
    """
    if "lm_head.qweight" in tensors:  # would otherwise fall back to the embeddings: wrong logits
        raise QuantkitError("the checkpoint packs lm_head, which the runtime only reads dense; "
                            "re-quantize with lm_head in modules_to_not_convert.")
    name = "model.embed_tokens.weight" if tied or "lm_head.weight" not in tensors else "lm_head.weight"
    weight = embed_tokens if name == "model.embed_tokens.weight" else tensors[name].to(dtype)
    int8_copy = None
    if int8 is not False:  # asked for (True), or left to the head (None)
        try:
            q = quantize_int8(tensors[name])
            if int8 or int8_error_ratio(tensors[name], q, dtype) <= 1.0:
                int8_copy = pack_int8(q)
        except ValueError as e:  # a width not divisible by 32, or values fp16 scales cannot hold
            if int8:
                warnings.warn(f"no int8 output head ({e}); using the dense head", RuntimeWarning, stacklevel=2)
    return OutputHead(weight, int8_copy, backend.cpu_kernels)


class HeadRMSNorm(nn.Module):
    """Qwen3's q_norm and k_norm at once: RMSNorm over head_dim of [T, H + Hkv, D], then each head's weight."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(qk, (qk.shape[-1],), eps=self.eps) * self.weight


class Attention(nn.Module):
    """Fused q/k/v projection, optional q/k norm, RoPE, paged (optionally sliding-window) attention."""

    def __init__(self, config, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype,
                 window: int | None = None, scale: float | None = None, qk_norm: nn.Module | None = None, backend: KernelBackend = CPU):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = build_fused_linear(tensors, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"], dtype, backend)
        self.o_proj = build_fused_linear(tensors, [f"{prefix}.o_proj"], dtype, backend)
        self.scale = self.head_dim**-0.5 if scale is None else scale
        self.window = window
        self.qk_norm = qk_norm

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk, v = self.qkv_proj(x).split([q_size + kv_size, kv_size], dim=-1)
        qk = qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        qk = rotate_and_store_kv(qk, v, *rope, kv_cache[0], kv_cache[1], meta, self.num_heads)  # q and k in one go
        out = paged_attention(qk[:, : self.num_heads], kv_cache[0], kv_cache[1], meta, self.scale, window=self.window)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, act: Callable = F.silu, backend: KernelBackend = CPU):
        super().__init__()
        self.gate_up_proj = build_fused_linear(tensors, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], dtype, backend)
        self.down_proj = build_fused_linear(tensors, [f"{prefix}.down_proj"], dtype, backend)
        self.act = act
        self.cpu_kernels = backend.cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu:  # SwiGLU: one fused pass (kernels/norm.py)
            return self.down_proj(silu_and_mul(gate_up, self.cpu_kernels))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


# --- the network -------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, window: int | None,
                 backend: KernelBackend):
        super().__init__()
        eps = config.rms_norm_eps
        qk_norm = HeadRMSNorm(qk_norm_weight(config, tensors, f"{prefix}.self_attn").to(dtype), eps) if config.qk_norm else None
        self.input_layernorm = RMSNorm(tensors[f"{prefix}.input_layernorm.weight"].to(dtype), eps, backend)
        self.self_attn = Attention(config, tensors, f"{prefix}.self_attn", dtype, window=window, qk_norm=qk_norm, backend=backend)
        self.post_attention_layernorm = RMSNorm(tensors[f"{prefix}.post_attention_layernorm.weight"].to(dtype), eps, backend)
        self.mlp = MLP(tensors, f"{prefix}.mlp", dtype, backend=backend)

    def forward(self, x, residual, rope, kv_cache, meta):
        """x: the previous block's output, residual: the running sum before it (None at block 0)."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, rope, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, int8_head: bool | None = False,
                 backend: KernelBackend = CPU):
        super().__init__()
        self.config, self.dtype = config, dtype
        windows = config.layer_windows or (None,) * config.num_layers
        self.embed_tokens = tensors["model.embed_tokens.weight"].to(dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, tensors, f"model.layers.{i}", dtype, windows[i], backend) for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["model.norm.weight"].to(dtype), config.rms_norm_eps, backend)
        self.lm_head = output_head(tensors, self.embed_tokens, config.tie_word_embeddings, dtype, int8_head, backend)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, device=self.embed_tokens.device)
        # Decode steps run these same layers in one C++ call where it can (kernels/decoder.py);
        # None: always the modules.
        self.fused_decoder = FusedDecoder.build(
            [LayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj), layer.self_attn.window,
                          None if layer.self_attn.qk_norm is None else layer.self_attn.qk_norm.weight)
             for layer in self.layers],
            self.norm.weight, config.num_heads, config.head_dim, self.layers[0].self_attn.scale, config.rms_norm_eps, backend)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x, residual = F.embedding(input_ids, self.embed_tokens), None
        rope = self.rotary(positions, self.dtype)
        if self.fused_decoder is not None and self.fused_decoder.takes(x, meta):
            return self.fused_decoder(x, rope, kv_caches, meta)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits of the given rows: fp32 for sampling; upcast=False leaves them in the compute
        dtype for a consumer that reads them in fp32 itself (scoring's target_logprobs)."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits
