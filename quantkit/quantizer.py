"""Group-wise asymmetric integer quantization: the pure math, no modules, no I/O.

Weights are in nn.Linear layout [out_features, in_features]; a group is `group_size`
consecutive input features of one output row, and every group has its own scale and
integer zero point, so w ~= (q - zero) * scale with q in [0, 2**bits - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QuantkitError

SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_BITS = (4,)


@dataclass(frozen=True)
class QuantParams:
    """Per-group parameters of one weight: scales are fp16-representable, zeros integral."""

    scales: torch.Tensor  # float32 [out, n_groups], values exactly representable in fp16
    zeros: torch.Tensor  # int32 [out, n_groups], in [0, 2**bits - 1]
    group_size: int
    bits: int = 4


def check_group_size(in_features: int, group_size: int, layer: str = "layer") -> None:
    """Refuse group sizes the packed format cannot express for this layer."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantkitError(
            f"group size {group_size} is not supported; use one of {list(SUPPORTED_GROUP_SIZES)}."
        )
    if in_features % group_size:
        working = [g for g in SUPPORTED_GROUP_SIZES if in_features % g == 0]
        raise QuantkitError(
            f"group size {group_size} does not divide the {in_features} input features of {layer}; "
            f"group sizes that work for it: {working or 'none'} (pass --group-size)."
        )


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [out, in] as [out, in / group_size, group_size]."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group_size, group_size)


def compute_qparams(w: torch.Tensor, group_size: int, bits: int = 4) -> QuantParams:
    """Min/max scale and zero point of every group (the AWQ convention).

    The range always includes 0, so the integer zero point is exact and a group whose
    values share one sign (or are all equal) is still representable. Scales are rounded to
    fp16 *before* the zero point is derived, because the artifact stores fp16 scales: codes
    computed against fp32 scales would not dequantize to what was measured.
    """
    max_code = 2**bits - 1
    g = grouped(w.float(), group_size)
    w_max = g.amax(dim=-1).clamp(min=0)
    w_min = g.amin(dim=-1).clamp(max=0)
    scales = ((w_max - w_min).clamp(min=1e-5) / max_code).half().float()
    zeros = torch.round(-w_min / scales).clamp(0, max_code).to(torch.int32)
    return QuantParams(scales=scales, zeros=zeros, group_size=group_size, bits=bits)


def quantize(w: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Integer codes [out, in] (int32, in [0, 2**bits - 1]) of w under params."""
    max_code = 2**params.bits - 1
    g = grouped(w.float(), params.group_size)
    q = torch.round(g / params.scales[..., None]) + params.zeros[..., None]
    return q.clamp(0, max_code).to(torch.int32).reshape(w.shape)


def dequantize(q: torch.Tensor, params: QuantParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero) * scale, back in [out, in] layout."""
    g = grouped(q.float(), params.group_size)
    w = (g - params.zeros[..., None].float()) * params.scales[..., None]
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-trip w through its own quantization grid (what the packed weight will compute)."""
    params = compute_qparams(w, group_size, bits)
    return dequantize(quantize(w, params), params, dtype=w.dtype)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||^2 / ||exact||^2, in float64 so tiny errors are not lost."""
    diff = (approx.double() - exact.double()).pow(2).sum()
    return float(diff / exact.double().pow(2).sum().clamp(min=1e-30))
