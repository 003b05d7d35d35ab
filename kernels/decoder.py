"""A decode step's decoder layers in one C++ call (kernels/csrc/decoder.cpp, decode_layers).

At batch-1 decode, SmolLM2-135M's 30 layers make ~270 kernel calls of 2-30 us each, and calling
each from Python (module, checks, argument boxing) costs about as much again: a third of the int4
step. `FusedDecoder` hands the layers' weights to C++ once, at load, and each decode step makes
one call that runs the same kernels, with the same arguments, in the same order: its results are
bit-identical to the modules' (tests/test_decoder.py), so it is a faster way to run the model,
not another model. It takes a step only where that holds (`takes`): every row decoding, bf16 on
the CPU, rows where each linear's module would call the kernel decode_layers calls. Prefill,
mixed steps, other dtypes and devices run the modules. Biases (Qwen2's q/k/v) and q/k norms
(Qwen3) are computed by the same ATen ops the modules call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_ext, cpu_int4, linear
from .attention import AttentionMetadata
from .backend import KernelBackend
from .linear import DenseLinear, QuantLinear

_UNUSED = torch.empty(0)  # an absent operand: a dense linear's scales/zeros, a missing bias or q/k norm


@dataclass(frozen=True)
class LayerWeights:
    """What one pre-norm Llama block gives the fused path: its two norms' weights, its four
    linears (fused q/k/v, o, fused gate/up, down; SiLU-gated MLP), its sliding window or None,
    and its q/k norm's weight [heads + kv heads, head_dim] or None."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    linears: tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    window: int | None
    qk_norm: torch.Tensor | None = None


def linear_operands(module: nn.Module) -> tuple[list[torch.Tensor], int, int] | None:
    """(4 tensors, group size, output width) of a linear for decode_layers: quantkit's int4 layout
    (codes, scales, zeros; group > 0) or a dense bf16 weight (group 0), then the bias (empty for
    none). None where decode_layers would not compute what the module computes: PyTorch's int4
    layout, another dtype."""
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_cpu):
        return None
    bias = _UNUSED if bias is None else bias
    if isinstance(module, QuantLinear) and isinstance(module.cpu_weight, cpu_int4.NativeInt4Weight):
        w = module.cpu_weight
        return [w.codes, w.scales, w.zeros, bias], w.group_size, w.out_features
    if isinstance(module, DenseLinear) and module.weight.dtype == torch.bfloat16 and module.weight.is_cpu and module.weight.is_contiguous():
        return [module.weight, _UNUSED, _UNUSED, bias], 0, module.out_features
    return None


class FusedDecoder:
    """The layers of a Llama-family model as decode_layers' operands, built once at load."""

    def __init__(self, layers: list[LayerWeights], final_norm: torch.Tensor, num_heads: int, head_dim: int, scale: float, eps: float,
                 operands: list[tuple[list[torch.Tensor], int, int]], int4_max_rows: int):
        self.int4_max_rows = int4_max_rows  # steps with this many rows or more go to the modules (dequantize + matmul, or W4A8)
        self.norms = [w for layer in layers for w in (layer.input_norm, layer.post_attention_norm)] + [final_norm]
        self.linears = [t for tensors, _, _ in operands for t in tensors]
        self.groups = [group for _, group, _ in operands]
        self.out_features = [width for _, _, width in operands]
        self.windows = [layer.window or 0 for layer in layers]
        self.qk_norms = [_UNUSED if layer.qk_norm is None else layer.qk_norm for layer in layers]
        self.num_heads, self.head_dim, self.scale, self.eps = num_heads, head_dim, scale, eps
        self.int4 = any(g > 0 for g in self.groups)
        self.dense = any(g == 0 for g in self.groups)

    @classmethod
    def build(cls, layers: list[LayerWeights], final_norm: torch.Tensor, num_heads: int, head_dim: int, scale: float,
              eps: float, backend: KernelBackend) -> FusedDecoder | None:
        """The fused path for these layers, or None where it cannot run them (a backend without the
        C++ CPU kernels and their cache layout, no C++ bf16 kernels on this machine, weights not in
        bf16 on the CPU, a linear it does not compute the same)."""
        norms = [final_norm] + [w for layer in layers for w in (layer.input_norm, layer.post_attention_norm)]
        norms += [layer.qk_norm for layer in layers if layer.qk_norm is not None]
        if not layers or not backend.fused_decoder or not cpu_ext.bf16_available() or any(w.dtype != torch.bfloat16 or not w.is_cpu for w in norms):
            return None
        operands = [linear_operands(module) for layer in layers for module in layer.linears]
        if any(o is None for o in operands):
            return None
        # --activations int8: from w4a8_from_rows rows the modules run, whose int4 linears take W4A8
        int4_max_rows = cpu_int4.NATIVE_DENSE_FROM_ROWS if backend.activations != "int8" else min(
            cpu_int4.NATIVE_DENSE_FROM_ROWS, backend.w4a8_from_rows)
        return cls(layers, final_norm, num_heads, head_dim, scale, eps, operands, int4_max_rows)

    def takes(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """True when this step is one the modules would run on exactly decode_layers' kernels:
        every row decodes (C++ attention planned), bf16 rows on the CPU, few enough rows that the
        int4 linears use the int4 kernel (cpu_int4.NATIVE_DENSE_FROM_ROWS) and the dense ones
        dense_gemv or the bf16 matmul (not the fp32 path of emulated bf16)."""
        rows = x.shape[0]
        return (meta.all_decode and meta.decode_seqs is not None and x.dtype == torch.bfloat16 and x.is_cpu
                and not (self.int4 and rows >= self.int4_max_rows)
                and not (self.dense and rows >= linear.EMULATED_BF16_FP32_FROM_ROWS and not cpu_ext.bf16_matmuls_are_native()))

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [rows, hidden] after the last layer and the final norm (x is overwritten)."""
        caches = [t for pair in kv_caches for t in pair]
        return cpu_ext.op("decode_layers")(
            x, self.norms, self.linears, self.groups, self.out_features, self.qk_norms, caches, rope[0], rope[1], meta.slot_mapping, meta.block_tables,
            meta.context_lens, meta.decode_rows, meta.decode_seqs, meta.block_size, self.scale, self.windows, self.num_heads, self.head_dim,
            self.eps, linear.GEMV_MAX_ROWS)
