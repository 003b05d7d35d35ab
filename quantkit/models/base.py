"""The architecture adapter: everything the generic AWQ loop needs to know about a model family.

The loop in quantkit/awq.py never asks which model it is holding; it asks the adapter for the
decoder blocks, the scaling groups of a block and how to run an inspected sub-module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the same input and so can share one per-input-channel scale.

    The scale s divides the output of `prev` (a norm or a linear) and multiplies the input
    columns of every linear in `linears`, which leaves the full-precision function unchanged
    but moves quantization error away from the channels with large activations. The search
    loss is the output error of `inspect` (a module of the block that contains the linears).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    inspect_takes_block_kwargs: bool = False  # attention needs positions and masks; an MLP does not


class ArchAdapter:
    """Base adapter; subclasses declare one family of architectures."""

    model_types: tuple[str, ...] = ()
    # Linears whose clipping is not searched: query/key errors are amplified through softmax.
    no_clip: tuple[str, ...] = ()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def scaling_groups(self, block: nn.Module) -> list[ScalingGroup]:
        raise NotImplementedError

    def quantized_linears(self, block: nn.Module) -> list[str]:
        """Names (relative to the block) of every linear that is quantized."""
        return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]

    def block_prefix(self, index: int) -> str:
        """Name of block `index` inside the full model's state dict."""
        raise NotImplementedError

    def fold_into_prev(self, prev: nn.Module, scales: torch.Tensor) -> None:
        """Divide prev's output channels by scales (in place, on full-precision weights)."""
        if isinstance(prev, nn.Linear):
            prev.weight.data.div_(scales.view(-1, 1).to(prev.weight.dtype))
        elif hasattr(prev, "weight"):  # a norm: y = normalize(x) * weight (+ bias)
            prev.weight.data.div_(scales.to(prev.weight.dtype))
        else:
            raise TypeError(f"cannot fold scales into {type(prev).__name__}")
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(scales.to(prev.bias.dtype))

    def run_inspected(self, module: nn.Module, x: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """Output of an inspected module for input x (first element when it returns a tuple)."""
        out = module(x, **block_kwargs) if block_kwargs else module(x)
        return out[0] if isinstance(out, tuple) else out

    def run_block(self, block: nn.Module, x: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        out = block(x, **block_kwargs)
        return out[0] if isinstance(out, tuple) else out
