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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuantkitError
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


# ---------------------------------------------------------------------------- checking a checkpoint's layout
# From safetensors headers alone, before any tensor is read: quantkit's own artifacts and foreign
# AWQ exports are held to the same rules here.

PACKED_SUFFIXES = ("qweight", "qzeros", "scales")
_PACKED_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16"}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "I32", "F16", ...


def packed_modules(names: Iterable[str]) -> dict[str, set[str]]:
    """Module prefix -> which of qweight/qzeros/scales it has."""
    modules: dict[str, set[str]] = {}
    for name in names:
        module, _, suffix = name.rpartition(".")
        if suffix in PACKED_SUFFIXES:
            modules.setdefault(module, set()).add(suffix)
    return modules


def implied_group_size(module: str, meta: Mapping[str, TensorMeta]) -> int:
    """The group size a packed linear's shapes imply; refuses shapes that are not the AWQ GEMM layout."""
    qweight, qzeros, scales = (meta[f"{module}.{s}"] for s in PACKED_SUFFIXES)
    for suffix, m in zip(PACKED_SUFFIXES, (qweight, qzeros, scales)):
        if m.dtype != _PACKED_DTYPES[suffix] or len(m.shape) != 2:
            raise QuantkitError(
                f"{module}.{suffix} is {m.dtype} {list(m.shape)}; the AWQ GEMM layout stores it as a 2-D "
                f"{_PACKED_DTYPES[suffix]} tensor. This is not an AWQ GEMM checkpoint."
            )
    in_features, words = qweight.shape
    n_groups, out_features = scales.shape
    if words * PACK_FACTOR != out_features or qzeros.shape != (n_groups, words):
        raise QuantkitError(
            f"{module}: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)} are not the "
            f"AWQ GEMM shapes [in, out/8], [in/g, out/8], [in/g, out]; another packing (e.g. GEMV) under a 'gemm' label is refused."
        )
    if n_groups == 0 or in_features % n_groups:
        raise QuantkitError(f"{module}: {in_features} input features do not split into {n_groups} scale groups; the tensors are damaged.")
    return in_features // n_groups


def check_packed_tensors(
    meta: Mapping[str, TensorMeta], group_size: int, not_converted: tuple[str, ...], where: str | Path, declared_by: str
) -> tuple[str, ...]:
    """Every packed linear complete, in the GEMM layout, all with the declared group size; returns them.

    `declared_by` names the file(s) that state group_size and modules_to_not_convert, for messages.
    """
    modules = packed_modules(meta)
    if not modules:
        raise QuantkitError(f"{where}: the settings declare AWQ but no tensor is packed (no *.qweight); the weights are not an AWQ export.")
    incomplete = {m: sorted(set(PACKED_SUFFIXES) - have) for m, have in modules.items() if have != set(PACKED_SUFFIXES)}
    if incomplete:
        module, lacking = sorted(incomplete.items())[0]
        raise QuantkitError(
            f"{where}: {module} lacks {' and '.join(lacking)} ({len(incomplete)} packed linear(s) incomplete); every quantized "
            "linear needs qweight, qzeros and scales. The checkpoint is incomplete or damaged: export it again."
        )
    doubled = sorted(m for m in modules if f"{m}.weight" in meta)
    if doubled:
        raise QuantkitError(f"{where}: {doubled[0]} has both a packed qweight and a dense weight; which one holds is unknown, so it is refused.")
    # AutoAWQ skips a module when any entry of modules_to_not_convert occurs in its name.
    skipped = sorted(m for m in modules if any(p in m for p in not_converted))
    if skipped:
        raise QuantkitError(
            f"{where}: {skipped[0]} is packed although modules_to_not_convert {list(not_converted)} says it stays dense; "
            "the settings do not describe these weights."
        )
    groups: dict[int, list[str]] = {}
    for module in sorted(modules):
        groups.setdefault(implied_group_size(module, meta), []).append(module)
    if len(groups) > 1:
        detail = "; ".join(f"group {g}: {mods[0]}{f' and {len(mods) - 1} more' if len(mods) > 1 else ''}" for g, mods in sorted(groups.items()))
        raise QuantkitError(
            f"{where}: layers are quantized with different group sizes ({detail}); mixed group sizes are refused, "
            f"since one group_size must describe the model. Re-quantize with a single group size."
        )
    (implied,) = groups
    if implied != group_size:
        raise QuantkitError(
            f"{where}: the scales' shapes imply group size {implied} (e.g. {groups[implied][0]}) but {declared_by} says "
            f"{group_size}; the settings do not describe these weights. Fix the group size in the settings or quantize again."
        )
    return tuple(sorted(modules))
