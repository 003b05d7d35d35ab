"""The int8 output head (`quantkit serve --int8-head`): speed against the dense bf16 head, and its effect on predictions.

Speed: one call of the default model's head (49,152 x 576) at M = 1 ... 64 rows: the dense bf16 head
as the runtime calls it (quantkit's GEMV up to 4 rows, oneDNN above) against the int8 GEMV,
alternating call by call, all threads. The head is 56.6 MB (bf16) or 30.1 MB (int8): read from
memory on every call.

Effect: WikiText-2 windows of the perplexity protocol (quantkit/perplexity.py) through the runtime
in bf16, for the FP16 model and for an int4 artifact. Every position's final hidden state goes
through both heads, the int8 one in calls of INT8_HEAD_MAX_ROWS rows as decode would make them;
reported: perplexity with each head, how often the top-1 token agrees, the largest logit difference.

    python benchmarks/int8_head.py ARTIFACT [--windows 16]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import write_results  # noqa: E402
from quantkit.kernels.linear import INT8_HEAD_MAX_ROWS, dense_linear, int8_linear  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64)


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def head_speed(head, calls: int) -> list[dict]:
    out = []
    for m in ROWS:
        x = torch.randn(m, head.weight.shape[1]).to(torch.bfloat16)
        dense, int8 = [], []
        for _ in range(5):  # alternate, so both see the same machine
            dense.append(median_ms(lambda: dense_linear(x, head.weight), calls))
            int8.append(median_ms(lambda: int8_linear(x, head.int8), calls))
        d, i = sorted(dense)[2], sorted(int8)[2]
        out.append({"rows": m, "dense_ms": d, "int8_ms": i, "speedup": d / i,
                    "dense_gbps": head.weight.numel() * 2 / d / 1e6, "int8_gbps": head.int8.nbytes() / i / 1e6})
        print(f"  M={m:<3} dense {d:6.2f} ms ({out[-1]['dense_gbps']:5.1f} GB/s)  int8 {i:6.2f} ms ({out[-1]['int8_gbps']:5.1f} GB/s)  {d / i:.2f}x")
    return out


@torch.inference_mode()
def head_effect(runner, windows: torch.Tensor) -> dict:
    from quantkit.runtime.model_runner import StepInput

    head = runner.model.lm_head
    nll = {"dense": 0.0, "int8": 0.0}
    agree, count, max_diff = 0, 0, 0.0
    table = list(range(runner.num_blocks))
    for row in windows:
        hidden, _ = runner._forward(StepInput([row.tolist()], [0], [table], [False]))
        targets = row[1:]
        for start in range(0, len(targets), 256):
            h, t = hidden[start : start + min(256, len(targets) - start)], targets[start : start + 256]
            dense = dense_linear(h, head.weight).float()
            int8 = torch.cat([int8_linear(h[i : i + INT8_HEAD_MAX_ROWS], head.int8) for i in range(0, len(h), INT8_HEAD_MAX_ROWS)]).float()
            for name, logits in (("dense", dense), ("int8", int8)):
                nll[name] += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
            agree += int((dense.argmax(-1) == int8.argmax(-1)).sum())
            max_diff = max(max_diff, float((dense - int8).abs().max()))
            count += len(t)
    return {"perplexity_dense_head": math.exp(nll["dense"] / count), "perplexity_int8_head": math.exp(nll["int8"] / count),
            "top1_agreement": agree / count, "max_abs_logit_diff": max_diff, "tokens": count}


def main() -> None:
    from quantkit.perplexity import wikitext_windows
    from quantkit.runtime.model_runner import ModelRunner
    from quantkit.runtime.weights import load_weights
    from quantkit.sources import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="int4 artifact of the default model")
    parser.add_argument("--windows", type=int, default=16, help="2048-token WikiText-2 windows (the protocol's 16)")
    parser.add_argument("--calls", type=int, default=30, help="calls per speed measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_head.json")
    args = parser.parse_args()

    results: dict = {"artifact": str(args.artifact), "int8_head_max_rows": INT8_HEAD_MAX_ROWS}
    for name, spec in (("fp16_model", "smollm2-135m"), ("int4_artifact", str(args.artifact))):
        weights = load_weights(spec)
        runner = ModelRunner(weights, torch.bfloat16, block_size=16, num_blocks=128, int8_head=True)
        head = runner.model.lm_head
        if name == "fp16_model":
            print(f"head: dense {head.weight.numel() * 2 / 1e6:.1f} MB, int8 {head.int8.nbytes() / 1e6:.1f} MB; one call, {torch.get_num_threads()} threads:")
            results["speed"] = head_speed(head, args.calls)
        windows = wikitext_windows(load_tokenizer(weights.path), 2048, args.windows)
        start = time.perf_counter()
        effect = head_effect(runner, windows)
        effect["seconds"] = time.perf_counter() - start
        results[name] = effect
        print(f"{name}: WikiText-2 perplexity ({len(windows)} x 2048, bf16) dense head {effect['perplexity_dense_head']:.4f}, "
              f"int8 head {effect['perplexity_int8_head']:.4f} ({100 * (effect['perplexity_int8_head'] / effect['perplexity_dense_head'] - 1):+.3f}%); "
              f"top-1 agreement {100 * effect['top1_agreement']:.2f}% of {effect['tokens']} tokens; largest logit difference {effect['max_abs_logit_diff']:.3f}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
