"""Peak memory of quantization against model depth: streamed (quantkit quantize) vs whole model in memory.

Synthetic Llamas (hidden 1024, MLP 4096, SmolLM2's 49k vocabulary and tokenizer, random fp16
weights, one shard per block) of increasing depth are quantized, each run in its own process
so that its peak RSS (VmHWM) is its own. "streamed" is `quantkit.pipeline.quantize` (one block
in memory at a time); "in-memory" loads the whole model with transformers first and runs the
same AWQ loop over it, as quantkit did before streaming. Prints a table and writes JSON.

    python benchmarks/streaming.py                          # depths 4 8 16 32, awq and rtn
    python benchmarks/streaming.py --depths 4,8 --methods rtn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import write_results  # noqa: E402
from quantkit.bench.synthetic import checkpoint_bytes, synthetic_llama  # noqa: E402
from quantkit.sources import resolve_model  # noqa: E402

MiB = 2**20

# Run in a child process: prints {"peak_rss": bytes, "seconds": s} as its last line.
CHILD = """
import json, sys, time
from pathlib import Path
mode, model, out, method = sys.argv[1:5]
from quantkit.recipe import Recipe
recipe = Recipe().with_overrides(method=method, group_size=128, samples=32, seqlen=256, search_samples=8)
start = time.perf_counter()
if mode == "streamed":
    from quantkit.pipeline import peak_rss_bytes, quantize
    quantize(model, Path(out), recipe, force=True)
else:
    import torch
    from quantkit.awq import quantize_model
    from quantkit.calibration import build_calibration_set, load_calibration_texts
    from quantkit.models import get_adapter
    from quantkit.pipeline import peak_rss_bytes
    from quantkit.sources import load_model, load_tokenizer
    m = load_model(Path(model), "auto")
    c = recipe.calibration
    ids = None
    if method == "awq":
        texts, _ = load_calibration_texts(c.source)
        ids = build_calibration_set(texts, load_tokenizer(Path(model)), c.samples, c.seqlen, c.seed)
    quantize_model(m, get_adapter("llama"), recipe.quantization, ids)
print(json.dumps({"peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - start}))
"""


def run(mode: str, model: Path, out: Path, method: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(out), method], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} {method} {model.name}: failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--methods", default="awq,rtn")
    parser.add_argument("--modes", default="streamed,in-memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "streaming.json")
    args = parser.parse_args()
    tokenizer_dir = resolve_model("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantkit-streaming-") as tmp:
        for depth in [int(d) for d in args.depths.split(",")]:
            model = synthetic_llama(Path(tmp) / f"llama-{depth}", layers=depth, hidden=1024, intermediate=4096, tokenizer_dir=tokenizer_dir)
            size = checkpoint_bytes(model)
            for method in args.methods.split(","):
                for mode in args.modes.split(","):
                    result = run(mode, model, Path(tmp) / "out", method)
                    rows.append({"depth": depth, "model_bytes": size, "method": method, "mode": mode, **result})
                    print(f"{depth:>5} blocks {size / MiB:>7.0f} MiB  {method:<4} {mode:<9}  peak RSS {result['peak_rss'] / MiB:>7.0f} MiB  {result['seconds']:>6.1f} s", flush=True)

    print("\n| method | mode | " + " | ".join(f"{d} blocks" for d in sorted({r['depth'] for r in rows})) + " |")
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            cells = [r for r in rows if r["method"] == method and r["mode"] == mode]
            print(f"| {method} | {mode} | " + " | ".join(f"{r['peak_rss'] / MiB:.0f} MiB" for r in cells) + " |")
    print("| model size | | " + " | ".join(f"{r['model_bytes'] / MiB:.0f} MiB" for r in rows if r["method"] == rows[0]["method"] and r["mode"] == rows[0]["mode"]) + " |")
    write_results(args.out, {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows, "timestamp": time.time()})


if __name__ == "__main__":
    main()
