"""Issue 30's serving receipt: continuous batching with --activations int8 (W4A8) against bf16.

The same 64-request workload as benchmarks/throughput.py (queued at t = 0, prompts 32-512 tokens,
outputs 32-256, greedy, ignore_eos), the int4 artifact, the engine with continuous batching; the
two activation modes alternate (bf16, int8, bf16, int8, ...) each in a fresh process, so a noisy
neighbour hits both alike. Run pinned for a one-core figure:

    taskset -c 1 python benchmarks/w4a8_serving.py --artifact out/smollm2-awq --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import machine  # noqa: E402
from quantkit.bench.offline import OfflineConfig, run_mode_isolated  # noqa: E402
from quantkit.bench.report import write_json  # noqa: E402
from quantkit.bench.run import make_workload  # noqa: E402

MiB = 1024**2
MODE = "engine-continuous-int4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "w4a8_serving.json")
    args = parser.parse_args()

    workload = make_workload(str(args.artifact), None, args.requests, 0, (32, 512), (32, 256))
    runs: dict[str, list[dict]] = {"bf16": [], "int8": []}
    for repeat in range(args.repeats):
        for activations in ("bf16", "int8"):
            config = OfflineConfig(artifact=str(args.artifact), baseline=str(args.artifact), max_num_seqs=64, kv_cache_memory=512 * MiB,
                                   threads=args.threads, device="cpu", activations=activations)
            result = run_mode_isolated(MODE, workload, config)
            if result["activations"] != activations:
                raise SystemExit(f"asked for --activations {activations}, the engine ran {result['activations']}: nothing to compare")
            runs[activations].append(result)
            print(f"run {repeat + 1} {activations}: {result['output_tokens_per_s']:.1f} output tok/s, {result['wall_s']:.1f} s", flush=True)
    summary = {}
    for activations, results in runs.items():
        rates = [r["output_tokens_per_s"] for r in results]
        summary[activations] = {"output_tok_per_s_median": statistics.median(rates), "output_tok_per_s": rates,
                                "ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in results)}
    ratio = summary["int8"]["output_tok_per_s_median"] / summary["bf16"]["output_tok_per_s_median"]
    print(f"\n{'activations':<12} {'output tok/s (median)':>22} {'runs':>24}")
    for activations, s in summary.items():
        print(f"{activations:<12} {s['output_tok_per_s_median']:>22.1f} {', '.join(f'{r:.1f}' for r in s['output_tok_per_s']):>24}")
    print(f"W4A8 / W4A16: {ratio:.2f}x (target >= 1.6x)")
    prompt_tokens = sum(len(r.prompt_ids) for r in workload)
    output_tokens = sum(r.max_tokens for r in workload)
    write_json(args.out, {"machine": machine(), "threads": args.threads, "requests": args.requests, "prompt_tokens": prompt_tokens,
                          "output_tokens": output_tokens, "summary": summary, "int8_over_bf16": ratio,
                          "runs": {k: [{kk: v for kk, v in r.items() if kk != "requests"} for r in rs] for k, rs in runs.items()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
