"""W4A8 on the CPU: AWQ int4 weights times activations quantized per row to int8, on VNNI.

The kernel (kernels/csrc/w4a8.cpp, torch.ops.quantkit_cpu.w4a8_linear) needs AVX-512 BW and VNNI
but not AVX-512 BF16: it is the integer path for batched steps on CPUs (Ice Lake, Cascade Lake)
where the int4 kernel is not compiled and quantkit otherwise dequantizes the weight and runs an fp32
matmul on every call (benchmarks/w4a8_speed.py compares the two).

What it computes, for x [M, K] (bf16 or fp32) and W.T[k, n] = (q - z) * s (group size g):
  xq[m, k] = round(x[m, k] * (127 / amax_m)), amax_m = max_k |x[m, k]|, scale_m = amax_m / 127,
             both in fp32, rounding half to even; |xq| <= 127
  y[m, n]  = scale_m * sum_g s[g, n] * sum_{k in g} (q[k, n] - z[g, n]) * xq[m, k]
The inner sums are exact integers; only the fp32 group scaling and the final rounding to x's
dtype are not. Rows whose 127 / amax is not finite in fp32 (all zeros, or amax below ~3.7e-37)
give zeros (plus the bias); a row holding NaN or inf gives a row of NaN and leaves the others
alone. w4a8_reference below is the same arithmetic in float64, for tests.

The activation quantization costs accuracy, unlike the int4 kernel's (which only rounds its
output): relative error ~0.5-1% on Gaussian activations, more on rows with large outliers, since
one outlier sets the step of the whole row (tests/test_w4a8.py measures both).

    weight = prepare_w4a8(qweight, qzeros, scales)   # once, at load (the AWQ GEMM tensors)
    y = w4a8_linear(x, weight, bias)                 # x [..., in] bf16/fp32 -> [..., out], x's dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.pack import unpack_int4

from . import cpu_ext

COLUMNS = 32  # the kernel's output block: packed codes, scales and zeros are padded to a multiple
GROUP_SIZES = (32, 64, 128, 256)
X_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class W4A8Weight:
    """One AWQ linear in the W4A8 kernel's layout (kernels/csrc/w4a8.cpp, w4a8_pack)."""

    codes: torch.Tensor  # uint8 [out / 32 (rounded up), in / 8, 2, 64]: 4-bit codes, two a byte
    scales: torch.Tensor  # fp16 [in / g, out padded to 32] (padded columns 0)
    zeros: torch.Tensor  # uint8 [in / g, out padded to 32] (padded columns 0)
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def w4a8_available() -> bool:
    """True when the kernel is built and this CPU runs it (AVX-512 BW and VNNI)."""
    return cpu_ext.w4a8_available()


def cpu_has_w4a8_instructions() -> bool:
    """True when this CPU has what the kernel is written in (cpu_ext.W4A8_CPU_FLAGS): there, a build
    without the kernel is a failure, not a missing feature."""
    return cpu_ext._cpu_has(cpu_ext.W4A8_CPU_FLAGS)


