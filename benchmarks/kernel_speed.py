"""Kernel receipts on this machine: int4 vs bf16 vs fp32 matmul, memory bandwidth, CPU attention.

Prints tables and writes JSON (benchmarks/results/kernels.json):
  1. the machine's memory read bandwidth (a large fp32 reduction), the roof for memory-bound decode;
  2. per layer shape of the default model (SmolLM2-135M) and M in 1, 4, 16, 64, 256: time of
     quantkit's C++ int4 kernel, PyTorch's fused int4 op, dequantize + bf16 matmul, bf16 matmul
     (oneDNN, and quantkit's GEMV up to 4 rows), fp32 matmul, and the weight bandwidth each
     achieves (weight bytes / time), each call reading a weight copy not in cache; plus the
     kernel-vs-dense crossovers that set kernels/cpu_int4.NATIVE_DENSE_FROM_ROWS and DENSE_FROM_ROWS;
  3. the block as the runtime runs it at M = 1: four linears, q/k/v and gate/up fused, int4 vs bf16;
  4. CPU paged attention candidates for decode (quantkit's C++ kernel, the plain-torch grouped
     matmuls, per-sequence SDPA, one padded SDPA, compiled flex_attention) at several batch sizes
     and context lengths, and for prefill (quantkit's C++ bf16 kernel vs the SDPA plan);
  5. a whole-model decode step at batch 1, int4 vs bf16, through the runtime's model, with
     quantkit's C++ kernels (layers in one C++ call, kernels/decoder.py, and module by module)
     and with the plain-torch paths (QUANTKIT_CPU_KERNELS=0).

    python benchmarks/kernel_speed.py            # everything (a few minutes)
    python benchmarks/kernel_speed.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import cold_copies, decode_step_input, decode_threads, linear_weight_bytes, rotating, write_results  # noqa: E402
from quantkit.kernels import cpu_ext, cpu_int4  # noqa: E402
from quantkit.kernels.attention import AttentionMetadata, cpu_layout, paged_attention  # noqa: E402
from quantkit.kernels.linear import GEMV_MAX_ROWS, dense_linear  # noqa: E402
from quantkit.kernels.threads import cpu_threads, threads_for_tokens  # noqa: E402
from quantkit.pack import pack_int4  # noqa: E402

# (name, in_features, out_features) of one SmolLM2-135M decoder block.
LAYER_SHAPES = [
    ("q_proj", 576, 576),
    ("k_proj", 576, 192),
    ("v_proj", 576, 192),
    ("o_proj", 576, 576),
    ("gate_proj", 576, 1536),
    ("up_proj", 576, 1536),
    ("down_proj", 1536, 576),
]
# The same block as the runtime's model runs it: q/k/v and gate/up fused into one linear each.
FUSED_LAYER_SHAPES = [("qkv_proj", 576, 960), ("o_proj", 576, 576), ("gate_up_proj", 576, 3072), ("down_proj", 1536, 576)]
ROWS = [1, 4, 16, 64, 256]
CROSSOVER_ROWS = [1, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
GROUP_SIZE = 64
MAX_THREADS = torch.get_num_threads()


def timeit(fn: Callable[[], object], min_seconds: float = 0.3, min_runs: int = 5) -> float:
    """Median seconds per call after a warm-up, repeating until min_seconds have passed."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(min_seconds: float, threads: int) -> float:
    """Read bandwidth in bytes/s: summing a 1 GiB fp32 tensor reads every byte once."""
    x = torch.rand(256 * 1024 * 1024)
    with cpu_threads(threads):
        seconds = timeit(lambda: x.sum(), min_seconds)
    return x.numel() * x.element_size() / seconds


