"""quantkit.kernels: int4 matmuls and paged attention (Triton for GPUs, C++ and torch on CPUs)."""

# This directory is installed as quantkit.kernels. Run from a checkout's root (`python -m pytest`,
# `python -c ...`), Python also finds it as a top-level `kernels`, because the working directory
# is on sys.path, and it would shadow Hugging Face's `kernels`, which transformers imports at
# start-up. Imported under that name, it hands the import to the real package.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            f"'import kernels' found quantkit's source directory {_checkout}/kernels (installed as quantkit.kernels), "
            "and Hugging Face's kernels package is not installed; install it (pip install kernels) or run from another directory")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_module)
