"""The Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3): pre-norm blocks, attention and a gated MLP.

Their differences do not touch the scaling groups: q/k/v biases (Qwen2) stay unscaled when the
inputs are (and are divided with v's outputs when v -> o folds), Qwen3's per-head q/k norms sit
after q/k_proj, whose outputs the scales leave unchanged, and sliding windows only change masks.
"""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, ScalingGroup


class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    no_clip = ("self_attn.q_proj", "self_attn.k_proj")
    mlp_norm = "post_attention_layernorm"  # the norm whose output feeds gate/up

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def scaling_groups(self, block: nn.Module) -> list[ScalingGroup]:
        groups = [
            ScalingGroup(
                prev="input_layernorm",
                linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                inspect="self_attn",
                inspect_takes_block_kwargs=True,
            )
        ]
        # v -> o only when every o input channel is one v output channel: with grouped-query
        # attention v has fewer outputs than o has inputs and a per-channel scale cannot pass.
        attn = block.self_attn
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.append(ScalingGroup(prev="self_attn.v_proj", linears=("self_attn.o_proj",), inspect="self_attn.o_proj"))
        groups += [
            ScalingGroup(
                prev=self.mlp_norm,
                linears=("mlp.gate_proj", "mlp.up_proj"),
                inspect="mlp",
            ),
            ScalingGroup(prev="mlp.up_proj", linears=("mlp.down_proj",), inspect="mlp.down_proj"),
        ]
        return groups
