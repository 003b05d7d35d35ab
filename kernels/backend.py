"""Which kernels run: decided once, from the device and the machine, by `select_backend`.

The model runner builds one KernelBackend and hands it down: the linears (at construction), the
attention metadata (each step; the attention functions read `meta.backend`), the KV cache's
layout and the fused decoder read it, and nothing else in the runtime asks what the machine can
do. The CPU instruction probes themselves live in cpu_ext (the C++ build is keyed on them); this
module is their only reader outside kernels' hot paths.

`select_backend("cpu", triton=True)` runs the Triton kernels on CPU tensors: only meaningful
under TRITON_INTERPRET=1 (tests/test_triton_engine.py, the wiring proof without a GPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

from . import cpu_ext

DEVICES = ("auto", "cpu", "cuda")
ACTIVATIONS = ("bf16", "int8")  # what the int4 linears multiply their weights with in batched steps (--activations)
# From this many rows on, --activations int8 runs the W4A8 kernel (kernels/w4a8.py). Fewer rows
# are bound by reading the weight: there the int4 kernels are about as fast (at 1-4 rows on two
# threads, PyTorch's fused int4 op even wins; benchmarks/w4a8_speed.py) and exact in the
# activations, so small decode batches keep them.
W4A8_FROM_ROWS = 16
TRITON_GEMM_DTYPES = (torch.float16, torch.bfloat16)  # what kernels/triton_gemm.py computes in (its _check_inputs)
# From this many rows on, the Triton backend's int4 linears dequantize (a Triton kernel) and call
# cuBLAS, which reuses each weight tile across many rows better than the W4A16 GEMM. vLLM's AWQ
# path switches at 256 tokens; benchmarks/gpu_check.py measures the crossover on the GPU at hand.
TRITON_DENSE_FROM_ROWS = 256


@dataclass(frozen=True)
class KernelBackend:
    device: str  # "cpu" | "cuda": where weights, KV cache and step inputs live
    linear: str  # int4 linears: "cpu" (cpu_int4: C++ kernel, PyTorch's int4 op, dequantize+matmul) | "triton" (W4A16 GEMM)
    attention: str  # "cpu" (C++ kernels or SDPA over the head-major cache) | "triton" (paged kernels, block-major cache)
    cpu_kernels: bool  # build/load quantkit's C++ CPU kernels (norms, RoPE, int4, attention, int8 head, fused decode)
    int8_head: bool  # the int8 output head's kernel exists here (C++, AVX-512 BF16 + VNNI)
    int4_dense_from_rows: int | None = None  # Triton int4 linears: dequantize + dense matmul from this many rows (None: never)
    activations: str = "bf16"  # "int8": CPU int4 linears quantize activations per row and run W4A8 from w4a8_from_rows rows
    w4a8_from_rows: int = W4A8_FROM_ROWS

    def int4_linear(self, dtype: torch.dtype) -> str:
        """How an int4 linear computes in `dtype`: "cpu" (cpu_int4), "triton" (the W4A16 GEMM), or
        "torch" (a Triton backend in a dtype the GEMM lacks, fp32: dequantized once, dense matmuls)."""
        if self.linear == "cpu":
            return "cpu"
        return "triton" if dtype in TRITON_GEMM_DTYPES else "torch"

    @property
    def triton_attention(self) -> bool:
        return self.attention == "triton"

    @property
    def kv_layout(self) -> str:
        """"block": [num_blocks, block_size, Hkv, D] (the Triton kernels, kernels/reference.py);
        "head": [Hkv, num_blocks * block_size, D] (the CPU kernels: a gather is already a matmul operand)."""
        return "block" if self.triton_attention else "head"

    @property
    def fused_decoder(self) -> bool:
        """Decode steps in one C++ call (kernels/decoder.py): CPU kernels and their cache layout only."""
        return self.cpu_kernels and self.attention == "cpu" and self.linear == "cpu"


def resolve_device(device: str) -> str:
    """"auto" is cuda where torch sees a GPU, else cpu; "cuda" without one is refused."""
    if device not in DEVICES:
        raise QuantkitError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu")
    return device


def resolve_activations(device: str, activations: str, triton: bool = False) -> tuple[str, str | None]:
    """The activations the int4 linears will run with on `device` (resolved), and why an int8
    request is refused (None if it is not): reports record the first, the runner warns the second."""
    if activations not in ACTIVATIONS:
        raise QuantkitError(f"--activations {activations}: choose one of {', '.join(ACTIVATIONS)}")
    if activations == "bf16":
        return activations, None
    if device == "cuda" or triton:
        return "bf16", "--activations int8 is a CPU path (W4A8 on AVX-512 VNNI); the Triton backend runs bf16 activations"
    if not cpu_ext.w4a8_available():
        return "bf16", ("--activations int8 needs quantkit's C++ kernels (built, not switched off) on a CPU with AVX-512 BW and VNNI; "
                        "running bf16 activations")
    return activations, None


def select_backend(device: str = "auto", triton: bool = False, activations: str = "bf16") -> KernelBackend:
    """The kernels for `device` on this machine. triton=True: the Triton kernels even on CPU tensors (tests, under TRITON_INTERPRET=1).

    activations="int8" is a serving choice (W4A8 on VNNI); where its kernel cannot run (CUDA, a
    CPU without AVX-512 BW and VNNI, no C++ kernels) the backend says "bf16" and a warning says why.
    """
    device = resolve_device(device)
    activations, refused = resolve_activations(device, activations, triton)
    if refused:
        warnings.warn(refused, RuntimeWarning, stacklevel=2)
    if device == "cuda" or triton:
        return KernelBackend(device, linear="triton", attention="triton", cpu_kernels=False, int8_head=False,
                             int4_dense_from_rows=TRITON_DENSE_FROM_ROWS)
    cpu_kernels = cpu_ext.available()  # builds or loads them now, not inside the first request
    return KernelBackend(device, linear="cpu", attention="cpu", cpu_kernels=cpu_kernels, int8_head=cpu_kernels and cpu_ext.int8_available(),
                         activations=activations)


CPU = KernelBackend("cpu", linear="cpu", attention="cpu", cpu_kernels=cpu_ext.ENABLED, int8_head=False)
"""The default of code that builds layers or metadata without a runner (tests, tools): today's CPU choice.
cpu_kernels follows the switch without building the kernels at import; the hot paths check availability themselves."""
