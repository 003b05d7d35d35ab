"""The AWQ 'GEMM' checkpoint layout, as AutoAWQ, vLLM and transformers read it.

For a linear with weight W [out, in] (y = x @ W.T) and group size g:
  qweight int32 [in, out / 8]      codes of W.T, 8 output columns per int32
  qzeros  int32 [in / g, out / 8]  zero points, packed the same way
  scales  fp16  [in / g, out]
Inside each int32 the nibble at bits 4*i .. 4*i+3 holds column 8*j + AWQ_ORDER[i], i.e. the
nibbles in order hold columns 0, 2, 4, 6, 1, 3, 5, 7 (the order AWQ's GPU kernels unpack in).
Dequantized: W.T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n].
"""

from __future__ import annotations

import torch

from .quantizer import QuantParams, dequantize

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = 8  # 4-bit values per int32


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack [rows, cols] integers in [0, 15] into int32 [rows, cols / 8] in AWQ order."""
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of {PACK_FACTOR}")
    if values.numel() and (values.min() < 0 or values.max() > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    v = values.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)
    packed = torch.zeros(rows, cols // PACK_FACTOR, dtype=torch.int64)
    for slot, column in enumerate(AWQ_ORDER):
        packed |= v[:, :, column] << (4 * slot)
    # Reinterpret the unsigned 32-bit words as int32 (two's complement) without overflow.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [rows, cols / 8] -> int32 [rows, cols]."""
    rows, words = packed.shape
    out = torch.empty(rows, words, PACK_FACTOR, dtype=torch.int32)
    for slot, column in enumerate(AWQ_ORDER):
        # Arithmetic shift keeps the sign bits high; the mask discards them.
        out[:, :, column] = (packed >> (4 * slot)) & 0xF
    return out.reshape(rows, words * PACK_FACTOR)


def pack_awq(q: torch.Tensor, params: QuantParams) -> dict[str, torch.Tensor]:
    """Codes [out, in] and their group params -> the three AWQ GEMM tensors."""
    return {
        "qweight": pack_int4(q.t().contiguous()),
        "qzeros": pack_int4(params.zeros.t().contiguous()),
        "scales": params.scales.t().contiguous().to(torch.float16),
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, QuantParams]:
    """The three AWQ GEMM tensors -> codes [out, in] and QuantParams ([out, n_groups])."""
    in_features = qweight.shape[0]
    n_groups = scales.shape[0]
    if in_features % n_groups:
        raise ValueError(f"qweight has {in_features} rows, not a multiple of {n_groups} groups")
    q = unpack_int4(qweight).t().contiguous()
    params = QuantParams(
        scales=scales.float().t().contiguous(),
        zeros=unpack_int4(qzeros).t().contiguous(),
        group_size=in_features // n_groups,
    )
    return q, params


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The dense weight [out, in] (nn.Linear layout) that an AWQ GEMM triplet encodes."""
    q, params = unpack_awq(qweight, qzeros, scales)
    return dequantize(q, params, dtype)
