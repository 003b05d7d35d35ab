"""Linear layers for the runtime: one surface, the implementation chosen by the backend, dtype and M.

The runtime builds every projection with `build_linear` and never asks whether it is packed:
- AWQ-packed weights -> QuantLinear: Triton W4A16 GEMM where the backend says (kernels/backend.py);
  on CPU quantkit's C++ int4 kernel (or PyTorch's fused int4 op where it cannot build) for bf16
  batches of fewer than 256 rows, and dequantize + dense matmul for more rows or other dtypes
  (kernels/cpu_int4.py);
- dense weights -> DenseLinear: a matmul in the runtime's dtype (for fp16/bf16/fp32 comparisons
  through the same model code);
- the output head -> OutputHead: `dense_linear`, or for decode an int8 copy of the head
  (quantize_int8) read by quantkit's int8 GEMV, half the bytes of bf16; by default kept only where
  it is no further from the checkpoint than the dense copy (int8_error_ratio).
Where bf16 matmuls are emulated (a CPU without AVX-512 BF16), bf16 batches of 64 rows or more
compute in fp32 and round once: there fp32 is the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.pack import dequantize_awq

from . import cpu_ext, cpu_int4
from .backend import CPU, KernelBackend
from .w4a8 import X_DTYPES as W4A8_X_DTYPES
from .w4a8 import W4A8Weight, prepare_w4a8, w4a8_linear

# bf16 calls with at most this many rows use quantkit's C++ GEMV on CPU: it streams the weight
# at 28-32 GB/s where oneDNN's matmul reaches 10-20 GB/s for 1-4 rows (2,048 rows of weights
# not in cache; benchmarks/kernel_speed.py). Larger batches are compute-bound: oneDNN.
GEMV_MAX_ROWS = 4

# Where bf16 matmuls are emulated (cpu_ext.bf16_matmuls_are_native), bf16 calls of at least this
# many rows upcast both operands and compute in fp32: the upcast is a pass over the weight, less
# than emulation's extra time from ~16 rows on (benchmarks/results/emulated_bf16.log, oneDNN capped
# at AVX2, bf16 vs fp32 ms: a 3072x576 weight 1.51 vs 1.03 at 16 rows, 6.05 vs 2.00 at 64; the
# 49152x576 head 25.2 vs 25.7 at 16, 95.7 vs 37.1 at 64). 64 keeps the head off the break-even.
EMULATED_BF16_FP32_FROM_ROWS = 64
EMULATED_UPCAST_ROWS = 8192  # output rows of a weight upcast at once: 18 MB in fp32 at hidden 576


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cpu_kernels: bool = True) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T (+ bias) in x's dtype; cpu_kernels False (the Triton backend): plain torch only."""
    if not cpu_kernels:
        return F.linear(x, weight, bias)
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
            and 1 <= x.shape[0] <= GEMV_MAX_ROWS and x.shape[1] % 32 == 0 and weight.is_contiguous() and cpu_ext.bf16_available()):
        out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
        cpu_ext.op("dense_gemv")(x.contiguous(), weight, out)
        return out if bias is None else out + bias
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= EMULATED_BF16_FP32_FROM_ROWS * x.shape[-1]
            and not cpu_ext.bf16_matmuls_are_native()):
        return _fp32_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x @ weight.T in fp32, rounded once to bf16; the weight is upcast EMULATED_UPCAST_ROWS
    output rows at a time, so a large vocabulary's head never exists whole in fp32."""
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    for start in range(0, weight.shape[0], EMULATED_UPCAST_ROWS):
        rows = slice(start, start + EMULATED_UPCAST_ROWS)
        out[..., rows] = F.linear(x32, weight[rows].float(), None if bias is None else bias[rows].float())
    return out


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as AWQ int4 (qweight / qzeros / scales)."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 triton: bool = False, dense_from_rows: int | None = None, w4a8_from_rows: int | None = None):
        super().__init__()
        self.in_features = qweight.shape[0]
        self.out_features = scales.shape[1]
        self.group_size = self.in_features // scales.shape[0]
        self.bias = bias
        self.cpu_weight: cpu_int4.CpuInt4Weight | cpu_int4.NativeInt4Weight | None = None
        self.awq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.dense_from_rows = dense_from_rows  # Triton: rows from which a call dequantizes and runs a dense matmul
        # --activations int8: calls of this many rows or more run W4A8 (kernels/w4a8.py) on a copy
        # of the codes in its layout (as many bytes as the int4 weight); None: never
        self.w4a8_from_rows = w4a8_from_rows
        self.w4a8: W4A8Weight | None = None
        if triton:
            self.awq = (qweight, qzeros, scales)  # the Triton kernels read the AWQ layout directly
        else:
            self.cpu_weight = cpu_int4.prepare_cpu_int4(qweight, qzeros, scales)
            if w4a8_from_rows is not None:
                self.w4a8 = prepare_w4a8(qweight, qzeros, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the runtime passes [tokens, in]; other callers may add leading dims
            return self.forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.w4a8 is not None and x.shape[0] >= self.w4a8_from_rows and x.dtype in W4A8_X_DTYPES:
            return w4a8_linear(x, self.w4a8, self.bias)
        if self.awq is None:
            return cpu_int4.int4_matmul(x, self.cpu_weight, self.bias)
        from .triton_gemm import awq_dequantize, w4a16_gemm

        if self.dense_from_rows is not None and x.shape[0] >= self.dense_from_rows:
            y = torch.matmul(x, awq_dequantize(*self.awq, x.dtype))
        else:
            y = w4a16_gemm(x, *self.awq)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        """Bytes of packed weight the kernels read per call (codes + scales + zeros)."""
        return self.in_features * self.out_features // 2 + (self.in_features // self.group_size) * self.out_features * 4

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, int4"


class DenseLinear(nn.Module):
    """y = x @ W.T (+ bias) with a dense weight in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, cpu_kernels: bool = True):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.cpu_kernels = cpu_kernels
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return dense_linear(x.to(self.weight.dtype), self.weight, self.bias, self.cpu_kernels)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}"


def int4_kernels(model: nn.Module, backend: KernelBackend, dtype: torch.dtype) -> str:
    """What computes `model`'s int4 linears (as build_linear chose them), in words (the server's banner)."""
    path = backend.int4_linear(dtype)
    if path == "triton":
        dense = f" (Triton dequantize + {str(dtype).removeprefix('torch.')} matmul from {backend.int4_dense_from_rows} rows)"
        return "Triton W4A16 GEMM" + (dense if backend.int4_dense_from_rows is not None else "")
    if path == "torch":
        return f"dequantized once at load, {str(dtype).removeprefix('torch.')} matmuls"
    if backend.activations == "int8" and any(isinstance(m, QuantLinear) and m.w4a8 is not None for m in model.modules()):
        return f"{_cpu_int4_kernels(model, dtype)} below {backend.w4a8_from_rows} rows, W4A8 (int8 activations, VNNI) from there"
    return _cpu_int4_kernels(model, dtype)


def _cpu_int4_kernels(model: nn.Module, dtype: torch.dtype) -> str:
    if dtype != torch.bfloat16:
        return f"dequantize + {str(dtype).removeprefix('torch.')} matmul"
    if any(isinstance(m, QuantLinear) and isinstance(m.cpu_weight, cpu_int4.NativeInt4Weight) for m in model.modules()):
        return f"quantkit C++ int4 kernel (dequantize + matmul from {cpu_int4.NATIVE_DENSE_FROM_ROWS} rows)"
    return "PyTorch fused int4 op"


def build_linear(tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype, backend: KernelBackend = CPU) -> nn.Module:
    """The linear named `prefix` from a checkpoint's tensors: packed if it has a qweight, else dense."""
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        bias = bias.to(dtype)
    if f"{prefix}.qweight" in tensors:
        packed = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
        path = backend.int4_linear(dtype)
        if path == "torch":  # no int4 kernel computes in this dtype here: the weight dequantized once
            return DenseLinear(dequantize_awq(*packed, dtype), bias, backend.cpu_kernels)
        return QuantLinear(*packed, bias, triton=path == "triton", dense_from_rows=backend.int4_dense_from_rows,
                           w4a8_from_rows=backend.w4a8_from_rows if backend.activations == "int8" and path == "cpu" else None)
    if f"{prefix}.weight" not in tensors:
        raise KeyError(f"checkpoint has neither {prefix}.qweight nor {prefix}.weight")
    return DenseLinear(tensors[f"{prefix}.weight"].to(dtype), bias, backend.cpu_kernels)


