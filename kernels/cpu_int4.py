"""The CPU speed path for AWQ int4 weights: quantkit's C++ kernel, else PyTorch's fused int4 op.

quantkit's kernel (kernels/csrc/linear.cpp, int4_linear; needs AVX-512 BF16) computes
(q - z) * s exactly in fp32 per group and reuses each group's widened codes for every row of x, so
it is 1.45x faster than PyTorch's op at one row and 1.6-1.9x faster from 64 rows on (one block
of SmolLM2-135M, weights not in cache; benchmarks/kernel_speed.py). From NATIVE_DENSE_FROM_ROWS rows
on, its dequantize op writes the weight out once and a dense bf16 matmul (oneDNN) takes over.
Without the extension (no compiler, another CPU, QUANTKIT_CPU_KERNELS=0), the PyTorch path
below runs.

PyTorch's `_weight_int4pack_mm_for_cpu` reads 4-bit codes in its own tiled layout and computes
w = (q - 8) * scale + zero per group, with bf16 activations, scales and zeros. An AWQ weight
is w = (q - z) * s = (q - 8) * s + (8 - z) * s, so the repack keeps the codes exactly and sets
zero = (8 - z) * s. Both s and zero are rounded to bf16 (the op's only fast dtype): that costs
about 2**-9 relative per group on top of the fp16 scales, well inside bf16 activation noise.

The fused op's cost grows linearly with the rows (it loses to a bf16 matmul from M = 16), but
dequantizing a block's weights costs 4-12 ms per call here, so dequantize + bf16 matmul only wins
from M = 1024 on (one block's linears: 5.8 vs 12.3 ms at M = 256, 11.5 vs 14.1 at 512, 25.7 vs
15.3 at 1024; benchmarks/kernel_speed.py).
Long prefill chunks and evaluation batches take that path; other activation dtypes (fp32 for exact
comparisons) always do, since the fused op is 25-70x slower for them.

Where bf16 matmuls are emulated (no AVX-512 BF16, or oneDNN capped below it), large bf16 batches
dequantize to fp32 and compute in fp32 instead, rounding once to bf16: emulated bf16 is the slow
path there (EMULATED_BF16_FP32_FROM_ROWS, NATIVE_DENSE_FROM_ROWS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.pack import unpack_int4

from . import cpu_ext


# The op tiles K in units of innerKTiles * 16; 2 is the smallest tiling and divides every
# K that is a multiple of 32 (all supported group sizes are).
_INNER_K_TILES = 2

# From this many rows on, bf16 activations take dequantize + bf16 matmul instead of the fused op
# (measured: fused faster at 256, about even at 512, dense 1.3-1.7x faster at 1024). None: never.
DENSE_FROM_ROWS: int | None = 1024

# The same for quantkit's kernel, whose dequantize is fast (one block's linears, 2 threads,
# benchmarks/kernel_speed.py: kernel/dense time 0.71 at 128 rows, 0.99 at 256, 1.22 at 512).
NATIVE_DENSE_FROM_ROWS = 256
_NATIVE_COLUMNS = 64  # the kernel's output block: scales and zeros are padded to a multiple

# Where bf16 matmuls are emulated (cpu_ext.bf16_matmuls_are_native), from this many rows on a bf16
# call dequantizes in fp32 and computes in fp32, then rounds once to bf16: the fused op's time grows
# linearly with the rows and a dense bf16 matmul there is ~75x slower than fp32 (one block's int4
# linears, oneDNN capped at AVX2 on an AVX-512 machine, benchmarks/results/emulated_bf16.log, ms,
# fused / fp32 / dense bf16 over two runs: 17.8-17.9 / 21.5-22.9 / 1,371-1,374 at 256 rows, about
# even at 512 (35.5-40.1 / 33.8-41.3), 75.5-76.3 / 49.1-57.1 at 1,024).
EMULATED_BF16_FP32_FROM_ROWS = 512


@dataclass(frozen=True)
class CpuInt4Weight:
    """One AWQ linear prepared for the CPU: fused-op layout plus what the dense path needs."""

    packed: torch.Tensor  # the fused op's layout of the codes [out, in]
    scales_and_zeros: torch.Tensor  # bf16 [in / g, out, 2]: scale, (8 - z) * scale
    qweight: torch.Tensor  # int32 [in, out / 8], the AWQ words (dense path unpacks these)
    zeros: torch.Tensor  # int32 [in / g, out], unpacked zero points
    scales: torch.Tensor  # fp16 [in / g, out]
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


@dataclass(frozen=True)
class NativeInt4Weight:
    """One AWQ linear in quantkit's C++ kernel layout (kernels/csrc/linear.cpp, int4_pack)."""

    codes: torch.Tensor  # uint8 [out / 64 (rounded up), in / 4, 4, 32]
    scales: torch.Tensor  # fp16 [in / g, out padded to 64]
    zeros: torch.Tensor  # uint8 [in / g, out padded to 64]
    group_size: int
    in_features: int
    out_features: int


def _check_group_size(in_features: int, n_groups: int) -> int:
    group_size = in_features // n_groups
    if group_size not in (32, 64, 128, 256) or group_size * n_groups != in_features:
        raise ValueError(f"group size {in_features}/{n_groups} is not one of 32, 64, 128, 256 dividing in_features={in_features}")
    return group_size


