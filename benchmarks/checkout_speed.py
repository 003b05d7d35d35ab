"""Does a change keep the CPU path's speed? This checkout against an earlier commit, interleaved.

    python benchmarks/checkout_speed.py ARTIFACT --base REV [--rounds 7]

Runs offline greedy generation (the engine `quantkit serve` drives) at batch 1 and batch 16 in a
fresh process per measurement, alternating base and this checkout, and reports the medians and
their ratio: on a shared machine only interleaved ratios mean anything. The base is a git worktree
of REV, imported through a shadow package (quantkit/ with runtime/ and kernels/ linked in, as the
installed layout maps them), so both sides use this environment's torch and libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The history of the printing press begins"
SHAPES = {"batch1": (1, 48), "batch16": (16, 24)}  # (sequences, tokens each)


def measure(artifact: str) -> dict:
    import quantkit
    from quantkit.runtime.engine import LLM
    from quantkit.runtime.sampling import SamplingParams

    llm = LLM(artifact)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    out = {"quantkit": str(Path(quantkit.__file__).parent)}
    for name, (batch, tokens) in SHAPES.items():
        start = time.perf_counter()
        outs = llm.generate([f"{PROMPT} {i}" for i in range(batch)], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        out[name] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    return out


def shadow_package(rev: str, root: Path) -> Path:
    """A directory whose quantkit/ is REV's, with its runtime/ and kernels/ linked in."""
    tree = root / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    package = root / "pkg" / "quantkit"
    package.parent.mkdir()
    subprocess.run(["cp", "-r", str(tree / "quantkit"), str(package.parent)], check=True)
    for sub in ("runtime", "kernels"):
        (package / sub).symlink_to(tree / sub)
    return root / "pkg"


def run_side(artifact: str, pythonpath: str | None) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, __file__, artifact, "--measure"], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--base", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--measure", action="store_true", help="(internal) measure the importable quantkit once")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks/results/checkout_speed.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.artifact)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base_path = shadow_package(args.base, Path(tmp))
        try:
            runs = {"base": [], "this": []}
            for i in range(args.rounds):  # alternate which side goes first
                for side in (("base", "this") if i % 2 == 0 else ("this", "base")):
                    runs[side].append(run_side(args.artifact, str(base_path) if side == "base" else None))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / "tree")], check=False)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    table = {}
    print(f"{'shape':<10}{'base tok/s':>12}{'this tok/s':>12}{'this/base':>11}   (medians of {args.rounds} interleaved runs)")
    for name in SHAPES:
        base, this = (statistics.median(r[name] for r in runs[side]) for side in ("base", "this"))
        table[name] = {"base_tok_s": base, "this_tok_s": this, "ratio": this / base,
                       "base_range": [min(r[name] for r in runs["base"]), max(r[name] for r in runs["base"])],
                       "this_range": [min(r[name] for r in runs["this"]), max(r[name] for r in runs["this"])]}
        print(f"{name:<10}{base:>12.1f}{this:>12.1f}{this / base:>10.3f}x")
    write_results(args.output, {"command": " ".join(sys.argv), "artifact": args.artifact, "base": args.base, "this": head,
                                "shapes": SHAPES, "results": table, "runs": runs})


if __name__ == "__main__":
    main()
