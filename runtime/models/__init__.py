"""Runtime model implementations by Hugging Face architecture name."""

from __future__ import annotations

from .gemma3 import Gemma3Config, Gemma3ForCausalLM
from .llama import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

# architectures[0] of config.json -> (config parser, network). The Llama family shares one
# network; its parsers differ in sliding-window rules and q/k norms.
MODEL_CLASSES = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": (MistralConfig, LlamaForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, LlamaForCausalLM),
    "Qwen3ForCausalLM": (Qwen3Config, LlamaForCausalLM),
    "Gemma3ForCausalLM": (Gemma3Config, Gemma3ForCausalLM),
}
