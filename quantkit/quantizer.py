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


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, max_code: int) -> torch.Tensor:
    """Nearest code (as float) of each weight on the grid (q - zero) * scale, q in [0, max_code]."""
    return (torch.round(w / scales) + zeros).clamp(0, max_code)


def grid_value(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The weight a code stands for: (q - zero) * scale."""
    return (q - zeros) * scales


def quantize(w: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Integer codes [out, in] (int32, in [0, 2**bits - 1]) of w under params."""
    g = grouped(w.float(), params.group_size)
    q = round_to_grid(g, params.scales[..., None], params.zeros[..., None], 2**params.bits - 1)
    return q.to(torch.int32).reshape(w.shape)


def dequantize(q: torch.Tensor, params: QuantParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero) * scale, back in [out, in] layout."""
    g = grouped(q.float(), params.group_size)
    w = grid_value(g, params.scales[..., None], params.zeros[..., None].float())
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-trip w through its own quantization grid (what the packed weight will compute)."""
    params = compute_qparams(w, group_size, bits)
    return dequantize(quantize(w, params), params, dtype=w.dtype)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||^2 / ||exact||^2, in float64 so tiny errors are not lost."""
    diff = (approx.double() - exact.double()).pow(2).sum()
    return float(diff / exact.double().pow(2).sum().clamp(min=1e-30))


def gptq_quantize(
    w: torch.Tensor, hessian: torch.Tensor, params: QuantParams, damp: float = 0.01, block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """Integer codes [out, in] of w on the fixed grid `params`, rounded to minimize output error.

    GPTQ's rounding (Frantar et al., 2022): input columns are rounded one at a time, and each
    column's rounding error is pushed onto the columns not yet rounded, weighted by the inverse
    of `hessian` (sum of x x^T over calibration inputs, [in, in]), so that the layer's output
    on those inputs, not each weight, stays closest to the original. The grid (scales and zero
    points) is fixed beforehand, so the codes pack exactly as round-to-nearest codes do. With a
    diagonal `hessian` no error is passed on and the codes equal round-to-nearest's.
    `damp` (a fraction of the mean diagonal) keeps the inverse well conditioned.
    `act_order` rounds the columns of the largest inputs (the Hessian's diagonal) first, while the
    most columns remain to absorb their error (GPTQ's "act-order"); the grid stays the fixed,
    group-wise one, so the codes still pack in the usual column order.
    """
    max_code = 2**params.bits - 1
    gs = params.group_size
    weights = w.float().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    # Masked fills rather than boolean indexing: the same values, with no data-dependent shapes,
    # so the function also runs on the meta device (tests check device hygiene with it).
    torch.diagonal(h).masked_fill_(dead, 1.0)
    weights.masked_fill_(dead[None, :], 0.0)
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    scales = params.scales.repeat_interleave(gs, dim=1)  # [out, in]
    zeros = params.zeros.float().repeat_interleave(gs, dim=1)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        codes = _gptq_codes(weights[:, order], h[order][:, order], scales[:, order], zeros[:, order], max_code, block_size)
        return codes[:, torch.argsort(order)]
    return _gptq_codes(weights, h, scales, zeros, max_code, block_size)


def _gptq_codes(
    weights: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, max_code: int, block_size: int
) -> torch.Tensor:
    """GPTQ's column loop over `weights` (updated in place) in the given column order."""
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to later columns.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.empty(weights.shape, dtype=torch.int32, device=weights.device)
    in_features = weights.shape[1]
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = weights[:, start:stop]  # a view: updates land in `weights`
        errors = torch.empty_like(block)
        block_inv = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            q = round_to_grid(block[:, i], scales[:, col], zeros[:, col], max_code)
            codes[:, col] = q.to(torch.int32)
            error = (block[:, i] - grid_value(q, scales[:, col], zeros[:, col])) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = error
        weights[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return codes