def random_awq(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // GROUP_SIZE, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(k // GROUP_SIZE, n, generator=g) * 0.02 + 0.001).to(torch.float16)
    return pack_int4(codes), pack_int4(zeros), scales


def int4_bytes(k: int, n: int, per_group_bytes: int = 4) -> int:
    """Codes + per-group constants: PyTorch's op reads a bf16 scale and zero (4 bytes), quantkit's
    kernel an fp16 scale and a uint8 zero point (3 bytes)."""
    return k * n // 2 + (k // GROUP_SIZE) * n * per_group_bytes


@contextlib.contextmanager
def plain_torch(fallback: bool) -> Iterator[None]:
    """With fallback: quantkit's C++ kernels switched off (as QUANTKIT_CPU_KERNELS=0), i.e. the plain-torch paths."""
    old = cpu_ext.ENABLED
    cpu_ext.ENABLED = old and not fallback
    try:
        yield
    finally:
        cpu_ext.ENABLED = old


def _clone_weight(weight):
    return dataclasses.replace(weight, **{f.name: getattr(weight, f.name).clone() for f in dataclasses.fields(weight)
                                          if isinstance(getattr(weight, f.name), torch.Tensor)})


def matmul_table(min_seconds: float) -> list[dict]:
    """Each M timed with the thread count the runtime uses for a step of M tokens (kernels/threads.py)."""
    rows = []
    for name, k, n in LAYER_SHAPES:
        awq = random_awq(k, n, seed=k + n)
        torch_int4 = cpu_int4.prepare_torch_int4(*awq)
        native = cpu_int4.prepare_native_int4(*awq)
        natives = [native] + [_clone_weight(native) for _ in range(cold_copies(int4_bytes(k, n, 3)) - 1)]
        torch_int4s = [torch_int4] + [_clone_weight(torch_int4) for _ in range(cold_copies(int4_bytes(k, n)) - 1)]
        w_bf16 = torch.randn(n, k).to(torch.bfloat16)
        bf16s = [w_bf16] + [w_bf16.clone() for _ in range(cold_copies(2 * k * n) - 1)]
        fp32s = [w.float() for w in bf16s[: cold_copies(4 * k * n)]]
        for m in ROWS:
            x = torch.randn(m, k).to(torch.bfloat16)
            x32 = x.float()
            threads = threads_for_tokens(m, MAX_THREADS)
            with cpu_threads(threads):
                t = {
                    "int4_quantkit": timeit(rotating([lambda w=w: cpu_int4.native_int4_linear(x, w) for w in natives]), min_seconds),
                    "int4_fused": timeit(rotating([lambda w=w: cpu_int4.int4_matmul_fused(x, w) for w in torch_int4s]), min_seconds),
                    "int4_dequant_bf16": timeit(lambda: F.linear(x, cpu_int4.dequantize_cpu_int4(torch_int4, torch.bfloat16)), min_seconds),
                    "bf16": timeit(rotating([lambda w=w: F.linear(x, w) for w in bf16s]), min_seconds),
                    "fp32": timeit(rotating([lambda w=w: F.linear(x32, w) for w in fp32s]), min_seconds),
                }
                if m <= GEMV_MAX_ROWS:
                    t["bf16_quantkit_gemv"] = timeit(rotating([lambda w=w: dense_linear(x, w) for w in bf16s]), min_seconds)
            bytes_read = {"int4_quantkit": int4_bytes(k, n, 3), "int4_fused": int4_bytes(k, n), "int4_dequant_bf16": int4_bytes(k, n),
                          "bf16": 2 * k * n, "bf16_quantkit_gemv": 2 * k * n, "fp32": 4 * k * n}
            rows.append({
                "layer": name, "in": k, "out": n, "m": m, "threads": threads,
                "seconds": t,
                "weight_gbps": {key: bytes_read[key] / t[key] / 1e9 for key in t},
                "int4_speedup_vs_bf16": t["bf16"] / t["int4_quantkit"],
                "torch_int4_speedup_vs_bf16": t["bf16"] / t["int4_fused"],
            })
    return rows


def fused_block(min_seconds: float) -> dict:
    """One decode row (M = 1) through the block's four fused linears: int4 kernel vs bf16 matmul and GEMV."""
    threads = threads_for_tokens(1, MAX_THREADS)
    total = {"int4_s": 0.0, "bf16_s": 0.0, "bf16_gemv_s": 0.0, "int4_bytes": 0, "threads": threads, "layers": []}
    for name, k, n in FUSED_LAYER_SHAPES:
        native = cpu_int4.prepare_native_int4(*random_awq(k, n, seed=k + n))
        natives = [native] + [_clone_weight(native) for _ in range(cold_copies(int4_bytes(k, n, 3)) - 1)]
        w_bf16 = torch.randn(n, k).to(torch.bfloat16)
        bf16s = [w_bf16] + [w_bf16.clone() for _ in range(cold_copies(2 * k * n) - 1)]
        x = torch.randn(1, k).to(torch.bfloat16)
        with cpu_threads(threads):
            row = {"layer": name, "in": k, "out": n,
                   "int4_s": timeit(rotating([lambda w=w: cpu_int4.native_int4_linear(x, w) for w in natives]), min_seconds),
                   "bf16_s": timeit(rotating([lambda w=w: F.linear(x, w) for w in bf16s]), min_seconds),
                   "bf16_gemv_s": timeit(rotating([lambda w=w: dense_linear(x, w) for w in bf16s]), min_seconds)}
        total["layers"].append(row)
        for key in ("int4_s", "bf16_s", "bf16_gemv_s"):
            total[key] += row[key]
        total["int4_bytes"] += int4_bytes(k, n, 3)
    return total


def crossover(min_seconds: float) -> list[dict]:
    """Each int4 kernel vs its own dequantize + bf16 matmul, summed over one block's layers, by rows."""
    awqs = [random_awq(k, n, seed=k * n) for _, k, n in LAYER_SHAPES]
    torch_layers = [cpu_int4.prepare_torch_int4(*a) for a in awqs]
    native_layers = [cpu_int4.prepare_native_int4(*a) for a in awqs]
    out = []
    for m in CROSSOVER_ROWS:
        xs = [torch.randn(m, k).to(torch.bfloat16) for _, k, _ in LAYER_SHAPES]
        with cpu_threads(threads_for_tokens(m, MAX_THREADS)):
            fused = timeit(lambda: [cpu_int4.int4_matmul_fused(x, w) for x, w in zip(xs, torch_layers)], min_seconds)
            dense = timeit(lambda: [F.linear(x, cpu_int4.dequantize_cpu_int4(w, torch.bfloat16)) for x, w in zip(xs, torch_layers)], min_seconds)
            native = timeit(lambda: [cpu_int4.native_int4_linear(x, w) for x, w in zip(xs, native_layers)], min_seconds)
            native_dense = timeit(lambda: [x @ cpu_int4.dequantize_native_int4(w, torch.bfloat16) for x, w in zip(xs, native_layers)], min_seconds)
        out.append({"m": m, "fused_s": fused, "dequant_bf16_s": dense, "fused_over_dense": fused / dense,
                    "quantkit_s": native, "quantkit_dequant_bf16_s": native_dense, "quantkit_over_dense": native / native_dense})
    return out


def attention_candidates(min_seconds: float) -> list[dict]:
    """Decode attention for one layer of the default model (9 heads, 3 KV heads, head_dim 64), bf16."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    results = []
    flex = _compiled_flex()
    for batch, ctx in [(1, 512), (16, 256), (64, 256), (64, 512)]:
        blocks = batch * (-(-ctx // block_size))
        k_cache = torch.randn(blocks, block_size, kv_heads, head_dim).to(torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(blocks).view(batch, -1).tolist()
        q = torch.randn(batch, heads, head_dim).to(torch.bfloat16)
        context_lens = [ctx - (i * 7) % 50 for i in range(batch)]
        meta = AttentionMetadata.build(tables, context_lens, [1] * batch, block_size)
        with plain_torch(True):  # the fallback's plan: gather indices and padding mask
            torch_meta = AttentionMetadata.build(tables, context_lens, [1] * batch, block_size)
        scale = head_dim**-0.5
        k_flat, v_flat = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
        k_cpu, v_cpu = cpu_layout(k_cache), cpu_layout(v_cache)  # the runtime's head-major CPU cache

        def per_sequence():
            for row in range(batch):
                slots = torch_meta.decode_slots[row]
                k = k_flat[slots].transpose(0, 1).unsqueeze(0)
                v = v_flat[slots].transpose(0, 1).unsqueeze(0)
                F.scaled_dot_product_attention(q[row].view(1, heads, 1, head_dim), k, v, scale=scale, enable_gqa=True)

        def padded_sdpa():
            k = k_flat[torch_meta.decode_slots].transpose(1, 2)  # [n, Hkv, max_ctx, D]
            v = v_flat[torch_meta.decode_slots].transpose(1, 2)
            mask = torch_meta.decode_mask
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)

        row = {"batch": batch, "context": ctx, "threads": threads_for_tokens(batch, MAX_THREADS)}
        with cpu_threads(row["threads"]):
            row["quantkit_kernel_s"] = timeit(lambda: paged_attention(q, k_cpu, v_cpu, meta, scale), min_seconds)  # the runtime's choice
            row["grouped_matmul_s"] = timeit(lambda: paged_attention(q, k_cpu, v_cpu, torch_meta, scale), min_seconds)  # its fallback
            row["padded_sdpa_s"] = timeit(padded_sdpa, min_seconds)
            row["per_sequence_sdpa_s"] = timeit(per_sequence, min_seconds)
            if flex is not None:
                k = k_flat[torch_meta.decode_slots].transpose(1, 2)
                v = v_flat[torch_meta.decode_slots].transpose(1, 2)
                row["flex_compiled_s"] = timeit(lambda: flex(q.unsqueeze(2), k, v, scale), min_seconds)
                row["flex_note"] = "K/V pre-gathered (gather not timed), so this is a lower bound for flex"
        results.append(row)
    return results


PREFILL_CASES = [  # (name, context lengths, query lengths): one layer's prefill work in one step
    ("one 512-token prompt", [512], [512]),
    ("one 2048-token window", [2048], [2048]),
    ("32 prompts of 100 tokens", [100] * 32, [100] * 32),
    ("a 256-token chunk after 768 cached", [1024], [256]),
]


def prefill_attention(min_seconds: float) -> list[dict]:
    """Prefill attention for one layer of the default model, bf16: quantkit's C++ kernel vs the SDPA plan."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    results = []
    for name, context_lens, query_lens in PREFILL_CASES:
        blocks = sum(-(-c // block_size) for c in context_lens)
        order = torch.randperm(blocks).tolist()
        tables, used = [], 0
        for c in context_lens:
            tables.append(order[used : used + -(-c // block_size)])
            used += len(tables[-1])
        k_cpu = torch.randn(kv_heads, blocks * block_size, head_dim).to(torch.bfloat16)
        v_cpu = torch.randn_like(k_cpu)
        q = torch.randn(sum(query_lens), heads, head_dim).to(torch.bfloat16)
        meta = AttentionMetadata.build(tables, context_lens, query_lens, block_size)
        # Useful FLOPs: QK^T and PV over the keys each query sees (causal), 2 * 2 * D per (query head, key).
        flops = sum(4 * heads * head_dim * (c * (c + 1) - (c - n) * (c - n + 1)) / 2 for c, n in zip(context_lens, query_lens))
        with cpu_threads(MAX_THREADS):
            kernel = timeit(lambda: paged_attention(q, k_cpu, v_cpu, meta, head_dim**-0.5), min_seconds)
            with plain_torch(True):
                meta.sdpa_prefill()  # planned once per step in the runtime: not timed
                sdpa = timeit(lambda: paged_attention(q, k_cpu, v_cpu, meta, head_dim**-0.5), min_seconds)
        results.append({"case": name, "context_lens": context_lens[:1], "sequences": len(context_lens), "quantkit_kernel_s": kernel,
                        "sdpa_s": sdpa, "speedup": sdpa / kernel, "kernel_gflops": flops / kernel / 1e9, "sdpa_gflops": flops / sdpa / 1e9})
    return results


def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, scale):
            return compiled(q, k, v, scale=scale, enable_gqa=True)

        return run
    except Exception as e:  # noqa: BLE001 - a missing compiler must not stop the other receipts
        print(f"flex_attention unavailable: {e}")
        return None


def decode_step(min_seconds: float, artifact: Path) -> dict:
    """Batch-1 decode step of the whole default model through the runtime: int4 artifact vs bf16 weights.

    The artifact only fixes the weight format; speed does not depend on AWQ vs RTN codes, so a
    missing artifact is made with the quick RTN method.
    """
    from quantkit.runtime.model_runner import ModelRunner
    from quantkit.runtime.weights import load_weights

    if not (artifact / "quantkit.json").is_file():
        from quantkit.pipeline import quantize
        from quantkit.recipe import Recipe

        quantize("smollm2-135m", artifact, Recipe().with_overrides(method="rtn", group_size=64), force=True)
    out = {"artifact": str(artifact), "context": 256}
    # (weights, plain-torch paths, int8 output head, fused decoder): the head is set explicitly in
    # every variant, since the runtime's default keeps the default model's int8 head (it is the more
    # faithful copy); "modules" variants run the layers module by module (fused_decoder off), as
    # prefill steps do and as decode did before kernels/decoder.py.
    variants = {"int4": (artifact, False, False, True), "int4_int8_head": (artifact, False, True, True),
                "bf16": ("smollm2-135m", False, False, True), "bf16_int8_head": ("smollm2-135m", False, True, True),
                "int4_int8_head_modules": (artifact, False, True, False), "bf16_int8_head_modules": ("smollm2-135m", False, True, False),
                "int4_plain_torch": (artifact, True, False, False), "bf16_plain_torch": ("smollm2-135m", True, False, False),
                # the same as *_int8_head, decoding on every thread / on one (the runtime: one for int4, all for dense bf16)
                "int4_int8_head_all_threads": (artifact, False, True, True), "bf16_int8_head_all_threads": ("smollm2-135m", False, True, True),
                "int4_int8_head_one_thread": (artifact, False, True, True), "bf16_int8_head_one_thread": ("smollm2-135m", False, True, True)}
    steps = {}
    for name, (spec, fallback, int8_head, fused) in variants.items():
        with plain_torch(fallback):  # weights are prepared and each step planned for one set of kernels
            runner = ModelRunner(load_weights(spec), torch.bfloat16, block_size=16, num_blocks=32, int8_head=int8_head)
            if not fused:
                runner.model.fused_decoder = None
            elif runner.model.fused_decoder is None:
                raise RuntimeError(f"{name}: the fused decoder did not build on this machine (needs quantkit's C++ bf16 kernels)")
            steps[name] = _decode_step(runner, fallback)
    # Interleaved: one step of each variant in turn, over and over; medians. This machine's speed
    # drifts by tens of percent within minutes (another tenant), and variants timed one after the
    # other would compare the drift as much as the kernels.
    rounds = max(30, int(min_seconds * 200))
    times = {name: {"step_s": [], "layers_only_s": []} for name in steps}
    for _ in range(rounds):
        for name, (run, forward, _) in steps.items():
            setting = "all" if name.endswith("_all_threads") else "one" if name.endswith("_one_thread") else "runtime"
            with plain_torch(variants[name][1]), decode_threads(setting), torch.inference_mode():
                for key, fn in (("step_s", run), ("layers_only_s", forward)):
                    t0 = time.perf_counter()
                    fn()
                    times[name][key].append(time.perf_counter() - t0)
    for name, (_, _, sizes) in steps.items():
        out[name] = {"step_s": statistics.median(times[name]["step_s"]), "layers_only_s": statistics.median(times[name]["layers_only_s"]),
                     "rounds": rounds, **sizes}
    return out


def _decode_step(runner, fallback: bool):
    """(one decode step, the same step without the head, byte counts) after a 256-token prefill."""
    with plain_torch(fallback), torch.inference_mode():
        step = decode_step_input(runner)
        for _ in range(5):
            runner.run(step)
    head = runner.model.lm_head
    sizes = {"linear_weight_bytes": linear_weight_bytes(runner.model),
             "head_bytes": head.int8.nbytes() if head.int8 is not None else head.weight.numel() * head.weight.element_size()}
    return (lambda: runner.run(step)), (lambda: runner._forward(step)), sizes  # _forward: without the head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--artifact", type=Path, default=Path.home() / ".cache" / "quantkit" / "bench" / "smollm2-rtn-g64", help="int4 artifact of the default model (made with RTN if missing)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args()
    min_seconds = 0.1 if args.quick else 0.3

    bandwidth = memory_bandwidth(min_seconds, MAX_THREADS)
    bandwidth_1 = memory_bandwidth(min_seconds, 1)
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s ({MAX_THREADS} threads), {bandwidth_1 / 1e9:.1f} GB/s (1 thread)\n")

    table = matmul_table(min_seconds)
    print(f"{'layer':10} {'M':>4} {'thr':>3} | {'qk int4':>8} {'torch i4':>8} {'deq+bf16':>9} {'bf16 us':>8} {'fp32 us':>8} | {'int4/bf16':>9} | {'int4 GB/s':>9} {'% of BW':>7}")
    for r in table:
        s, bw = r["seconds"], r["weight_gbps"]["int4_quantkit"]
        print(
            f"{r['layer']:10} {r['m']:>4} {r['threads']:>3} | {s['int4_quantkit'] * 1e6:8.1f} {s['int4_fused'] * 1e6:8.1f} {s['int4_dequant_bf16'] * 1e6:9.1f} {s['bf16'] * 1e6:8.1f} {s['fp32'] * 1e6:8.1f} |"
            f" {r['int4_speedup_vs_bf16']:8.2f}x | {bw:9.1f} {100 * bw * 1e9 / (bandwidth if r['threads'] > 1 else bandwidth_1):6.0f}%"
        )
    block = {}
    for m in ROWS:
        rows = [r for r in table if r["m"] == m]
        t_int4 = sum(r["seconds"]["int4_quantkit"] for r in rows)
        t_torch = sum(r["seconds"]["int4_fused"] for r in rows)
        t_bf16 = sum(r["seconds"]["bf16"] for r in rows)
        t_gemv = sum(r["seconds"]["bf16_quantkit_gemv"] for r in rows) if m <= GEMV_MAX_ROWS else None
        bytes_int4 = sum(int4_bytes(r["in"], r["out"], 3) for r in rows)
        roof = bandwidth if threads_for_tokens(m, MAX_THREADS) > 1 else bandwidth_1
        block[m] = {"int4_s": t_int4, "torch_int4_s": t_torch, "bf16_s": t_bf16, "speedup": t_bf16 / t_int4, "torch_speedup": t_bf16 / t_torch,
                    "bf16_gemv_s": t_gemv, "speedup_vs_bf16_gemv": t_gemv / t_int4 if t_gemv else None,
                    "int4_gbps": bytes_int4 / t_int4 / 1e9, "fraction_of_read_bw": bytes_int4 / t_int4 / roof}
    print("\nwhole block (7 linears):")
    for m, b in block.items():
        print(f"  M={m:<4} quantkit int4 {b['int4_s'] * 1e6:8.1f} us  torch int4 {b['torch_int4_s'] * 1e6:8.1f} us  bf16 {b['bf16_s'] * 1e6:8.1f} us"
              f"  speedup {b['speedup']:.2f}x (torch's op {b['torch_speedup']:.2f}x)  {b['int4_gbps']:.1f} GB/s ({100 * b['fraction_of_read_bw']:.0f}% of read BW at the same threads)")
        if b["bf16_gemv_s"]:
            print(f"         bf16 with quantkit's GEMV {b['bf16_gemv_s'] * 1e6:8.1f} us: int4 speedup over it {b['speedup_vs_bf16_gemv']:.2f}x")

    fused = fused_block(min_seconds)
    roof = bandwidth if fused["threads"] > 1 else bandwidth_1
    fused["int4_gbps"] = fused["int4_bytes"] / fused["int4_s"] / 1e9
    fused["fraction_of_read_bw"] = fused["int4_bytes"] / fused["int4_s"] / roof
    print(f"\nthe block as the runtime runs it (4 linears, q/k/v and gate/up fused), M=1: quantkit int4 {fused['int4_s'] * 1e6:.1f} us,"
          f" bf16 {fused['bf16_s'] * 1e6:.1f} us ({fused['bf16_s'] / fused['int4_s']:.2f}x), bf16 GEMV {fused['bf16_gemv_s'] * 1e6:.1f} us"
          f" ({fused['bf16_gemv_s'] / fused['int4_s']:.2f}x); {fused['int4_gbps']:.1f} GB/s = {100 * fused['fraction_of_read_bw']:.0f}% of read BW")

    cross = crossover(min_seconds)
    print("\nint4 kernel vs its dequantize + bf16 matmul (one block's linears):")
    for c in cross:
        print(f"  M={c['m']:<4} quantkit {c['quantkit_s'] * 1e6:8.1f} us vs dense {c['quantkit_dequant_bf16_s'] * 1e6:8.1f} us (ratio {c['quantkit_over_dense']:.2f})"
              f"  | torch fused {c['fused_s'] * 1e6:8.1f} us vs dense {c['dequant_bf16_s'] * 1e6:8.1f} us (ratio {c['fused_over_dense']:.2f})")

    attn = attention_candidates(min_seconds)
    print("\nCPU decode attention, one layer (9 heads / 3 KV heads, d=64, bf16):")
    for a in attn:
        flex = f"  flex(compiled) {a['flex_compiled_s'] * 1e6:8.1f} us" if "flex_compiled_s" in a else ""
        print(f"  batch {a['batch']:>3} ctx {a['context']:>4}: quantkit C++ (chosen) {a['quantkit_kernel_s'] * 1e6:8.1f} us  grouped matmul {a['grouped_matmul_s'] * 1e6:8.1f} us  padded SDPA {a['padded_sdpa_s'] * 1e6:8.1f} us  per-sequence SDPA {a['per_sequence_sdpa_s'] * 1e6:8.1f} us{flex}")

    prefill = prefill_attention(min_seconds)
    print("\nCPU prefill attention, one layer (9 heads / 3 KV heads, d=64, bf16), useful causal FLOPs:")
    for p in prefill:
        print(f"  {p['case']:36}: quantkit C++ (chosen) {p['quantkit_kernel_s'] * 1e3:7.2f} ms ({p['kernel_gflops']:5.0f} GFLOP/s)"
              f"  SDPA plan {p['sdpa_s'] * 1e3:7.2f} ms ({p['sdpa_gflops']:5.0f} GFLOP/s)  speedup {p['speedup']:.2f}x")

    step = decode_step(min_seconds, args.artifact)
    print("\nwhole-model decode step, batch 1, context 256 (bf16 activations):")
    for kernels, int4, bf16 in (("quantkit C++, bf16 head", "int4", "bf16"), ("int8 head in both", "int4_int8_head", "bf16_int8_head"),
                                ("int8 head in int4 only", "int4_int8_head", "bf16"),
                                ("int8 head, layers as modules", "int4_int8_head_modules", "bf16_int8_head_modules"),
                                ("plain torch", "int4_plain_torch", "bf16_plain_torch")):
        i4, bf = step[int4], step[bf16]
        print(f"  {kernels:28}: int4 {i4['step_s'] * 1e3:6.2f} ms, bf16 {bf['step_s'] * 1e3:6.2f} ms, speedup {bf['step_s'] / i4['step_s']:.2f}x"
              f" | layers only: int4 {i4['layers_only_s'] * 1e3:6.2f} ms, bf16 {bf['layers_only_s'] * 1e3:6.2f} ms, speedup {bf['layers_only_s'] / i4['layers_only_s']:.2f}x")
    print(f"  int4 step, quantkit's kernels over the plain-torch paths: {step['int4_plain_torch']['step_s'] / step['int4']['step_s']:.2f}x")
    one, every = ({f: step[f"{f}_int8_head_{t}"]["step_s"] for f in ("int4", "bf16")} for t in ("one_thread", "all_threads"))
    print(f"  int8 head, on one thread: int4 {one['int4'] * 1e3:6.2f} ms, bf16 {one['bf16'] * 1e3:6.2f} ms; on every thread: int4"
          f" {every['int4'] * 1e3:6.2f} ms, bf16 {every['bf16'] * 1e3:6.2f} ms; each format at its faster thread count: speedup"
          f" {min(one['bf16'], every['bf16']) / min(one['int4'], every['int4']):.2f}x")
    for fmt in ("int4", "bf16"):
        fused, modules = step[f"{fmt}_int8_head"]["step_s"], step[f"{fmt}_int8_head_modules"]["step_s"]
        print(f"  {fmt} step (int8 head), fused decoder over the layers as modules: {modules * 1e3:.2f} -> {fused * 1e3:.2f} ms, {modules / fused:.2f}x")

    write_results(args.out, {
        "memory_read_bandwidth_bytes_per_s": bandwidth,
        "memory_read_bandwidth_1_thread_bytes_per_s": bandwidth_1,
        "group_size": GROUP_SIZE,
        "matmul": table,
        "block": block,
        "crossover": cross,
        "fused_block_m1": fused,
        "attention_decode": attn,
        "attention_prefill": prefill,
        "decode_step": step,
    })


if __name__ == "__main__":
    main()
