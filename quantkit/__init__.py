"""quantkit: AWQ int4 quantization, packing, evaluation and serving."""

__version__ = "0.1.0"