def build_fused_linear(tensors: Mapping[str, torch.Tensor], prefixes: list[str], dtype: torch.dtype, backend: KernelBackend = CPU) -> nn.Module:
    """One linear computing several projections of the same input, outputs concatenated in order.

    Fusing q/k/v (and gate/up) turns three (two) small matmuls into one, which matters at decode
    where each call is short. Packed weights concatenate along the output dim: AWQ packs 8 output
    columns per int32 word and every projection's width is a multiple of 8.
    """
    if len(prefixes) == 1:
        return build_linear(tensors, prefixes[0], dtype, backend)
    packed = [f"{p}.qweight" in tensors for p in prefixes]
    if any(packed) and not all(packed):
        raise ValueError(f"cannot fuse {prefixes}: some are packed int4 and some dense")
    suffixes = ("qweight", "qzeros", "scales") if all(packed) else ("weight",)
    if not all(packed):
        fused = {"fused.weight": torch.cat([tensors[f"{p}.weight"] for p in prefixes], dim=0)}
    else:
        fused = {f"fused.{s}": torch.cat([tensors[f"{p}.{s}"] for p in prefixes], dim=1) for s in suffixes}
    biases = [tensors.get(f"{p}.bias") for p in prefixes]
    if any(b is not None for b in biases):
        outs = [tensors[f"{p}.scales"].shape[1] if all(packed) else tensors[f"{p}.weight"].shape[0] for p in prefixes]
        device = next(b for b in biases if b is not None).device
        fused["fused.bias"] = torch.cat([b if b is not None else torch.zeros(n, device=device) for b, n in zip(biases, outs)])
    return build_linear(fused, "fused", dtype, backend)


