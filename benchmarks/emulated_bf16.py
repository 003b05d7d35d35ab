"""The runtime where bf16 matmuls are emulated (CPUs without AVX-512 BF16): bf16 everywhere vs
fp32 for the compute-bound calls (kernels/cpu_int4.py, kernels/linear.py, kernels/attention.py).

On an AVX-512 BF16 machine this emulates such a CPU: oneDNN is held to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, which is what makes its bf16 matmuls emulated), PyTorch dispatches its
AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) and quantkit's C++ kernels are off
(QUANTKIT_CPU_KERNELS=0; they need AVX-512 BF16). Each leg is its own process,
the legs alternate, and each runs twice:
- "bf16 everywhere": the routing as before, every call in bf16 (forced by declaring bf16 native);
- "fp32 where compute-bound": the runtime's routing on such a CPU.
Workload: an AWQ artifact through LLM.generate, random prompts of 32-512 tokens, 32-96 output
tokens, greedy, ignore_eos. Plus the calls the routing changes, timed both ways: one decoder
block's four int4 linears at 256-1,024 rows, dense linears (a 3072x576 projection and the
49152x576 output head) at 16-256 rows, and decode attention's P.V.

    python benchmarks/emulated_bf16.py ARTIFACT [--requests 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "QUANTKIT_CPU_KERNELS": "0"}
LEGS = {"bf16 everywhere": True, "fp32 where compute-bound": False}
BLOCK_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # fused q/k/v, o, fused gate/up, down
DENSE_OUT_FEATURES = (3072, 49152)  # a dense gate/up projection, the output head


def engine_leg(artifact: str, requests: int, bf16_native: bool) -> dict:
    """In the child process: the workload through the engine, with the routing the leg asks for."""
    import torch

    from quantkit.kernels import cpu_ext
    from quantkit.runtime.engine import LLM
    from quantkit.runtime.sampling import SamplingParams

    cpu_ext.bf16_matmuls_are_native = lambda: bf16_native  # the callers look it up on the module
    rng = random.Random(0)
    llm = LLM(artifact, kv_cache_memory=512 << 20)
    vocab = llm.engine.runner.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(32, 512))] for _ in range(requests)]
    params = [SamplingParams(max_tokens=rng.randint(32, 96), ignore_eos=True, temperature=0.0) for _ in range(requests)]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "seconds": seconds, "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": generated, "output_tok_s": generated / seconds,
            "tokens": [o.token_ids for o in outputs]}


def kernel_leg() -> dict:
    """In the child process: the calls the routing changes, each timed the ways it can go."""
    import torch
    from common import seconds_per_call
    import torch.nn.functional as F

    from quantkit.kernels import attention, cpu_ext, cpu_int4, linear
    from quantkit.pack import pack_int4

    g = torch.Generator().manual_seed(0)
    weights = [cpu_int4.prepare_torch_int4(pack_int4(torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)),
                                           pack_int4(torch.randint(0, 16, (k // 32, n), generator=g, dtype=torch.int32)),
                                           (torch.rand(k // 32, n, generator=g) * 0.01).half()) for k, n in BLOCK_SHAPES]
    int4 = []
    for m in (256, 512, 1024):
        xs = [torch.randn(m, k, generator=g).bfloat16() for k, _ in BLOCK_SHAPES]
        pairs = list(zip(xs, weights))
        int4.append({
            "m": m,
            "fused_bf16_s": sum(seconds_per_call(lambda: cpu_int4.int4_matmul_fused(x, w)) for x, w in pairs),
            "fp32_s": sum(seconds_per_call(lambda: F.linear(x.float(), cpu_int4.dequantize_cpu_int4(w, torch.float32)).bfloat16())
                          for x, w in pairs),
            "dense_bf16_s": sum(seconds_per_call(lambda: F.linear(x, cpu_int4.dequantize_cpu_int4(w, torch.bfloat16)), budget=0.1)
                                for x, w in pairs),
        })
    dense = []
    for out_features in DENSE_OUT_FEATURES:
        w = (torch.randn(out_features, 576, generator=g) * 0.05).bfloat16()
        for m in (4, 8, 16, 64, 256):
            x = torch.randn(m, 576, generator=g).bfloat16()
            dense.append({"weight": [out_features, 576], "m": m,
                          "bf16_s": seconds_per_call(lambda: F.linear(x, w), budget=0.2),
                          "fp32_s": seconds_per_call(lambda: linear._fp32_linear(x, w, None), budget=0.2)})
    decode = []
    for seqs, ctx in ((16, 512), (32, 1024)):  # SmolLM2's heads: 9 query, 3 KV, dim 64
        q = torch.randn(seqs, 9, 64, generator=g).bfloat16()
        k_cache, v_cache = (torch.randn(3, seqs * ctx, 64, generator=g).bfloat16() for _ in range(2))
        slots = torch.randperm(seqs * ctx, generator=g).view(seqs, ctx)
        row = {"sequences": seqs, "context": ctx}
        for name, native in (("bf16_pv_s", True), ("fp32_pv_s", False)):
            cpu_ext.bf16_matmuls_are_native = lambda native=native: native
            row[name] = seconds_per_call(lambda: attention._cpu_decode(q, k_cache, v_cache, slots, None, 0.125))
        decode.append(row)
    return {"int4": int4, "dense": dense, "decode_attention": decode}


def child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env={**os.environ, **EMULATION}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"leg {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--leg", help=argparse.SUPPRESS)  # internal: run one leg in this process
    args = parser.parse_args()
    if args.leg == "kernels":
        print(json.dumps(kernel_leg()))
        return
    if args.leg is not None:
        print(json.dumps(engine_leg(args.artifact, args.requests, LEGS[args.leg])))
        return

    from common import write_results

    runs: dict[str, list[dict]] = {leg: [] for leg in LEGS}
    for _ in range(args.repeats):
        for leg in LEGS:
            runs[leg].append(child([args.artifact, "--requests", str(args.requests), "--leg", leg]))
    before, after = (min(r["seconds"] for r in runs[leg]) for leg in LEGS)
    same_tokens = all(r["tokens"] == runs["bf16 everywhere"][0]["tokens"] for r in runs["bf16 everywhere"])
    agree = sum(a == b for a, b in zip(runs["bf16 everywhere"][0]["tokens"], runs["fp32 where compute-bound"][0]["tokens"]))
    print(f"engine, {args.requests} requests, {runs['bf16 everywhere'][0]['prompt_tokens']} prompt and "
          f"{runs['bf16 everywhere'][0]['output_tokens']} output tokens, PyTorch dispatch {runs['bf16 everywhere'][0]['capability']}:")
    for leg in LEGS:
        print(f"  {leg:26s} " + "  ".join(f"{r['seconds']:6.2f} s" for r in runs[leg]) + f"   best {max(r['output_tok_s'] for r in runs[leg]):6.1f} out tok/s")
    print(f"  speedup (best of each): {before / after:.2f}x; requests with identical greedy tokens in the two legs: {agree} of {args.requests}")
    kernels = child([args.artifact, "--leg", "kernels"])
    print("one block's four int4 linears (ms):   M   fused bf16   fp32   dense bf16")
    for row in kernels["int4"]:
        print(f"{row['m']:40d} {row['fused_bf16_s'] * 1e3:10.2f} {row['fp32_s'] * 1e3:7.2f} {row['dense_bf16_s'] * 1e3:10.2f}")
    print("dense bf16 linears (ms):   weight        M     bf16    fp32 (upcast per call)")
    for row in kernels["dense"]:
        print(f"{'x'.join(map(str, row['weight'])):>35s} {row['m']:6d} {row['bf16_s'] * 1e3:8.2f} {row['fp32_s'] * 1e3:7.2f}")
    print("decode attention (ms):   sequences x context   P.V in bf16   P.V in fp32")
    for row in kernels["decode_attention"]:
        print(f"{row['sequences']:28d} x {row['context']:<6d} {row['bf16_pv_s'] * 1e3:12.2f} {row['fp32_pv_s'] * 1e3:12.2f}")
    for leg in runs.values():
        for r in leg:
            r.pop("tokens")
    write_results(Path(__file__).parent / "results" / "emulated_bf16.json",
                  {"emulation": EMULATION, "requests": args.requests, "engine": runs, "speedup": before / after,
                   "identical_requests": agree, "bf16_leg_repeatable": same_tokens, **kernels})


if __name__ == "__main__":
    main()
