"""How many CPU threads a step uses: one for small steps, all for big ones.

Measured on this machine (benchmarks/kernel_speed.py, BENCHMARKS.md): with OMP_WAIT_POLICY=PASSIVE,
waking the second thread costs ~30 us per parallel op, which is more than the op itself at
batch-1 decode (~1,000 small ops per step). With spinning waits the wake-up is free, but then any
other busy process stalls every op (a decode step's mean went from 14 ms to 49 ms, worst 182 ms).
So the runtime keeps PASSIVE waits and runs small steps on one thread; big matmuls (large
batches, prefill, the lm_head) use them all. Switching costs well under a microsecond.

Dense bf16 models are the exception: their GEMVs read 4x the bytes of int4 ones per call, long
enough to repay the wake-up, so their small steps use every thread too (batch-1 decode, the
layers in one C++ call, interleaved, benchmarks/results/kernels.log and decode_shapes.log:
SmolLM2-135M 17.8 against 19.7 ms, Qwen3-0.6B's shapes 52 against 75 ms; int4 models lose on two
threads: 10.3 against 6.1 ms, 28 against 27 ms). Beside another busy process bf16 loses 8% by it
(22.2 against 20.5 ms, benchmarks/thread_policy.py): a dedicated machine is the case served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Steps with at most this many tokens run on one thread. Measured (PASSIVE, one block's four fused
# int4 linears): 1 thread 168 / 325 / 643 us at M = 4 / 8 / 16, 2 threads 311 / 358 / 533 us.
SINGLE_THREAD_MAX_TOKENS = 8


@contextlib.contextmanager
def cpu_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads != previous:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if num_threads != previous:
            torch.set_num_threads(previous)


# Whether small steps of dense bf16 models use every thread (see above); benchmarks switch it off
# to time them on one.
DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS = True


def threads_for_tokens(num_tokens: int, max_threads: int, dense_bf16: bool = False) -> int:
    """Threads for a step of num_tokens tokens; dense_bf16: the model's linears are dense bf16 weights."""
    if num_tokens > SINGLE_THREAD_MAX_TOKENS or (dense_bf16 and DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS):
        return max_threads
    return 1
