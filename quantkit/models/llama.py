"""The Llama family (Llama, Mistral, SmolLM2): pre-norm blocks, attention and a gated MLP."""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, ScalingGroup


class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral")
    no_clip = ("self_attn.q_proj", "self_attn.k_proj")

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
                prev="post_attention_layernorm",
                linears=("mlp.gate_proj", "mlp.up_proj"),
                inspect="mlp",
            ),
            ScalingGroup(prev="mlp.up_proj", linears=("mlp.down_proj",), inspect="mlp.down_proj"),
        ]
        return groups
