"""What every benchmark records with its numbers: the date and the machine, written as JSON."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from quantkit.kernels import cpu_ext
from quantkit.kernels import threads as thread_policy


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown"
    return {
        "cpu": cpu,
        # AVX2 or AVX512: without AVX-512 BF16, bf16 matmuls are emulated (17 GFLOP/s on an AVX2
        # machine here, 883 on an AVX-512 one), so figures from the two kinds are not comparable
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": cpu_ext.cpu_has_bf16_instructions(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def seconds_per_call(fn, budget: float = 0.5) -> float:
    """Mean wall time of fn() over repeated calls for about `budget` seconds, after one warm-up."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def write_results(path: Path, results: dict) -> None:
    """Results with today's date and the machine, as indented JSON at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine(), **results}, indent=2))
    print(f"wrote {path}")


def matmul_peak(seconds: float = 1.0) -> float:
    """bf16 FLOP/s of a large matmul of the default model's widest shape (4096 rows through the fused
    gate/up projection, 576 -> 3072) on all threads: the arithmetic ceiling the floors below use."""
    x = torch.randn(4096, 576).bfloat16()
    w = torch.randn(3072, 576).bfloat16()
    best = 0.0
    for _ in range(3):
        torch.nn.functional.linear(x, w)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.nn.functional.linear(x, w)
            runs += 1
        best = max(best, runs * 2 * x.shape[0] * w.shape[0] * w.shape[1] / (time.perf_counter() - start))
    return best


def model_flops(config, tokens: int, head_rows: int, attention_pairs: int) -> dict[str, float]:
    """Matmul FLOPs for a Llama-family runtime config: the decoder's linears per computed token, the
    output head per row that needs logits, and attention (Q K^T and P V) per causal query-key pair."""
    d, h, kv, hd, inter, layers = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                   config.intermediate_size, config.num_layers)
    linear_params = layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * inter)
    return {
        "linears": 2 * linear_params * tokens,
        "head": 2 * d * config.vocab_size * head_rows,
        "attention": 4 * layers * h * hd * attention_pairs,
    }


def causal_pairs(start: int, length: int) -> int:
    """Query-key pairs of `length` new tokens after `start` cached ones: each sees its past and itself."""
    return length * start + length * (length + 1) // 2


def decode_step_input(runner):
    """Prefill 256 tokens into blocks 0-16 of a runner's cache; returns the decode step at position
    256, which benchmarks run over and over (batch 1, context 256)."""
    from quantkit.runtime.model_runner import StepInput

    table = list(range(17))
    with torch.inference_mode():
        runner.run(StepInput([list(range(100, 356))], [0], [table], [True]))
    return StepInput([[42]], [256], [table], [True])


def linear_weight_bytes(model) -> int:
    """Bytes the decoder's linears read per step (packed int4 or dense)."""
    return sum(m.weight_bytes() for m in model.modules() if hasattr(m, "weight_bytes"))


@contextlib.contextmanager
def decode_threads(setting: str) -> Iterator[None]:
    """"all": steps of any size on every thread; "one": small steps on one, dense bf16 models too;
    "runtime": as the runtime chooses (kernels/threads.py)."""
    old = thread_policy.SINGLE_THREAD_MAX_TOKENS, thread_policy.DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS
    if setting == "all":
        thread_policy.SINGLE_THREAD_MAX_TOKENS = 0
    elif setting == "one":
        thread_policy.DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS = False
    try:
        yield
    finally:
        thread_policy.SINGLE_THREAD_MAX_TOKENS, thread_policy.DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS = old


# Each timed call reads a different copy of the weight, cycling through at least this many bytes:
# more than the 32 MB L3 cache, as a real model's 30 layers are. Timing one copy over and over
# would measure cache bandwidth, not memory bandwidth.
COLD_BYTES = 96 * 1024**2


def cold_copies(tensors_bytes: int) -> int:
    """Copies of a weight of this size that together exceed COLD_BYTES: a rotation through them reads memory."""
    return max(1, -(-COLD_BYTES // tensors_bytes))


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """A call that runs the next of fns each time (each on its own copy of the weight)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call
