"""W4A8 (kernels/w4a8.py) against today's CPU paths for batched steps, where bf16 matmuls are emulated.

Per layer shape (SmolLM2-135M, g64: 576 -> 1728 fused-qkv-sized, 576 -> 3072 gate/up, 1536 -> 576
down; one Llama-sized 4096 -> 4096, g128), per row count M, for fp32 and bf16 activations, on 1 and 2
threads: microseconds per call and GOP/s (2 M K N / time) of
  w4a8         the W4A8 kernel, quantizing the activations included
  deq_fp32     dequantize the int4 weight to fp32 (kernels/cpu_int4.dequantize_cpu_int4) and an fp32
               matmul of x.float(), rounded to x's dtype: quantkit's path for fp32 x, and for bf16 x
               from EMULATED_BF16_FP32_FROM_ROWS rows, on a CPU without AVX-512 BF16
  fused_int4   torch's _weight_int4pack_mm_for_cpu (bf16 x only): quantkit's bf16 path below that
  fp32_cached  an fp32 matmul on a weight dequantized once: no path quantkit has (8x the int4 weight's
               memory), the bound of what dequantizing per call could reach
  today        what kernels/cpu_int4.int4_matmul runs on this machine at that M and dtype (one of the above)
and each one's time over w4a8's (> 1: W4A8 is faster). The methods alternate round by round and each
keeps its median round; every call reads a weight copy not in cache (common.COLD_BYTES, as
benchmarks/kernel_speed.py does), so small M sees memory, not cache, bandwidth. The 1-minute load
average before and after each shape is recorded: on a shared machine, ratios (interleaved) hold up
better than absolute times and the 1- against 2-thread comparison.

    python benchmarks/w4a8_speed.py            # writes benchmarks/results/w4a8_speed.json
    python benchmarks/w4a8_speed.py --quick    # fewer rounds, shorter calls
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import COLD_BYTES, cold_copies, rotating, write_results  # noqa: E402
from quantkit.kernels import cpu_ext, cpu_int4, w4a8  # noqa: E402
from quantkit.pack import pack_int4  # noqa: E402

# (name, in_features, out_features, group size)
SHAPES = [
    ("smollm2 qkv-sized", 576, 1728, 64),
    ("smollm2 gate_up", 576, 3072, 64),
    ("smollm2 down", 1536, 576, 64),
    ("llama 4096x4096", 4096, 4096, 128),
]
ROWS = [1, 4, 16, 64, 256]
THREADS = [1, 2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["w4a8", "deq_fp32", "fused_int4", "fp32_cached"]
def seconds_per_call(fn: Callable[[], object], budget: float, min_calls: int = 2) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < budget:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def random_awq(k: int, n: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
    return pack_int4(codes), pack_int4(zeros), scales


def today_method(dtype: torch.dtype, rows: int) -> str:
    """Which of METHODS kernels/cpu_int4.int4_matmul takes here (a CPU without AVX-512 BF16)."""
    if cpu_ext.bf16_available():
        return "native_int4 (not measured: this CPU has AVX-512 BF16)"
    if dtype == torch.bfloat16 and not cpu_ext.bf16_matmuls_are_native() and rows >= cpu_int4.EMULATED_BF16_FP32_FROM_ROWS:
        return "deq_fp32"
    if dtype == torch.bfloat16 and (cpu_int4.DENSE_FROM_ROWS is None or rows < cpu_int4.DENSE_FROM_ROWS):
        return "fused_int4"
    return "deq_fp32"


def measure_shape(name: str, k: int, n: int, g: int, rounds: int, budget: float) -> list[dict]:
    qweight, qzeros, scales = random_awq(k, n, g, seed=k * n)
    w4 = w4a8.prepare_w4a8(qweight, qzeros, scales)
    tw = cpu_int4.prepare_torch_int4(qweight, qzeros, scales)
    int4_bytes = k * n // 2 + (k // g) * n * 3
    w4s = [w4] + [w4a8.W4A8Weight(w4.codes.clone(), w4.scales.clone(), w4.zeros.clone(), g, k, n) for _ in range(cold_copies(w4.nbytes()) - 1)]
    tws = [tw] + [cpu_int4.CpuInt4Weight(*(t.clone() for t in (tw.packed, tw.scales_and_zeros, tw.qweight, tw.zeros, tw.scales)), g)
                  for _ in range(cold_copies(int4_bytes) - 1)]
    w32 = cpu_int4.dequantize_cpu_int4(tw, torch.float32).t().contiguous()  # W.T [K, N]
    w32s = [w32] + [w32.clone() for _ in range(cold_copies(4 * k * n) - 1)]
    out = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for dname, dtype in DTYPES.items():
            for m in ROWS:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
                fns = {
                    "w4a8": rotating([lambda w=w, x=x: w4a8.w4a8_linear(x, w) for w in w4s]),
                    "deq_fp32": rotating([lambda w=w, x=x, dt=dtype: torch.matmul(x.float(), cpu_int4.dequantize_cpu_int4(w, torch.float32).t()).to(dt)
                                          for w in tws]),
                    "fp32_cached": rotating([lambda w=w, x=x, dt=dtype: torch.matmul(x.float(), w).to(dt) for w in w32s]),
                }
                if dtype == torch.bfloat16:
                    fns["fused_int4"] = rotating([lambda w=w, x=x: cpu_int4.int4_matmul_fused(x, w) for w in tws])
                times: dict[str, list[float]] = {method: [] for method in fns}
                for _ in range(rounds):  # alternate, so every method sees the same machine
                    for method, fn in fns.items():
                        times[method].append(seconds_per_call(fn, budget))
                us = {method: 1e6 * statistics.median(t) for method, t in times.items()}
                today = today_method(dtype, m)
                row = {
                    "shape": name, "in_features": k, "out_features": n, "group_size": g, "rows": m, "dtype": dname, "threads": threads,
                    "us": us, "gops": {method: 2 * m * k * n / t / 1e3 for method, t in us.items()},
                    "ratio_over_w4a8": {method: t / us["w4a8"] for method, t in us.items() if method != "w4a8"},
                    "today": today,
                }
                if today in us:
                    row["ratio_over_w4a8"]["today"] = us[today] / us["w4a8"]
                out.append(row)
                ratios = "  ".join(f"{meth} {row['ratio_over_w4a8'][meth]:6.2f}x" for meth in METHODS[1:] if meth in us)
                print(f"{name:18} {k:5}x{n:<5} g{g:<3} {dname} {threads}t M={m:<4} w4a8 {us['w4a8']:9.1f} us {row['gops']['w4a8']:6.1f} GOP/s | "
                      f"deq_fp32 {us['deq_fp32']:9.1f} us | {ratios} | today ({today}) {row['ratio_over_w4a8'].get('today', float('nan')):.2f}x",
                      flush=True)
    return out


def crossovers(rows: list[dict]) -> list[dict]:
    """Per shape, dtype and thread count: the smallest measured M from which W4A8 beats each other
    method at that M and every larger one measured (None: it never does)."""
    found = []
    keys = sorted({(r["shape"], r["dtype"], r["threads"]) for r in rows}, key=str)
    for shape, dtype, threads in keys:
        sel = sorted((r for r in rows if (r["shape"], r["dtype"], r["threads"]) == (shape, dtype, threads)), key=lambda r: r["rows"])
        entry = {"shape": shape, "dtype": dtype, "threads": threads}
        for method in [*METHODS[1:], "today"]:
            if method not in sel[0]["ratio_over_w4a8"]:
                continue
            wins_from = None
            for r in reversed(sel):
                if r["ratio_over_w4a8"][method] > 1:
                    wins_from = r["rows"]
                else:
                    break
            entry[f"w4a8_faster_than_{method}_from_rows"] = wins_from
        found.append(entry)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.05 s calls instead of 5 of 0.15 s")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "w4a8_speed.json")
    args = parser.parse_args()
    if not w4a8.w4a8_available():
        raise SystemExit("the W4A8 kernel is not available on this machine (it needs AVX-512 BW and VNNI, and quantkit's C++ kernels)")
    rounds, budget = (3, 0.05) if args.quick else (5, 0.15)
    threads_before = torch.get_num_threads()
    rows, load = [], {}
    for name, k, n, g in SHAPES:
        before = os.getloadavg()[0]
        rows += measure_shape(name, k, n, g, rounds, budget)
        load[name] = {"before": before, "after": os.getloadavg()[0]}  # 1-minute load averages: ~1 is this script alone
        print(f"  load average {before:.2f} before, {load[name]['after']:.2f} after", flush=True)
    torch.set_num_threads(threads_before)
    cross = crossovers(rows)
    print("\nW4A8 faster than each path from this many rows on (of", ROWS, "; None: at none):")
    for c in cross:
        print("  " + ", ".join(f"{key}={value}" for key, value in c.items()))
    write_results(args.out, {
        "methods": {
            "w4a8": "kernels/w4a8.w4a8_linear: int4 weights x per-row int8 activations on AVX-512 VNNI",
            "deq_fp32": "dequantize_cpu_int4 to fp32 per call + torch.matmul(x.float(), W.T), rounded to x's dtype",
            "fused_int4": "torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 x only)",
            "fp32_cached": "torch.matmul(x.float(), W.T) on a weight dequantized once (not a quantkit path: 8x the memory)",
            "today": "what kernels/cpu_int4.int4_matmul runs on this machine at that M and dtype",
        },
        "bf16_matmuls_native": cpu_ext.bf16_matmuls_are_native(),
        "rounds": rounds, "seconds_per_measurement": budget, "cold_bytes": COLD_BYTES,
        "load_average": load, "results": rows, "crossovers": cross,
    })


if __name__ == "__main__":
    main()
