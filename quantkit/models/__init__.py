"""Architecture adapters, looked up by the model config's `model_type`."""

from __future__ import annotations

from ..errors import QuantkitError
from .base import ArchAdapter, ScalingGroup
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter

ADAPTERS: tuple[ArchAdapter, ...] = (LlamaAdapter(), Gemma3Adapter())


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def get_adapter(model_type: str) -> ArchAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise QuantkitError(
        f"architecture '{model_type}' is not supported; supported model types: "
        f"{', '.join(supported_model_types())}."
    )


__all__ = ["ArchAdapter", "ScalingGroup", "get_adapter", "supported_model_types"]
