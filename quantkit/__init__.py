"""quantkit: AWQ int4 quantization, packing, evaluation and serving.

The Python API, loaded on first use so that `import quantkit` (and the command line) stays
cheap, without torch:

    quantkit.quantize(model, out, recipe=None, *, force=False, resume=False, progress=True, device="auto", **overrides) -> Path
    quantkit.evaluate(artifact, tasks=..., *, baseline=None, limit=None, dtype="bfloat16", gate=False, output=None, device="auto") -> dict
    quantkit.LLM(path, device="auto").generate(prompts, quantkit.SamplingParams(...))
"""

import importlib as _importlib

__version__ = "0.1.0"

# name -> (module, attribute); attribute None: the module itself (quantkit.evaluate is callable).
_LAZY = {
    "quantize": ("quantkit.pipeline", "run_quantize"),
    "evaluate": ("quantkit.evaluate", None),
    "LLM": ("quantkit.runtime.engine", "LLM"),
    "SamplingParams": ("quantkit.runtime.sampling", "SamplingParams"),
}
__all__ = ["LLM", "SamplingParams", "__version__", "evaluate", "quantize"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = _importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
