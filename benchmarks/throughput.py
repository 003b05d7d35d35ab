"""Serving receipts: one request at a time vs continuous batching, on the same engine and weights.

Workload: 64 requests, all queued at t = 0, prompt lengths uniform in [32, 512] tokens (real
WikiText-2 text), output lengths uniform in [32, 256] tokens (ignore_eos, so every request
generates exactly its length), greedy. Both modes run the int4 artifact of the default model in
bf16 through LLMEngine; "one at a time" is the same engine with max_num_seqs = 1.

KV waste = reserved-but-unused cache slots / reserved slots, averaged over time (each step
weighted by its duration). Reserved = blocks held x block_size; used = tokens in the cache. For
contrast, the same timeline is scored as if every running request had reserved a contiguous
buffer for prompt + max_tokens (what a runtime without paging must do).

    python benchmarks/throughput.py                   # 64 requests (a few minutes)
    python benchmarks/throughput.py --requests 16     # quicker
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import write_results  # noqa: E402
from quantkit.runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from quantkit.runtime.sampling import SamplingParams  # noqa: E402

MiB = 1024**2
WIKITEXT = Path(__file__).resolve().parents[1] / "eval" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def make_workload(tokenizer, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text[:2_000_000], add_special_tokens=False)
    work = []
    for _ in range(n):
        prompt_len, output_len = rng.randint(32, 512), rng.randint(32, 256)
        start = rng.randrange(0, len(ids) - prompt_len)
        work.append((ids[start : start + prompt_len], output_len))
    return work


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(engine: LLMEngine, workload: list[tuple[list[int], int]]) -> dict:
    start = time.perf_counter()
    ids = [engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for prompt, n in workload]
    max_tokens = {rid: n for rid, (_, n) in zip(ids, workload)}
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    generated = 0
    paged_waste = contiguous_waste = weight = 0.0
    peak_blocks = 0
    block_size = engine.config.block_size
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            generated += 1
            first_token.setdefault(out.request_id, now)
            if out.finished:
                finished[out.request_id] = now
        running = engine.scheduler.running
        if running:
            reserved = engine.scheduler.num_used_blocks * block_size
            used = sum(s.num_computed_tokens for s in running)
            contiguous = sum(s.num_prompt_tokens + max_tokens[s.seq_id] for s in running)
            dt = now - t0
            paged_waste += dt * (1 - used / reserved)
            contiguous_waste += dt * (1 - used / contiguous)
            weight += dt
            peak_blocks = max(peak_blocks, engine.scheduler.num_used_blocks)
    wall = time.perf_counter() - start
    ttft = [first_token[r] - start for r in ids]
    e2e = [finished[r] - start for r in ids]
    return {
        "wall_s": wall,
        "requests": len(ids),
        "generated_tokens": generated,
        "output_tokens_per_s": generated / wall,
        "requests_per_s": len(ids) / wall,
        "ttft_s": {"mean": statistics.mean(ttft), "p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
        "e2e_s": {"mean": statistics.mean(e2e), "p50": percentile(e2e, 50), "p95": percentile(e2e, 95)},
        "kv_waste_paged": paged_waste / weight,
        "kv_waste_if_contiguous_reservation": contiguous_waste / weight,
        "peak_kv_blocks": peak_blocks,
        "kv_blocks": engine.runner.num_blocks,
        "preemptions": engine.scheduler.num_preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path.home() / ".cache" / "quantkit" / "bench" / "smollm2-rtn-g64",
                        help="int4 artifact of the default model (made with RTN if missing: speed does not depend on AWQ vs RTN codes)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-memory-mib", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = parser.parse_args()

    if not (args.artifact / "quantkit.json").is_file():
        from quantkit.pipeline import quantize
        from quantkit.recipe import Recipe

        quantize("smollm2-135m", args.artifact, Recipe().with_overrides(method="rtn", group_size=64), force=True)

    modes = {"one_at_a_time": 1, "continuous_batching": args.max_num_seqs}
    results = {}
    workload = None
    for mode, max_seqs in modes.items():
        engine = LLMEngine(EngineConfig(
            model=str(args.artifact), dtype="bfloat16", kv_cache_memory=args.kv_cache_memory_mib * MiB,
            max_num_seqs=max_seqs, max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.requests,
        ))
        workload = workload or make_workload(engine.tokenizer, args.requests, args.seed)
        print(f"{mode}: {args.requests} requests ...", flush=True)
        results[mode] = run(engine, workload)
        r = results[mode]
        print(f"  {r['output_tokens_per_s']:.1f} output tok/s, {r['requests_per_s']:.3f} req/s, wall {r['wall_s']:.1f} s, "
              f"TTFT p95 {r['ttft_s']['p95']:.1f} s, e2e p95 {r['e2e_s']['p95']:.1f} s, KV waste {100 * r['kv_waste_paged']:.2f}% "
              f"(contiguous reservation would waste {100 * r['kv_waste_if_contiguous_reservation']:.1f}%), preemptions {r['preemptions']}")
    speedup = results["continuous_batching"]["output_tokens_per_s"] / results["one_at_a_time"]["output_tokens_per_s"]
    print(f"\ncontinuous batching / one at a time, output throughput: {speedup:.2f}x (target >= 10x)")
    print(f"KV waste under continuous batching: {100 * results['continuous_batching']['kv_waste_paged']:.2f}% (target < 4%)")
    write_results(args.out, {
        "args": {k: str(v) for k, v in vars(args).items()},
        "workload": {"requests": args.requests, "prompt_tokens": [len(p) for p, _ in workload], "output_tokens": [n for _, n in workload]},
        "results": results,
        "continuous_over_one_at_a_time": speedup,
    })


if __name__ == "__main__":
    main()
