"""The checkout's kernels/ is quantkit.kernels, never Hugging Face's `kernels`, even when run from the checkout's root."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import quantkit.kernels

CHECKOUT = Path(__file__).resolve().parents[1]


def python_in_checkout(code: str, *flags: str) -> subprocess.CompletedProcess:
    """`python -c code` with the checkout's root as working directory, so it is on sys.path."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)


def test_quantkit_kernels_is_the_checkouts_kernels_directory():
    assert Path(quantkit.kernels.__file__).resolve().parent == CHECKOUT / "kernels"


def test_from_the_checkouts_root_kernels_is_hugging_faces_and_transformers_imports():
    run = python_in_checkout(
        "import kernels, transformers; from transformers import LlamaConfig; "
        "import quantkit.kernels; print(kernels.__file__); print(quantkit.kernels.__file__); print(hasattr(kernels, 'CUDAProperties'))")
    assert run.returncode == 0, run.stderr
    hf_kernels, ours, has_hf_api = run.stdout.split()
    # (CI's virtualenv lives inside the checkout, so compare with the kernels directory itself.)
    assert Path(hf_kernels).parent != CHECKOUT / "kernels" and has_hf_api == "True"
    assert Path(ours) == CHECKOUT / "kernels" / "__init__.py"


def test_without_hugging_faces_kernels_the_error_names_the_directory_and_the_fix():
    # -S: no site-packages, so only the checkout's directory answers to `kernels`.
    run = python_in_checkout("import kernels", "-S")
    assert run.returncode != 0
    assert "quantkit's source directory" in run.stderr and "pip install kernels" in run.stderr


def test_no_benchmark_script_shadows_an_installed_module():
    # `python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like a package
    # (benchmarks/kernels.py once was) would be imported in its place, by transformers for one.
    outside = [p for p in sys.path if Path(p or ".").resolve() not in (CHECKOUT, CHECKOUT / "benchmarks")]
    for script in sorted((CHECKOUT / "benchmarks").glob("*.py")):
        found = importlib.machinery.PathFinder.find_spec(script.stem, outside)
        assert found is None, f"benchmarks/{script.name} shadows {found.origin}: rename the script"
