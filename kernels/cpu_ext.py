"""quantkit's C++ CPU kernels (kernels/csrc/), built on first use for this machine.

They are compiled with the machine's C++ compiler for its own instruction set (-march=native,
so AVX-512 where the CPU has it) through torch's extension builder, once per build key: later
processes load the cached library in milliseconds, without running the builder or ninja at all.
Every kernel here has a plain-torch fallback in the module that uses it; QUANTKIT_CPU_KERNELS=0
in the environment selects the fallbacks (tests and benchmarks set ENABLED instead, to compare
the two in one process). A failed build warns once, naming the fix.

The key (build_directory()) covers everything that changes the built library: the sources and
headers, the checkout they are compiled from (TORCH_CHECK messages embed the sources' paths),
the torch version, the Python ABI, our flags, the CPU's flags (what -march=native compiles for),
the compiler binary that CXX (default c++) resolves to, and the environment variables g++ reads
include and library paths from. It leaves out what does not: which ninja runs the build, the
spelling of the compiler's name, ccache, CPU affinity (taskset), MAX_JOBS, the cwd.

Those left-out things used to rebuild the kernels: torch's builder runs ninja in the build
directory on every process's first load, and ninja rebuilds each file whose command's hash in its
log differs. A process started from an activated virtualenv ran the pip ninja (1.13) and one
started as .venv/bin/quantkit ran /usr/bin/ninja (1.11), which hash the same command differently,
so each rebuilt the other's build; CXX=g++ against c++ (one binary) did the same through the build
file's `cxx =` line. So a key directory is built once: into a private temporary directory, under a
lock that makes other processes with the same key wait, then renamed into place with a marker
(built.json: the library's file name and what it was built from). A later process that finds the
marker loads that library directly (torch.ops.load_library), running neither builder nor ninja.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SWITCH = "QUANTKIT_CPU_KERNELS"  # "0": plain-torch paths only
# Read once, at import: the check sits on every kernel call, ~150 of them per decode step, and
# reading the environment costs ~0.6 us each time.
ENABLED = os.environ.get(SWITCH, "1") != "0"
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # they compute in fp32: no float64
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
NAME = "quantkit_cpu_kernels"
MARKER = "built.json"  # written into a build before it is renamed into place: its presence means complete
# Read by g++ (and clang) from the environment: they change what compiles and links.
COMPILER_ENV = ("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH", "LIBRARY_PATH", "GCC_EXEC_PREFIX", "COMPILER_PATH")


@functools.cache
def _cpu_identity() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _compiler_identity() -> str:
    """The compiler binary torch's builder will run (CXX, default c++), by its resolved path, size
    and mtime: `c++`, `g++` and a full path to one binary share a build, and an upgraded or
    different compiler gets its own. A stat, not `c++ --version`: this runs on every startup."""
    cxx = os.environ.get("CXX", "c++")
    found = shutil.which(cxx)
    if found is None:
        return cxx  # no such compiler: the build will fail and say so
    real = os.path.realpath(found)
    st = os.stat(real)
    return f"{real} {st.st_size} {st.st_mtime_ns}"


def build_inputs() -> dict[str, str]:
    """What a build's library depends on; the key is their digest and the marker records them."""
    sources = hashlib.sha256()
    for f in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        sources.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return {
        "sources": sources.hexdigest(),
        "csrc": str(CSRC.resolve()),
        "torch": torch.__version__,
        "python": sysconfig.get_config_var("SOABI") or sys.version,
        "flags": " ".join(_FLAGS),
        "cpu": _cpu_identity(),
        "compiler": _compiler_identity(),
        "compiler_env": " ".join(f"{k}={os.environ[k]}" for k in COMPILER_ENV if k in os.environ),
    }


def _key(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def build_directory(key: str | None = None) -> Path:
    """One directory per build key (see the module docstring). The checkout counts: its sources'
    absolute paths are compiled into the library's error messages."""
    root = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))
    return root / "cpu_kernels" / (key or _key(build_inputs()))[:16]


