"""Accuracy receipts: FP16 vs AWQ vs RTN on the offline lm-eval tasks, and evaluation speed.

1. Accuracy: every model through QuantkitLM (the runtime, bf16), the same tasks, the first
   `--limit` examples of each (WikiText-2 has 62 articles: all of them are scored).
2. Speed: the same task subset through lm-eval's built-in Hugging Face backend and through
   QuantkitLM, on the same dense weights and dtype, side by side in this run.

    python benchmarks/eval.py --awq out/smollm2-awq --rtn out/smollm2-rtn --limit 500
    python benchmarks/eval.py --awq A --rtn B --limit 50 --speed-limit 50    # quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from common import write_results  # noqa: E402
from quantkit.eval_tasks import DEFAULT_TASKS, resolve_tasks, task_manager  # noqa: E402
from quantkit.evaluate import primary_metric, run_tasks, short_name  # noqa: E402
from quantkit.sources import resolve_model  # noqa: E402


def speed(model_dir: Path, tasks: list[str], limit: int, dtype: str) -> dict:
    """Wall time of lm-eval's HF backend vs QuantkitLM on the same weights, tasks and limit."""
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    hf = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={dtype}", tasks=tasks, limit=limit,
                         batch_size=16, task_manager=task_manager(), log_samples=False, bootstrap_iters=0, device="cpu")
    hf_s = time.perf_counter() - start
    ours, ours_s = run_tasks(str(model_dir), tasks, limit, dtype)
    agree = {short_name(t): (primary_metric(t, hf["results"][t])[2], primary_metric(t, ours[t])[2]) for t in tasks}
    return {"tasks": [short_name(t) for t in tasks], "limit": limit, "dtype": dtype, "hf_backend_s": hf_s, "quantkit_s": ours_s,
            "speedup": hf_s / ours_s, "metrics_hf_vs_quantkit": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", default="smollm2-135m", help="baseline model (default: the embedded SmolLM2)")
    parser.add_argument("--awq", type=Path, required=True, help="AWQ artifact of the baseline")
    parser.add_argument("--rtn", type=Path, required=True, help="RTN artifact of the baseline")
    parser.add_argument("--limit", type=int, default=500, help="first N examples of each task")
    parser.add_argument("--speed-limit", type=int, default=100, help="examples per task in the speed comparison")
    parser.add_argument("--speed-tasks", default="hellaswag,piqa,winogrande,lambada")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval.json")
    args = parser.parse_args()

    tasks = resolve_tasks(list(DEFAULT_TASKS))
    models = {"fp16": args.fp16, "awq": str(args.awq), "rtn": str(args.rtn)}
    results, wall = {}, {}
    for name, model in models.items():
        print(f"{name}: {model} ...", flush=True)
        raw, wall[name] = run_tasks(model, tasks, args.limit, args.dtype)
        results[name] = {short_name(t): dict(zip(("metric", "higher_is_better", "value"), primary_metric(t, raw[t]))) for t in tasks}
        print(f"  {wall[name]:.0f} s", flush=True)

    print(f"\n{'task':12} {'metric':16} {'fp16':>9} {'awq':>9} {'rtn':>9} {'awq ret.':>9} {'rtn ret.':>9}")
    retention = {"awq": [], "rtn": []}
    for task in results["fp16"]:
        base = results["fp16"][task]
        row = f"{task:12} {base['metric']:16} {base['value']:9.4f}"
        for name in ("awq", "rtn"):
            row += f" {results[name][task]['value']:9.4f}"
        for name in ("awq", "rtn"):
            value = results[name][task]["value"]
            if base["higher_is_better"]:
                r = 100 * value / base["value"]
                retention[name].append(r)
                row += f" {r:8.1f}%"
            else:
                row += f" {100 * (value / base['value'] - 1):+8.1f}%"
        print(row)
    means = {name: sum(v) / len(v) for name, v in retention.items() if v}
    print("mean zero-shot retention: " + ", ".join(f"{k} {v:.1f}%" for k, v in means.items()))

    speed_result = None
    if not args.skip_speed:
        speed_tasks = resolve_tasks(args.speed_tasks.split(","))
        print(f"\nspeed: lm-eval hf backend vs QuantkitLM, {args.speed_tasks}, limit {args.speed_limit}, {args.dtype} ...", flush=True)
        speed_result = speed(resolve_model(args.fp16), speed_tasks, args.speed_limit, args.dtype)
        print(f"  hf backend {speed_result['hf_backend_s']:.0f} s, quantkit {speed_result['quantkit_s']:.0f} s: {speed_result['speedup']:.2f}x")
        for task, (a, b) in speed_result["metrics_hf_vs_quantkit"].items():
            print(f"  {task:12} hf {a:.4f}  quantkit {b:.4f}")

    write_results(args.out, {"limit": args.limit, "dtype": args.dtype, "models": models, "results": results, "wall_s": wall,
                             "mean_retention_pct": means, "speed": speed_result})


if __name__ == "__main__":
    main()