# ---------------------------------------------------------------------------- int8 output head

INT8_GROUP = 32  # inputs per scale, as in GGUF's Q8_0

# Calls of up to this many rows read the int8 head (C++ GEMV); more rows read the dense head. The
# default model's head, dense vs int8 (benchmarks/int8_head.py, 2 threads): 2.64 vs 0.87 ms at 1
# row, 6.0 vs 2.7 at 8, 9.3 vs 6.2 at 32, 14.1 vs 11.7 at 64: int8 wins while the call is memory-bound.
INT8_HEAD_MAX_ROWS = 64


@dataclass(frozen=True)
class Int8Weight:
    """A weight-only int8 matrix W[n, k] = codes[n, k] * scales[n, k // 32] (GGUF's Q8_0 layout)."""

    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # fp16 [out, in / 32]


# Rows of a head quantized (and compared) at a time at load: the fp32 temporaries of a whole large
# head would be GBs (128k x 4096 is 2 GB per fp32 copy); 8,192 rows of 4,096 are 128 MB.
INT8_CHUNK_ROWS = 8192


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric int8 with one fp16 scale per 32 inputs of a row: s = amax / 127, q = round(w / s).

    A weight that already lies on such a grid (a GGUF Q8_0 tensor, dequantized to fp16 or fp32)
    gets its own codes back and its scales to within fp16 rounding, so for such a model the int8
    head is as close to the source as the dense fp16 one, and closer than its bf16 copy.
    Computed INT8_CHUNK_ROWS rows at a time.
    """
    out_features, in_features = weight.shape
    if in_features % INT8_GROUP:
        raise ValueError(f"int8 weights need in_features divisible by {INT8_GROUP}, got {in_features}")
    codes = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // INT8_GROUP, dtype=torch.float16)
    for rows in _row_chunks(out_features):
        codes[rows], scales[rows] = _quantize_int8_rows(weight[rows])
    return Int8Weight(codes, scales)


def _row_chunks(rows: int) -> list[slice]:
    return [slice(start, start + INT8_CHUNK_ROWS) for start in range(0, rows, INT8_CHUNK_ROWS)]


def _quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, in_features = weight.shape
    w = weight.float().reshape(rows, in_features // INT8_GROUP, INT8_GROUP)
    scales = (w.abs().amax(-1) / 127).to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("the weight has values too large for fp16 int8 scales (or NaN/inf); keep this head dense")
    s = scales.float().unsqueeze(-1)
    codes = torch.where(s > 0, w / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0).round_().clamp_(-127, 127)
    return codes.to(torch.int8).reshape(rows, in_features), scales


def dequantize_int8(weight: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in `dtype`, formed in fp32 and rounded once."""
    w = weight.codes.float().view(weight.codes.shape[0], -1, INT8_GROUP) * weight.scales.float().unsqueeze(-1)
    return w.view(weight.codes.shape).to(dtype)