def prepare_cpu_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> CpuInt4Weight | NativeInt4Weight:
    """Repack an AWQ GEMM triplet for the fastest CPU kernel this machine has (done once, at load)."""
    if cpu_ext.bf16_available():
        return prepare_native_int4(qweight, qzeros, scales)
    return prepare_torch_int4(qweight, qzeros, scales)


def prepare_native_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> NativeInt4Weight:
    in_features, out_features = qweight.shape[0], scales.shape[1]
    group_size = _check_group_size(in_features, scales.shape[0])
    pad = -out_features % _NATIVE_COLUMNS  # padded columns: scale 0, zero 0, never written out
    zeros = torch.nn.functional.pad(unpack_int4(qzeros).to(torch.uint8), (0, pad))
    padded_scales = torch.nn.functional.pad(scales.to(torch.float16), (0, pad))
    codes = cpu_ext.op("int4_pack")(unpack_int4(qweight))
    return NativeInt4Weight(codes, padded_scales.contiguous(), zeros.contiguous(), group_size, in_features, out_features)


def prepare_torch_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> CpuInt4Weight:
    """PyTorch's fused-op layout."""
    group_size = _check_group_size(qweight.shape[0], scales.shape[0])
    codes = unpack_int4(qweight)  # [in, out]
    zeros = unpack_int4(qzeros)  # [in / g, out]
    s = scales.float()
    scales_and_zeros = torch.stack([s, (8 - zeros).float() * s], dim=-1).to(torch.bfloat16)
    # The op wants out_features divisible by 16; AWQ guarantees 8. Pad with zero-scale columns
    # (they compute exact zeros) and slice them off after the matmul.
    pad = -codes.shape[1] % 16
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=8)
        scales_and_zeros = torch.nn.functional.pad(scales_and_zeros, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), _INNER_K_TILES)
    scales_and_zeros = scales_and_zeros.contiguous()
    return CpuInt4Weight(packed, scales_and_zeros, qweight.contiguous(), zeros.contiguous(), scales.contiguous(), group_size)


def int4_matmul_fused(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [M, in] bf16 -> [M, out] bf16 with the fused int4 op."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight.packed, weight.group_size, weight.scales_and_zeros)
    return y if y.shape[1] == weight.out_features else y[:, : weight.out_features]


def dequantize_cpu_int4(weight: CpuInt4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out, in] in `dtype`; (q - z) * s is formed in fp32 and rounded once."""
    codes = unpack_int4(weight.qweight)  # [in, out]
    g = weight.group_size
    q_minus_z = (codes.view(-1, g, codes.shape[1]) - weight.zeros.unsqueeze(1)).float()
    w_t = (q_minus_z * weight.scales.float().unsqueeze(1)).view(codes.shape)
    return w_t.t().to(dtype)


def native_int4_linear(x: torch.Tensor, weight: NativeInt4Weight) -> torch.Tensor:
    """x [M, in] bf16 -> [M, out] bf16 with quantkit's int4 kernel."""
    out = torch.empty(x.shape[0], weight.out_features, dtype=torch.bfloat16)
    cpu_ext.op("int4_linear")(x, weight.codes, weight.scales, weight.zeros, weight.group_size, out)
    return out


def dequantize_native_int4(weight: NativeInt4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W.T [in, out] in `dtype`; (q - z) * s is formed in fp32 and rounded once."""
    kernel_dtype = dtype if dtype in cpu_ext.KERNEL_DTYPES else torch.float32
    w_t = torch.empty(weight.in_features, weight.out_features, dtype=kernel_dtype)
    cpu_ext.op("int4_dequantize")(weight.codes, weight.scales, weight.zeros, weight.group_size, w_t)
    return w_t.to(dtype)


def int4_matmul(x: torch.Tensor, weight: CpuInt4Weight | NativeInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] -> [M, out] in x.dtype, choosing the kernel or dequantize + dense by M and dtype."""
    if isinstance(weight, NativeInt4Weight):
        if x.dtype == torch.bfloat16 and x.shape[0] < NATIVE_DENSE_FROM_ROWS:
            y = native_int4_linear(x.contiguous(), weight)
        elif x.dtype == torch.bfloat16 and not cpu_ext.bf16_matmuls_are_native():  # oneDNN capped below bf16
            y = torch.matmul(x.float(), dequantize_native_int4(weight, torch.float32)).to(x.dtype)
        else:  # many rows, or an exact fp32 comparison: the weight once, then a dense matmul
            y = torch.matmul(x, dequantize_native_int4(weight, x.dtype))
        return y if bias is None else y + bias.to(y.dtype)
    if x.dtype == torch.bfloat16 and not cpu_ext.bf16_matmuls_are_native() and x.shape[0] >= EMULATED_BF16_FP32_FROM_ROWS:
        y = torch.nn.functional.linear(x.float(), dequantize_cpu_int4(weight, torch.float32), None if bias is None else bias.float())
        return y.to(x.dtype)
    if x.dtype == torch.bfloat16 and (DENSE_FROM_ROWS is None or x.shape[0] < DENSE_FROM_ROWS):
        y = int4_matmul_fused(x.contiguous(), weight)
        return y if bias is None else y + bias.to(y.dtype)
    # Other dtypes fall onto a path 25-70x slower in the fused op: dequantize instead.
    return torch.nn.functional.linear(x, dequantize_cpu_int4(weight, x.dtype), None if bias is None else bias.to(x.dtype))
