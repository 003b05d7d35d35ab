"""Batch-1 decode on one thread vs two, int4 vs bf16, with and without another busy process.

The runtime decodes int4 models on one thread and dense bf16 models on every thread, under
OMP_WAIT_POLICY=PASSIVE (kernels/threads.py). This script is the evidence: the default model's
decode step (the layers in one C++ call, int8 head) at each thread count, interleaved step by
step; `--busy` starts a process that keeps one core busy for the duration, as another tenant or
a tokenizer would. The OpenMP wait policy is whatever the environment says when torch loads, so
compare policies by running the script under each:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_policy.py [--busy]
    env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=20000 python benchmarks/thread_policy.py [--busy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import decode_step_input, decode_threads, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path.home() / ".cache" / "quantkit" / "bench" / "smollm2-rtn-g64",
                        help="int4 artifact of the default model (benchmarks/kernel_speed.py makes it)")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: results/thread_policy_<policy>[_busy].json)")
    args = parser.parse_args()

    from quantkit.runtime.model_runner import ModelRunner
    from quantkit.runtime.weights import load_weights

    steps = {}
    for fmt, spec in (("int4", str(args.artifact)), ("bf16", "smollm2-135m")):
        runner = ModelRunner(load_weights(spec), torch.bfloat16, block_size=16, num_blocks=32, int8_head=True)
        steps[fmt] = (runner, decode_step_input(runner))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    times: dict[str, list[float]] = {}
    try:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for fmt, (runner, step) in steps.items():
                    for n in (1, 2):
                        with decode_threads("one" if n == 1 else "all"):
                            t0 = time.perf_counter()
                            runner.run(step)
                            times.setdefault(f"{fmt}_{n}_thread", []).append(time.perf_counter() - t0)
    finally:
        if busy is not None:
            busy.kill()
    policy = os.environ.get("OMP_WAIT_POLICY") or f"unset, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'default')}"
    print(f"decode step, batch 1, context 256, OMP_WAIT_POLICY {policy}{', one busy process beside' if args.busy else ''}:")
    summary = {}
    for name, t in times.items():
        t.sort()
        summary[name] = {"median_s": statistics.median(t), "p90_s": t[int(0.9 * len(t))], "max_s": t[-1]}
        print(f"  {name:14} median {summary[name]['median_s'] * 1e3:7.2f} ms  p90 {summary[name]['p90_s'] * 1e3:7.2f} ms"
              f"  max {summary[name]['max_s'] * 1e3:7.2f} ms")
    tag = (os.environ.get("OMP_WAIT_POLICY") or "spin").lower() + ("_busy" if args.busy else "")
    out = args.out or Path(__file__).parent / "results" / f"thread_policy_{tag}.json"
    write_results(out, {"omp_wait_policy": policy, "busy_process": args.busy, "rounds": args.rounds, "step": summary})


if __name__ == "__main__":
    main()