@functools.cache
def _load() -> bool:
    inputs = build_inputs()
    key = _key(inputs)
    directory = build_directory(key)
    try:
        if not _load_built(directory, key):
            with _build_lock(directory):
                if not _load_built(directory, key):  # another process may have built it while we waited
                    _build(directory, inputs, key)
    except Exception as e:  # no compiler, no ninja, a compile error, an unwritable cache: fall back, loudly
        warnings.warn(
            f"quantkit's C++ CPU kernels did not build ({build_failure_reason(e)}); using the slower plain-torch paths. A C++ compiler (g++) "
            f"and ninja (pip install ninja) are needed; set {SWITCH}=0 to choose the plain-torch paths without this warning.",
            RuntimeWarning, stacklevel=3,
        )
        return False
    return True


def _load_built(directory: Path, key: str) -> bool:
    """Load the library of a finished build of this key, if there is one. No builder, no ninja:
    running either on another process's build is what used to rebuild it."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    library = directory / str(marker.get("library", ""))
    if marker.get("key") != key or not library.is_file():
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as e:  # damaged: build it again (replacing the directory)
        log.warning("rebuilding quantkit's C++ kernels: %s did not load (%s)", library, e)
        return False
    return True


def _build(directory: Path, inputs: dict[str, str], key: str) -> None:
    """Build into a private temporary directory beside `directory`, then rename it into place:
    readers only ever see a finished build, and a killed build leaves nothing they would use."""
    from torch.utils.cpp_extension import load

    directory.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f"{directory.name}.building-*", f"{directory.name}.trash-*"):
        for old in directory.parent.glob(pattern):
            _remove_stale_lock(old)
    _put_ninja_on_path()
    tmp = Path(tempfile.mkdtemp(prefix=f"{directory.name}.building-", dir=directory.parent))
    try:  # load() also loads the library, from tmp: its mapping outlives the rename below
        library = Path(load(name=NAME, sources=[str(f) for f in sorted(CSRC.glob("*.cpp"))], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                            build_directory=str(tmp), is_python_module=False, verbose=False))
        (tmp / MARKER).write_text(json.dumps({"library": library.name, "key": key, "built_from": inputs}, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache's build from other users
        if directory.exists():  # an unfinished or damaged build: we hold the lock, so nobody uses it
            trash = directory.with_name(f"{directory.name}.trash-{uuid.uuid4().hex}")
            os.rename(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


STALE_LOCK_SECONDS = 600  # a build takes ~15-60 s, a few minutes on a loaded machine


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build per key at a time: a process that finds another's build under way waits for it,
    then loads its library. An flock, which the kernel releases when its holder dies, so a killed
    build never leaves a lock behind; a holder that hangs is waited for STALE_LOCK_SECONDS, then
    built past (safe: each build has its own directory until its rename)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent builds are each still published atomically
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a") as lock:
        deadline = time.monotonic() + STALE_LOCK_SECONDS
        waiting = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("waiting for another process's build of quantkit's C++ kernels in %s", directory)
                    waiting = True
                if time.monotonic() > deadline:
                    warnings.warn(f"building quantkit's C++ kernels beside a build that has held {lock.name} for "
                                  f"{STALE_LOCK_SECONDS / 60:.0f} minutes", RuntimeWarning, stacklevel=4)
                    break
                time.sleep(0.2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_lock(path: Path) -> None:
    """Remove what a build killed midway (a timed-out subprocess, Ctrl-C) left behind, a lock file
    or its private build directory, once no build has touched it for STALE_LOCK_SECONDS: a fresh
    one may belong to a build still running."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"removing {path}, left {age / 60:.0f} minutes ago by an interrupted build of quantkit's C++ kernels", RuntimeWarning, stacklevel=3)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    if dtype not in KERNEL_DTYPES:
        return False
    for t in tensors:  # a plain loop: ~100 calls per decode step, a generator costs twice as much
        if t.dtype != dtype or not t.is_cpu:
            return False
    return available()  # last: CUDA tensors must never build the CPU kernels


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


def w4a8_available() -> bool:
    """True when the W4A8 linear (int4 weights, per-row int8 activations, kernels/w4a8.py) is there:
    AVX-512 BW and VNNI, no BF16 needed."""
    return available() and _w4a8_compiled()


@functools.cache
def _w4a8_compiled() -> bool:
    return bool(torch.ops.quantkit_cpu.w4a8_available())


BF16_CPU_FLAGS = ("avx512bw", "avx512_bf16")
INT8_CPU_FLAGS = (*BF16_CPU_FLAGS, "avx512_vnni")  # the int8 GEMV also multiplies on VNNI
W4A8_CPU_FLAGS = ("avx512bw", "avx512_vnni")  # the W4A8 linear: integer dot products only


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
