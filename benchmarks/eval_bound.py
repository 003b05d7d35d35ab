"""How fast could QuantkitLM evaluate at best? The arithmetic floor of the speed comparison.

For each task of `benchmarks/eval.py`'s speed run (same tasks, same examples), QuantkitLM runs
with its model runner replaced by a counter: lm-eval and QuantkitLM's batching do all their own
work, but no network runs. That gives, per task,
- the work the runtime must do: tokens computed (shared contexts counted once), positions scored
  through the output head, and query-key pairs of causal attention;
- the time of everything else (lm-eval building the task, requests, metrics, and QuantkitLM's
  packing), measured.
The floor is that time plus the FLOPs at the bf16 matmul peak measured in the same run. No
implementation on this machine evaluates faster than the floor; the HF backend's measured time
(from results/eval_speed.json) over the floor is the largest speedup any backend could show.

    python benchmarks/eval_bound.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from common import causal_pairs, machine, matmul_peak, model_flops, write_results  # noqa: E402
from quantkit.eval_tasks import DEFAULT_TASKS, resolve_tasks, task_manager_for  # noqa: E402
from quantkit.evaluate import QuantkitLM, short_name  # noqa: E402
from quantkit.sources import resolve_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class WorkCounter:
    """Stands in for ModelRunner.fill_cache / token_logprobs: counts the work, computes nothing."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tokens = self.scored = self.attention_pairs = 0

    def count(self, step) -> None:
        for ids, start in zip(step.token_ids, step.starts, strict=True):
            self.tokens += len(ids)
            self.attention_pairs += causal_pairs(start, len(ids))

    def fill_cache(self, step) -> None:
        self.count(step)

    def token_logprobs(self, step, rows: torch.Tensor, targets: torch.Tensor, chunk: int = 256):
        self.count(step)
        self.scored += rows.numel()
        return torch.zeros(rows.numel()), torch.zeros(rows.numel(), dtype=torch.bool)


def check_same_kind_of_machine(speed_machine: dict) -> None:
    """The floor adds this machine's matmul peak to the speed run's times: both must come from the
    same kind of CPU (an AVX2-only CPU emulates bf16 matmuls)."""
    here = machine()
    for key in ("cpu", "cores", "cpu_capability", "bf16_instructions"):
        if key in speed_machine and speed_machine[key] != here[key]:
            raise SystemExit(f"the speed run was measured on another kind of machine ({key}: {speed_machine[key]!r}, here {here[key]!r}); "
                             "re-run `python benchmarks/eval.py --skip-accuracy` here first")
    if "cpu_capability" not in speed_machine:
        raise SystemExit("the speed run does not record its CPU capability (it predates that field), so it cannot be matched with "
                         "this machine's peak; re-run `python benchmarks/eval.py --skip-accuracy` here first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--speed", type=Path, default=RESULTS / "eval_speed.json", help="the measured speed run to compare with")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_bound.json")
    args = parser.parse_args()

    measured = json.loads(args.speed.read_text())
    check_same_kind_of_machine(measured.get("machine", {}))
    per_task_measured = measured["speed"]["per_task"] if "speed" in measured else measured["per_task"]
    tasks = resolve_tasks(list(DEFAULT_TASKS))
    peak = matmul_peak()
    print(f"bf16 matmul peak (4096 x 576 -> 3072, {torch.get_num_threads()} threads): {peak / 1e9:.0f} GFLOP/s\n")

    from lm_eval import simple_evaluate

    lm = QuantkitLM(str(resolve_model(args.model)))
    runner = lm.runner
    config = runner.config
    rows = {}
    for task in tasks:
        name = short_name(task)
        counter = WorkCounter(runner.block_size)
        lm.runner = counter
        start = time.perf_counter()
        simple_evaluate(model=lm, tasks=[task], limit=per_task_measured[name]["limit"], task_manager=task_manager_for([task]), log_samples=False,
                        bootstrap_iters=0)
        other_s = time.perf_counter() - start
        work = model_flops(config, counter.tokens, counter.scored, counter.attention_pairs)
        floor = other_s + sum(work.values()) / peak
        hf_s, qk_s = per_task_measured[name]["hf"]["s"], per_task_measured[name]["quantkit"]["s"]
        rows[name] = {"tokens": counter.tokens, "scored": counter.scored, "attention_pairs": counter.attention_pairs,
                      "gflop": {k: v / 1e9 for k, v in work.items()}, "other_s": other_s, "floor_s": floor,
                      "hf_s": hf_s, "quantkit_s": qk_s, "quantkit_over_floor": qk_s / floor, "hf_over_floor": hf_s / floor}
    total = {k: sum(r[k] for r in rows.values()) for k in ("floor_s", "hf_s", "quantkit_s", "other_s")}
    print(f"{'task':11} {'tokens':>8} {'scored':>7} {'TFLOP':>6} {'other s':>7} {'floor s':>7} {'quantkit s':>10} {'hf s':>6} {'qk/floor':>8} {'max speedup':>11}")
    for name, r in rows.items():
        print(f"{name:11} {r['tokens']:8d} {r['scored']:7d} {sum(r['gflop'].values()) / 1e3:6.2f} {r['other_s']:7.1f} {r['floor_s']:7.1f}"
              f" {r['quantkit_s']:10.1f} {r['hf_s']:6.1f} {r['quantkit_over_floor']:7.2f}x {r['hf_over_floor']:10.2f}x")
    print(f"{'all five':11} {'':8} {'':7} {'':6} {total['other_s']:7.1f} {total['floor_s']:7.1f} {total['quantkit_s']:10.1f} {total['hf_s']:6.1f}"
          f" {total['quantkit_s'] / total['floor_s']:7.2f}x {total['hf_s'] / total['floor_s']:10.2f}x")
    write_results(args.out, {"speed_run": str(args.speed), "speed_run_date": measured.get("date"), "matmul_peak_flops": peak,
                             "per_task": rows, "total": total, "max_speedup_over_hf": total["hf_s"] / total["floor_s"]})


if __name__ == "__main__":
    main()
