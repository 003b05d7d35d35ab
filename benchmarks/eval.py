"""Accuracy receipts: FP16 vs AWQ vs RTN on the offline lm-eval tasks, and evaluation speed.

1. Accuracy: every model through QuantkitLM (the runtime, bf16), the same tasks, the first
   `--limit` examples of each, or all of them with `--limit 0` (WikiText-2 has 62 articles: all of
   them are scored). Each candidate's per-task difference from the baseline also gets a paired
   standard error (both models answer the same examples), so retention comes with its noise.
2. Speed: the same task subset through lm-eval's built-in Hugging Face backend and through
   QuantkitLM, on the same dense weights and dtype, side by side in this run.

    python benchmarks/eval.py --candidate awq=out/smollm2-awq --candidate rtn=out/smollm2-rtn --limit 500
    python benchmarks/eval.py --skip-accuracy    # only the speed comparison, into results/eval_speed.json
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
from quantkit.eval_tasks import DEFAULT_TASKS, resolve_tasks, task_manager_for  # noqa: E402
from quantkit.evaluate import paired_difference, primary_metric, retention_se_pct, run_tasks, short_name  # noqa: E402
from quantkit.gates import error_of_mean  # noqa: E402
from quantkit.sources import resolve_model  # noqa: E402


def speed(model_dir: Path, tasks: list[str], limits: dict[str, int], dtype: str, max_length: int = 2048) -> dict:
    """Per-task wall time of lm-eval's HF backend (batch 16) vs QuantkitLM: the same weights, dtype,
    window, tasks and examples; each backend loaded once, before its clock starts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from quantkit.evaluate import QuantkitLM

    backends = {
        "hf": lambda: HFLM(pretrained=str(model_dir), dtype=dtype, max_length=max_length, batch_size=16, device="cpu"),
        "quantkit": lambda: QuantkitLM(str(model_dir), dtype=dtype, max_length=max_length),
    }
    per_task: dict[str, dict] = {short_name(t): {"limit": limits[t]} for t in tasks}
    for name, make in backends.items():
        lm = make()
        for task in tasks:
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[task], limit=limits[task], task_manager=task_manager_for([task]), log_samples=False, bootstrap_iters=0)
            per_task[short_name(task)][name] = {"s": time.perf_counter() - start, "value": primary_metric(task, out["results"][task])[2]}
        del lm
    for row in per_task.values():
        row["speedup"] = row["hf"]["s"] / row["quantkit"]["s"]
    total = {name: sum(row[name]["s"] for row in per_task.values()) for name in backends}
    return {"dtype": dtype, "max_length": max_length, "per_task": per_task, "total_s": total, "speedup": total["hf"] / total["quantkit"]}


def paired_statistics(results: dict[str, dict], per_example: dict[str, dict]) -> dict[str, dict]:
    """{candidate: {task: paired difference, retention and its SE in %}} against the first model."""
    names = list(results)
    baseline = names[0]
    stats: dict[str, dict] = {}
    for name in names[1:]:
        stats[name] = {}
        for task, base_values in per_example.get(baseline, {}).items():
            other = per_example.get(name, {}).get(task)
            base_score = results[baseline][short_name(task)]["value"]
            if not other or not base_score:
                continue
            row = paired_difference(base_values, other)
            row["retention_se_pct"] = retention_se_pct(row, base_score)
            stats[name][short_name(task)] = row
        ses = [row["retention_se_pct"] for row in stats[name].values()]
        if ses:
            stats[name]["mean_retention_se_pct"] = error_of_mean(ses)
    return stats


