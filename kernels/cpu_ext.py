"""quantkit's C++ CPU kernels (kernels/csrc/), built on first use for this machine.

They are compiled with the machine's C++ compiler for its own instruction set (-march=native,
so AVX-512 where the CPU has it) through torch's extension builder, once per source version,
torch version and CPU: later processes load the cached library in milliseconds. Every kernel
here has a plain-torch fallback in the module that uses it; QUANTKIT_CPU_KERNELS=0 in the
environment selects the fallbacks (tests and benchmarks set ENABLED instead, to compare the two
in one process). A failed build warns once, naming the fix.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SWITCH = "QUANTKIT_CPU_KERNELS"  # "0": plain-torch paths only
# Read once, at import: the check sits on every kernel call, ~150 of them per decode step, and
# reading the environment costs ~0.6 us each time.
ENABLED = os.environ.get(SWITCH, "1") != "0"
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # they compute in fp32: no float64
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


@functools.cache
def _cpu_identity() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def build_directory() -> Path:
    """One directory per source version, checkout, torch version and CPU. The checkout counts:
    torch's builder writes the sources' absolute paths into its build file, so two checkouts of
    the same sources sharing a directory would each see the other's build as stale and rebuild."""
    sources = [f.read_text() for f in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h"))]
    key = hashlib.sha256("\n".join([*sources, str(CSRC.resolve()), torch.__version__, " ".join(_FLAGS), _cpu_identity()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))
    return root / "cpu_kernels" / key


@functools.cache
def _load() -> bool:
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory / "lock")
    _put_ninja_on_path()
    try:
        load(name="quantkit_cpu_kernels", sources=[str(f) for f in sorted(CSRC.glob("*.cpp"))], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: fall back, loudly
        warnings.warn(
            f"quantkit's C++ CPU kernels did not build ({build_failure_reason(e)}); using the slower plain-torch paths. A C++ compiler (g++) "
            f"and ninja (pip install ninja) are needed; set {SWITCH}=0 to choose the plain-torch paths without this warning.",
            RuntimeWarning, stacklevel=3,
        )
        return False
    return True


STALE_LOCK_SECONDS = 600  # a build takes ~15-60 s; a lock this old was left by a killed build


def _remove_stale_lock(lock: Path) -> None:
    """torch's builder waits for as long as its lock file exists, and a build killed midway (a
    timed-out subprocess, Ctrl-C) leaves it behind: every later process would hang. Remove one
    that no build has touched for STALE_LOCK_SECONDS."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"removing {lock}, left {age / 60:.0f} minutes ago by an interrupted build of quantkit's C++ kernels", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


def build_failure_reason(error: BaseException) -> str:
    """The line of a failed build worth showing: the compiler's first error, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return next((line for line in lines if ": error" in line or ": fatal error" in line), lines[-1])


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the PyPI package's binary is not there when quantkit
    is run from a virtualenv that was not activated."""
    try:
        import ninja
    except ImportError:
        return
    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """True when the C++ kernels are enabled and loaded (building them if needed)."""
    return ENABLED and _load()


def handles(*tensors: torch.Tensor) -> bool:
    """True when the kernels are available and take these tensors: all on the CPU, in one kernel dtype."""
    dtype = tensors[0].dtype
    if dtype not in KERNEL_DTYPES or not available():
        return False
    for t in tensors:  # a plain loop: ~100 calls per decode step, a generator costs twice as much
        if t.dtype != dtype or not t.is_cpu:
            return False
    return True


def ops():
    """torch.ops.quantkit_cpu when available, else None."""
    return torch.ops.quantkit_cpu if available() else None


def bf16_available() -> bool:
    """True when the kernels that need AVX-512 BF16 are there: int4 GEMM, bf16 GEMV, bf16 prefill attention."""
    return available() and _bf16_compiled()


@functools.cache
def _bf16_compiled() -> bool:
    return bool(torch.ops.quantkit_cpu.bf16_available())


def int8_available() -> bool:
    """True when the int8 GEMV (the int8 output head) is there: the bf16 kernels' instructions plus AVX-512 VNNI."""
    return available() and _int8_compiled()


@functools.cache
def _int8_compiled() -> bool:
    return bool(torch.ops.quantkit_cpu.int8_available())


BF16_CPU_FLAGS = ("avx512bw", "avx512_bf16")
INT8_CPU_FLAGS = (*BF16_CPU_FLAGS, "avx512_vnni")  # the int8 GEMV also multiplies on VNNI


def cpu_has_bf16_instructions() -> bool:
    """True when this CPU has the instructions the bf16 kernels are written in (AVX-512 BW and
    BF16). On other CPUs (AVX2 only, say) those kernels are not compiled and the runtime runs
    PyTorch's ops instead; where the CPU has them, a build that lacks them is a failure."""
    return _cpu_has(BF16_CPU_FLAGS)


def cpu_has_int8_instructions() -> bool:
    """True when this CPU has what the int8 GEMV (the int8 output head) is written in."""
    return _cpu_has(INT8_CPU_FLAGS)


def _cpu_has(flags: tuple[str, ...]) -> bool:
    return set(flags) <= set(_cpu_identity().replace(":", " ").split())


# oneDNN ISA levels below AVX512_CORE_BF16: capped at one of these (ONEDNN_MAX_CPU_ISA), oneDNN
# emulates bf16 matmuls even on a CPU that has the instructions.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.cache
def bf16_matmuls_are_native() -> bool:
    """True when PyTorch's own bf16 matmuls (oneDNN) run on bf16 instructions here. Elsewhere they
    are emulated, and a compute-bound dense bf16 matmul is several times slower than fp32 (8.6x at
    256 rows on an AVX2 CPU, benchmarks/dtype_paths.py), so such calls compute in fp32 instead.
    Emulated: a CPU without AVX-512 BF16 (any non-x86 CPU counts as one: fp32 is the safe side),
    or oneDNN capped below it by ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA. ATEN_CPU_CAPABILITY does not
    decide it: it picks PyTorch's own vector kernels, not oneDNN's."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return cpu_has_bf16_instructions() and cap not in ONEDNN_ISAS_WITHOUT_BF16


@functools.cache
def op(name: str):
    """One kernel's OpOverload, looked up once, for hot paths that have already chosen the kernel
    (the attribute walk through torch.ops costs ~1 us a call, a third of a small int4 matmul)."""
    if not _load():
        raise RuntimeError("quantkit's C++ CPU kernels are not available on this machine (see the build warning)")
    return getattr(torch.ops.quantkit_cpu, name).default
