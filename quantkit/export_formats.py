"""The layouts `quantkit export` writes: owned here, without torch, so the CLI can list them."""

COMPRESSED_TENSORS = "compressed-tensors"  # pack-quantized, as vLLM and llm-compressor load it
GGUF = "gguf"  # llama.cpp's Q4_1 blocks (group sizes that are multiples of 32)
SUPPORTED_FORMATS: tuple[str, ...] = (COMPRESSED_TENSORS, GGUF)
