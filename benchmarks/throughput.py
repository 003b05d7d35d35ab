"""The Runtime issue's receipt: one request at a time vs continuous batching, one run, same engine.

A thin preset of `quantkit bench offline` (quantkit/bench/): 64 requests queued at t = 0, prompts
32-512 tokens, outputs 32-256 (ignore_eos, greedy), the int4 artifact in bf16, the engine limited
to one sequence vs continuous batching; KV waste against a contiguous reservation.

    python benchmarks/throughput.py --artifact out/smollm2-awq
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quantkit.bench.run import make_workload, run_offline  # noqa: E402
from quantkit.bench.report import console, ratios_table, runs_table  # noqa: E402

MiB = 1024**2
MODES = ["engine-one-at-a-time-int4", "engine-continuous-int4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="int4 artifact of the default model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput")
    args = parser.parse_args()

    workload = make_workload(str(args.artifact), None, args.requests, args.seed, (32, 512), (32, 256))
    data = run_offline(args.artifact, None, workload, MODES, args.out, {"max_num_seqs": 64, "kv_cache_memory": 512 * MiB},
                       price_per_hour=None, memory_budget=8 * 1024 * MiB, concurrency=32, context_tokens=4096)
    console.print(runs_table(f"{args.requests} requests queued at t=0", data["results"]))
    console.print(ratios_table(data["ratios"]))
    waste = data["results"]["engine-continuous-int4"]["kv_waste"]
    print(f"continuous / one at a time: {data['ratios']['continuous_int4_over_engine_one_at_a_time_int4']:.2f}x (target >= 10x); "
          f"KV waste {100 * waste['paged']:.2f}% (target < 4%), contiguous reservation {100 * waste['contiguous_reservation']:.1f}%")


if __name__ == "__main__":
    main()
