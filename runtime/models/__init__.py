"""Runtime model implementations by Hugging Face architecture name."""

from __future__ import annotations

from .llama import LlamaConfig, LlamaForCausalLM

# architectures[0] of config.json -> (config parser, network). Mistral is Llama without a window.
MODEL_CLASSES = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": (LlamaConfig, LlamaForCausalLM),
}
