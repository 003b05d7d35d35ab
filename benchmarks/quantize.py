"""Quantization receipts: perplexity FP16 vs RTN vs AWQ (and AWQ ablations), wall time, peak RSS.

Each variant runs `quantkit quantize` in its own process (so its wall time and peak RSS are
its own), then the artifact is dequantized and scored with the WikiText-2 protocol of
quantkit/perplexity.py. Prints a table and writes JSON.

    python benchmarks/quantize.py                       # all variants, 16 windows of 2048
    python benchmarks/quantize.py --variants rtn,awq --windows 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402

from common import write_results  # noqa: E402
from quantkit.artifact import load_artifact, load_dequantized_model  # noqa: E402
from quantkit.perplexity import perplexity, wikitext_windows  # noqa: E402
from quantkit.sources import load_model, load_tokenizer, resolve_model  # noqa: E402

# name -> (recipe overrides of the quantization section, extra environment). Every AWQ
# variant calibrates on the default 128 x 512 tokens unless it says otherwise.
VARIANTS: dict[str, tuple[dict, dict[str, str]]] = {
    "rtn": ({"method": "rtn"}, {}),
    "awq": ({}, {}),  # quantkit's defaults: AutoAWQ's order (every search on the fp block), symmetric clip
    "awq-sequential": ({"sequential": True}, {}),  # later groups searched on the quantized earlier ones
    "awq-range-clip": ({"clip_style": "range"}, {}),
    "awq-noclip": ({"clip": False}, {}),
    "awq-search4": ({"search_samples": 4}, {}),
    "awq-search64": ({"search_samples": 64}, {}),
    "awq-stats16": ({"calibration": {"samples": 16}}, {}),  # statistics from the 16 search samples only
    "awq-duo": ({"duo_scaling": True}, {}),
    "awq-sink1": ({"sink_tokens": 1}, {}),
    "awq-gptq": ({"rounding": "gptq"}, {}),  # AWQ's scales, clipping and grid; codes rounded in GPTQ's order
    "awq-gptq-act": ({"rounding": "gptq", "gptq_act_order": True}, {}),  # columns of the largest inputs rounded first
    "awq-gptq-act-seq": ({"rounding": "gptq", "gptq_act_order": True, "sequential": True}, {}),
    "awq-omp-active": ({}, {"OMP_WAIT_POLICY": "ACTIVE"}),  # same work, spinning OpenMP waits
}


def run_variant(name: str, model: str, workdir: Path, group_size: int) -> dict:
    overrides, env = VARIANTS[name]
    overrides = dict(overrides)
    calibration = overrides.pop("calibration", {})
    recipe = workdir / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({"name": name, "quantization": {"group_size": group_size, **overrides}, "calibration": calibration}))
    out = workdir / name
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", model, "-o", str(out), "--force", "--recipe", str(recipe)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{name}: quantize failed\n{proc.stderr[-2000:]}")
    manifest = load_artifact(out).manifest
    return {
        "recipe": {"quantization": overrides, "calibration": calibration},
        "env": env,
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_bytes": manifest["peak_rss_bytes"],
        "timings": manifest["timings"],
        "artifact": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--windows", type=int, default=16, help="2048-token WikiText-2 windows scored")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/artifacts"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/quantize.json"))
    opts = parser.parse_args()
    names = opts.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    # Quantize everything first, while this process is still small: its memory must not
    # compete with the children's, whose wall time and peak RSS are measured.
    rows: dict = {}
    for name in names:
        rows[name] = run_variant(name, opts.model, opts.workdir, opts.group_size)
        print(f"{name:16} quantize {rows[name]['wall_s']:6.1f} s  peak RSS {rows[name]['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)

    model_dir = resolve_model(opts.model)
    windows = wikitext_windows(load_tokenizer(model_dir), 2048, opts.windows)
    baseline = perplexity(load_model(model_dir, torch.float16).float(), windows)
    print(f"fp16 perplexity {baseline.perplexity:.3f} ({baseline.windows} x {baseline.window} tokens, {baseline.seconds:.0f} s)", flush=True)
    rows["fp16"] = {"perplexity": baseline.perplexity, "eval_s": baseline.seconds}
    for name in names:
        row = rows[name]
        result = perplexity(load_dequantized_model(load_artifact(Path(row["artifact"]))), windows)
        row.update(perplexity=result.perplexity, eval_s=result.seconds, increase_pct=100 * (result.perplexity / baseline.perplexity - 1))
        print(f"{name:16} ppl {result.perplexity:8.3f}  {row['increase_pct']:+6.2f}%", flush=True)

    print()
    print(f"{'variant':16}{'perplexity':>12}{'vs fp16':>10}{'wall s':>9}{'peak RSS':>11}")
    print(f"{'fp16':16}{baseline.perplexity:>12.3f}{'':>10}{'':>9}{'':>11}")
    for name in names:
        r = rows[name]
        print(f"{name:16}{r['perplexity']:>12.3f}{r['increase_pct']:>+9.2f}%{r['wall_s']:>9.1f}{r['peak_rss_bytes'] / 2**20:>8.0f} MiB")
    if "rtn" in rows and "awq" in rows:
        ratio = rows["awq"]["increase_pct"] / rows["rtn"]["increase_pct"]
        print(f"\nAWQ's perplexity increase is {ratio:.2f}x RTN's (target: at most 0.5x)")
        rows["awq_over_rtn_increase"] = ratio

    write_results(opts.json, {
        "model": opts.model,
        "group_size": opts.group_size,
        "protocol": f"WikiText-2 raw test, first {baseline.windows} windows of {baseline.window} tokens, fp32 compute",
        "results": rows,
    })


if __name__ == "__main__":
    main()