def _check_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> int:
    """The group size of a well-formed AWQ GEMM triplet; ValueError naming what is wrong otherwise."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise ValueError(f"qweight and qzeros must be 2-D int32 (the AWQ GEMM layout), got {qweight.dtype} {list(qweight.shape)} "
                         f"and {qzeros.dtype} {list(qzeros.shape)}")
    if scales.dim() != 2 or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be 2-D floating point [in / g, out], got {scales.dtype} {list(scales.shape)}")
    in_features, words = qweight.shape
    n_groups, out_features = scales.shape
    if words * 8 != out_features or qzeros.shape != (n_groups, words):
        raise ValueError(f"qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)} are not the AWQ "
                         "GEMM shapes [in, out / 8], [in / g, out / 8], [in / g, out]")
    group_size = in_features // n_groups if n_groups else 0
    if group_size not in GROUP_SIZES or group_size * n_groups != in_features:
        raise ValueError(f"group size {in_features}/{n_groups} is not one of 32, 64, 128, 256 dividing in_features={in_features}")
    return group_size


def prepare_w4a8(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> W4A8Weight:
    """Repack an AWQ GEMM triplet (quantkit.pack's layout) for the kernel; done once, at load.
    Codes and zero points are kept exactly; scales are kept as fp16, the checkpoint's dtype (scales
    in another dtype are rounded to it, and w4a8_reference does the same)."""
    group_size = _check_awq(qweight, qzeros, scales)
    if not cpu_ext.available():
        raise RuntimeError("prepare_w4a8 needs quantkit's C++ CPU kernels, which are not available here (see the build warning)")
    in_features, out_features = qweight.shape[0], scales.shape[1]
    pad = -out_features % COLUMNS  # padded columns: code 0, scale 0, zero 0: exact zeros, never written out
    zeros = torch.nn.functional.pad(unpack_int4(qzeros).to(torch.uint8), (0, pad))
    padded_scales = torch.nn.functional.pad(scales.to(torch.float16), (0, pad))
    codes = cpu_ext.op("w4a8_pack")(unpack_int4(qweight))
    return W4A8Weight(codes, padded_scales.contiguous(), zeros.contiguous(), group_size, in_features, out_features)


def w4a8_linear(x: torch.Tensor, weight: W4A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (bf16 or fp32) -> [..., out] in x's dtype, on the kernel (w4a8_available() must hold).
    The bias is added after the kernel has rounded to x's dtype, as kernels/cpu_int4.py does."""
    if x.dtype not in X_DTYPES:
        raise TypeError(f"w4a8_linear takes bf16 or fp32 activations, got {x.dtype}")
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {weight.in_features}")
    rows = x.reshape(-1, weight.in_features).contiguous()
    out = torch.empty(rows.shape[0], weight.out_features, dtype=x.dtype)
    cpu_ext.op("w4a8_linear")(rows, weight.codes, weight.scales, weight.zeros, weight.group_size, out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*x.shape[:-1], weight.out_features)


# ---------------------------------------------------------------------------- references (tests, layout)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization in torch: x [M, K] -> xq int8 [M, K], scale fp32 [M].

    The same fp32 operations as the kernel (amax, 127 / amax, x * that, round half to even), so
    the codes agree exactly. Rows whose 127 / amax is not finite get codes 0 and scale 0; rows
    holding NaN or inf get codes 0 and scale NaN."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    inv = torch.full_like(amax, 127.0) / amax  # a true division, as the kernel's: `127.0 / amax` is reciprocal-then-multiply in torch
    finite = torch.isfinite(x32).all(dim=-1)
    zero = ~torch.isfinite(inv) & finite
    xq = torch.round(x32 * inv.unsqueeze(-1)).clamp(-127, 127)
    xq = torch.where((zero | ~finite).unsqueeze(-1), torch.zeros_like(xq), xq).to(torch.int8)
    scale = torch.where(zero, torch.zeros_like(amax), amax / 127.0)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return xq, scale


def w4a8_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, in] (the kernel's int8 activations) times the AWQ weight, in float64 -> [M, out]: what
    the kernel computes, with exact group scaling instead of fp32's."""
    group_size = _check_awq(qweight, qzeros, scales)
    xq, scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    q = unpack_int4(qweight).double()
    z = unpack_int4(qzeros).double().repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float16).double().repeat_interleave(group_size, dim=0)  # the kernel reads fp16 scales
    y = (xq.double() @ ((q - z) * s)) * scale.double().unsqueeze(-1)
    return y.view(*x.shape[:-1], scales.shape[1])


def w4a8_unpack(codes: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The packed layout read back in torch (the layout's second statement, beside w4a8_pack's C++):
    uint8 [N / 32, K / 8, 2, 64] -> int32 codes [K, N]. Byte 4j + i of chunk c of octet p of block b
    holds column 32b + 16c + j: input 8p + i in its low nibble, 8p + 4 + i in its high nibble."""
    blocks, octets = codes.shape[0], codes.shape[1]
    lines = codes.view(blocks, octets, 2, 16, 4).to(torch.int32)  # [b, p, c, j, i]
    halves = torch.stack([lines & 15, lines >> 4], dim=-1)  # [b, p, c, j, i, h]: input 8p + 4h + i
    w_t = halves.permute(1, 5, 4, 0, 2, 3).reshape(octets * 8, blocks * COLUMNS)  # [p, h, i] x [b, c, j]
    return w_t[:in_features, :out_features].contiguous()