def int8_error_ratio(weight: torch.Tensor, q: Int8Weight, dtype: torch.dtype) -> float:
    """How far the int8 copy lies from the checkpoint's weight, over how far its copy in `dtype`
    does (Frobenius norms). At most 1: the int8 copy is no less faithful than the dense one the
    runtime already computes with (0.14 for SmolLM2's Q8_0-born head against bf16; about 3 for
    Gaussian fp16 weights). Summed INT8_CHUNK_ROWS rows at a time."""
    int8_squares = dense_squares = 0.0
    for rows in _row_chunks(weight.shape[0]):
        source = weight[rows].float()
        int8_squares += float((dequantize_int8(Int8Weight(q.codes[rows], q.scales[rows]), torch.float32) - source).square().sum())
        dense_squares += float((weight[rows].to(dtype).float() - source).square().sum())
    if dense_squares == 0.0:
        return 0.0 if int8_squares == 0.0 else float("inf")
    return (int8_squares / dense_squares) ** 0.5


@dataclass(frozen=True)
class PackedInt8:
    """An Int8Weight in the int8 GEMV's layout (kernels/csrc/linear.cpp, int8_pack)."""

    codes: torch.Tensor  # int8 [out / 16 (rounded up), in / 2, 16, 2]
    scales: torch.Tensor  # fp16 [out / 16, in / 32, 16]
    out_features: int

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2


def pack_int8(weight: Int8Weight) -> PackedInt8:
    """Codes and scales in 16-row blocks, rows past out_features zero (int8_gemv's operands)."""
    out_features, in_features = weight.codes.shape
    blocks = -(-out_features // 16)
    scales = torch.nn.functional.pad(weight.scales, (0, 0, 0, blocks * 16 - out_features))
    scales = scales.view(blocks, 16, in_features // INT8_GROUP).transpose(1, 2).contiguous()
    return PackedInt8(cpu_ext.op("int8_pack")(weight.codes), scales, out_features)


def int8_linear(x: torch.Tensor, weight: PackedInt8) -> torch.Tensor:
    """bf16 x [M, in] @ W.T -> bf16 [M, out] with quantkit's int8 GEMV (x on a 16-bit grid, see linear.cpp)."""
    out = torch.empty(x.shape[0], weight.out_features, dtype=torch.bfloat16)
    cpu_ext.op("int8_gemv")(x.contiguous(), weight.codes, weight.scales, out)
    return out


class OutputHead(nn.Module):
    """The logits matrix [vocab, hidden] in the compute dtype, plus optionally an int8 copy.

    Batch-1 decode reads the whole head every step (56.6 MB in bf16 for SmolLM2-135M, about as
    many bytes as all its int4 layers), so bf16 calls of up to INT8_HEAD_MAX_ROWS rows read the
    int8 copy, half the bytes; larger calls, compute-bound, use the dense head. (With more than
    that many sequences per step, a request's logits come from one head or the other depending on
    the batch around it, as its bf16 linears already do: see docs/architecture.md.) The copy needs
    quantkit's int8 kernel (AVX-512 BF16 and VNNI): `cpu_ext.int8_available()` says whether to
    build one.
    """

    def __init__(self, weight: torch.Tensor, int8: PackedInt8 | None = None, cpu_kernels: bool = True):
        super().__init__()
        self.weight, self.int8, self.cpu_kernels = weight, int8, cpu_kernels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if (self.int8 is not None and hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and hidden.dim() == 2
                and 1 <= hidden.shape[0] <= INT8_HEAD_MAX_ROWS):
            return int8_linear(hidden, self.int8)
        return dense_linear(hidden, self.weight, cpu_kernels=self.cpu_kernels)

    def extra_repr(self) -> str:
        return f"vocab={self.weight.shape[0]}, hidden={self.weight.shape[1]}, {self.weight.dtype}" + (", int8 copy" if self.int8 else "")
