"""Gemma 3 text models: four norms per layer, (1 + w) RMSNorms, GeGLU MLP.

The scales fold into the norms that feed linears: input_layernorm (-> q/k/v) and
pre_feedforward_layernorm (-> gate/up). post_attention_layernorm and post_feedforward_layernorm
normalize the attention and MLP outputs before the residual adds; nothing folds into them.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    mlp_norm = "pre_feedforward_layernorm"  # post_attention_layernorm normalizes the attention output

    def fold_into_prev(self, prev: nn.Module, scales: torch.Tensor) -> None:
        """A Gemma norm multiplies by (1 + w): dividing its output by s is w' = (1 + w) / s - 1."""
        if isinstance(prev, nn.Linear):
            return super().fold_into_prev(prev, scales)
        w = prev.weight.data
        w.copy_(((1.0 + w.float()) / scales.float() - 1.0).to(w.dtype))
