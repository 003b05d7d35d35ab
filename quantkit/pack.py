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

import sys

import torch

from .quantizer import QuantParams, dequantize

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NATURAL_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
PACK_FACTOR = 8  # 4-bit values per int32
# The bit shift that brings column c of a word to the bottom: column AWQ_ORDER[i] sits at bits 4*i.
_COLUMN_SHIFTS = torch.tensor([4 * AWQ_ORDER.index(c) for c in range(PACK_FACTOR)], dtype=torch.int32)


def pack_int4(values: torch.Tensor, order: tuple[int, ...] = AWQ_ORDER) -> torch.Tensor:
    """Pack [rows, cols] integers in [0, 15] into int32 [rows, cols / 8].

    Slot i (bits 4*i .. 4*i+3) of word j holds column 8*j + order[i]: AWQ_ORDER for AWQ,
    NATURAL_ORDER for compressed-tensors (quantkit/export.py).
    """
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} columns: must be a multiple of {PACK_FACTOR}")
    if values.numel() and (values.min() < 0 or values.max() > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    slots = values.to(torch.uint8).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(order)]
    # Two slots per byte, low nibble first; the bytes of a word least significant first. Viewing
    # the bytes as int32 also gives the two's complement of words with the top bit set.
    packed_bytes = slots[:, :, 0::2] | (slots[:, :, 1::2] << 4)
    if sys.byteorder == "big":
        packed_bytes = packed_bytes.flip(-1)
    return packed_bytes.contiguous().view(torch.int32).reshape(rows, cols // PACK_FACTOR)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 (AWQ order): int32 [rows, cols / 8] -> int32 [rows, cols]."""
    rows, words = packed.shape
    # All eight columns in two broadcast ops rather than a loop of eight: far fewer passes and
    # thread launches. The shift is arithmetic; the mask drops the copied sign bits.
    return ((packed.unsqueeze(-1) >> _COLUMN_SHIFTS) & 0xF).reshape(rows, words * PACK_FACTOR)


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
