"""The Runtime issue's receipt: one request at a time vs continuous batching, one run, same engine.

A thin preset of `quantkit bench offline` (quantkit/bench/): 64 requests queued at t = 0, prompts
32-512 tokens, outputs 32-256 (ignore_eos, greedy), the int4 artifact in bf16, the engine limited
to one sequence vs continuous batching; KV waste against a contiguous reservation; and the
arithmetic floor (the workload's matmul FLOPs at the bf16 matmul peak measured after the run),
which bounds the speedup any engine on this machine could show over one at a time.

    python benchmarks/throughput.py --artifact out/smollm2-awq
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import causal_pairs, matmul_peak, model_flops  # noqa: E402
from quantkit.bench.run import make_workload, run_offline  # noqa: E402
from quantkit.bench.report import console, ratios_table, runs_table, write_json  # noqa: E402

MiB = 1024**2
MODES = ["engine-one-at-a-time-int4", "engine-continuous-int4"]


def workload_flops(artifact: Path, workload) -> dict[str, float]:
    """The workload's matmul FLOPs: each request computes its prompt and all but its last output
    token (that one is never fed back), and takes logits once per output token."""
    from quantkit.runtime.models import MODEL_CLASSES

    hf_config = json.loads((artifact / "config.json").read_text())
    config = MODEL_CLASSES[hf_config["architectures"][0]][0].from_hf(hf_config)
    prompts = [len(r.prompt_ids) for r in workload]
    outputs = [r.max_tokens for r in workload]  # ignore_eos: every request generates all of them
    return model_flops(config, tokens=sum(prompts) + sum(outputs) - len(workload), head_rows=sum(outputs),
                       attention_pairs=sum(causal_pairs(0, p) + causal_pairs(p, o - 1) for p, o in zip(prompts, outputs)))


def arithmetic_floor(work: dict[str, float]) -> dict:
    """The least time any engine on this machine needs for the work: its FLOPs at the bf16 matmul peak measured now."""
    peak = matmul_peak()
    return {"tflop": {k: v / 1e12 for k, v in work.items()}, "matmul_peak_flops": peak, "floor_s": sum(work.values()) / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="int4 artifact of the default model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput")
    args = parser.parse_args()

    workload = make_workload(str(args.artifact), None, args.requests, args.seed, (32, 512), (32, 256))
    work = workload_flops(args.artifact, workload)  # before the long runs: a mistake here should not waste them
    data = run_offline(args.artifact, None, workload, MODES, args.out, {"max_num_seqs": 64, "kv_cache_memory": 512 * MiB},
                       price_per_hour=None, memory_budget=8 * 1024 * MiB, concurrency=32, context_tokens=4096)
    console.print(runs_table(f"{args.requests} requests queued at t=0", data["results"]))
    console.print(ratios_table(data["ratios"]))
    floor = arithmetic_floor(work)  # the peak measured after the runs, on the machine as they left it
    data["arithmetic_floor"] = floor
    write_json(args.out / "offline.json", data)
    one = data["results"]["engine-one-at-a-time-int4"]["wall_s"]
    continuous = data["results"]["engine-continuous-int4"]["wall_s"]
    print(f"arithmetic floor: {sum(floor['tflop'].values()):.2f} TFLOP at the measured bf16 matmul peak of "
          f"{floor['matmul_peak_flops'] / 1e9:.0f} GFLOP/s = {floor['floor_s']:.2f} s; continuous batching took {continuous:.2f} s "
          f"({floor['floor_s'] / continuous:.0%} of peak), one at a time {one:.2f} s: no engine here exceeds {one / floor['floor_s']:.2f}x")
    waste = data["results"]["engine-continuous-int4"]["kv_waste"]
    print(f"continuous / one at a time: {data['ratios']['continuous_int4_over_engine_one_at_a_time_int4']:.2f}x (target >= 10x); "
          f"KV waste {100 * waste['paged']:.2f}% (target < 4%), contiguous reservation {100 * waste['contiguous_reservation']:.1f}%")


if __name__ == "__main__":
    main()
