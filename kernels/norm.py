"""RMSNorm and the gated-MLP activation for the runtime: quantkit's C++ kernels on CPU, eager torch elsewhere.

`cpu_kernels` is the caller's KernelBackend's choice (kernels/backend.py): False (the Triton
backend) never asks for the C++ kernels; True takes them where they are built and take the tensors.

`add_rms_norm` is the pre-norm residual step of a decoder block, residual = x + residual and
normed = RMSNorm(residual), done in place in one pass over each row on CPU (eager torch needs
an add and a norm, ~7 small ops, which at batch-1 decode cost more than the arithmetic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_ext

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cpu_kernels: bool = True) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 for low-precision x."""
    if cpu_kernels and cpu_ext.handles(x, weight):
        x = x.contiguous()
        out = torch.empty_like(x)
        cpu_ext.op("rms_norm")(x, weight, eps, out)
        return out
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 cpu_kernels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); residual None (the first block): (RMSNorm(x), x).

    May overwrite x and residual (they are the block's own intermediates).
    """
    if residual is None:
        return rms_norm(x, weight, eps, cpu_kernels), x
    if cpu_kernels and cpu_ext.handles(x, residual, weight) and x.is_contiguous() and residual.is_contiguous():
        cpu_ext.op("add_rms_norm")(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return F.rms_norm(residual, (residual.shape[-1],), weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor, cpu_kernels: bool = True) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (a fused gate/up projection)."""
    if cpu_kernels and cpu_ext.handles(gate_up) and gate_up.is_contiguous():
        out = torch.empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2, dtype=gate_up.dtype)
        cpu_ext.op("silu_and_mul")(gate_up, out)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