def accuracy_table(results: dict[str, dict]) -> tuple[list[str], dict[str, float]]:
    """Rows of the printed table (baseline first) and each candidate's mean zero-shot retention."""
    names = list(results)
    baseline, candidates = names[0], names[1:]
    lines = [f"{'task':12} {'metric':16} " + " ".join(f"{n:>9}" for n in names) + " " + " ".join(f"{n + ' ret.':>12}" for n in candidates)]
    retention: dict[str, list[float]] = {n: [] for n in candidates}
    for task, base in results[baseline].items():
        row = f"{task:12} {base['metric']:16} " + " ".join(f"{results[n][task]['value']:9.4f}" for n in names)
        for name in candidates:
            value = results[name][task]["value"]
            if base["higher_is_better"]:
                retention[name].append(100 * value / base["value"])
                row += f" {retention[name][-1]:11.1f}%"
            else:
                row += f" {100 * (value / base['value'] - 1):+11.1f}%"
        lines.append(row)
    means = {name: sum(v) / len(v) for name, v in retention.items() if v}
    if means:  # a perplexity-only run has no accuracy to retain
        lines.append("mean zero-shot retention: " + ", ".join(f"{k} {v:.1f}%" for k, v in means.items()))
    return lines, means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", default="smollm2-135m", help="baseline model (default: the embedded SmolLM2)")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH",
                        help="an artifact of the baseline, repeatable (e.g. awq=out/awq rtn=out/rtn)")
    parser.add_argument("--limit", type=int, default=500, help="first N examples of each task (0: all of them)")
    parser.add_argument("--speed-limit", type=int, default=500, help="examples per task in the speed comparison")
    parser.add_argument("--speed-wikitext-limit", type=int, default=10, help="WikiText-2 articles in the speed comparison")
    parser.add_argument("--speed-tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="accuracy tasks (a subset screens quickly)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--int8-activations", action="append", default=[], metavar="NAME",
                        help="score candidate NAME with --activations int8 (W4A8, as serving runs it); repeatable")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the speed comparison")
    parser.add_argument("--skip-speed", action="store_true", help="only the accuracy comparison")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: results/eval.json, or results/eval_speed.json with --skip-accuracy, so a "
                             "speed-only run never replaces the accuracy results)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("eval_speed.json" if args.skip_accuracy else "eval.json")

    models = {"fp16": args.fp16}
    for item in args.candidate:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--candidate {item!r}: expected NAME=PATH")
        models[name] = path
    tasks = resolve_tasks(args.tasks.split(","))
    limit = args.limit or None
    results, wall, means, paired = {}, {}, {}, {}
    if not args.skip_accuracy:
        per_example: dict[str, dict] = {}
        for name, model in models.items():
            print(f"{name}: {model} ...", flush=True)
            per_example[name] = {}
            activations = "int8" if name in args.int8_activations else "bf16"
            raw, wall[name] = run_tasks(model, tasks, limit, args.dtype, per_example=per_example[name], activations=activations)
            results[name] = {short_name(t): dict(zip(("metric", "higher_is_better", "value"), primary_metric(t, raw[t]))) for t in tasks}
            print(f"  {wall[name]:.0f} s", flush=True)
        lines, means = accuracy_table(results)
        paired = paired_statistics(results, per_example)
        for name, rows in paired.items():
            if not rows:
                continue
            lines.append(f"{name}: retention standard error (paired) " + ", ".join(
                f"{task} {row['retention_se_pct']:.1f}%" for task, row in rows.items() if isinstance(row, dict))
                + f", mean {rows.get('mean_retention_se_pct', float('nan')):.1f}%")
        print("\n" + "\n".join(lines))

    speed_result = None
    if not args.skip_speed:
        speed_tasks = resolve_tasks(args.speed_tasks.split(","))
        print(f"\nspeed: lm-eval hf backend vs QuantkitLM, {args.speed_tasks}, {args.dtype} ...", flush=True)
        limits = {t: args.speed_wikitext_limit if short_name(t) == "wikitext" else args.speed_limit for t in speed_tasks}
        speed_result = speed(resolve_model(args.fp16), speed_tasks, limits, args.dtype)
        print(f"{'task':12} {'limit':>6} {'hf s':>8} {'quantkit s':>11} {'speedup':>8} {'hf value':>9} {'qk value':>9}")
        for task, row in speed_result["per_task"].items():
            print(f"{task:12} {row['limit']:6d} {row['hf']['s']:8.1f} {row['quantkit']['s']:11.1f} {row['speedup']:7.2f}x "
                  f"{row['hf']['value']:9.4f} {row['quantkit']['value']:9.4f}")
        print(f"total: hf {speed_result['total_s']['hf']:.0f} s, quantkit {speed_result['total_s']['quantkit']:.0f} s: "
              f"{speed_result['speedup']:.2f}x (target >= 3x)")

    write_results(args.out, {"limit": limit, "dtype": args.dtype, "models": models, "int8_activations": args.int8_activations,
                             "results": results, "wall_s": wall,
                             "mean_retention_pct": means, "paired": paired, "speed": speed_result})


if __name__ == "__main__":
    main()
