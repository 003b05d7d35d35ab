"""How closely artifacts follow the full-precision model, on text that neither calibration nor
evaluation uses: a quick screen between quantization variants before a full lm-eval run.

Held-out text: LAMBADA development passages that the default calibration set (128 x 512 tokens,
seed 0, drawn from the same shuffled passages) never reaches. Every model scores the same passages
in fp32 through transformers (the artifact's dequantized weights), so bf16 rounding plays no part.
Per model, against the full-precision one:
- KL divergence of the next-token distributions, averaged over every predicted token;
- top-1 agreement: how often both predict the same next token;
- last-word accuracy: whether greedy decoding yields a passage's last word (LAMBADA's task, on
  its development passages), and its retention against the full-precision model's.

    python benchmarks/fidelity.py --candidate awq=/path/to/artifact --candidate gptq=/path/... [--passages 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import write_results  # noqa: E402
from quantkit.artifact import load_artifact, load_dequantized_model  # noqa: E402
from quantkit.calibration import load_calibration_texts, unread_documents  # noqa: E402
from quantkit.evaluate import paired_difference, retention_se_pct  # noqa: E402
from quantkit.recipe import CalibrationSettings  # noqa: E402
from quantkit.sources import load_model, load_tokenizer, resolve_model  # noqa: E402


def held_out_passages(tokenizer, n: int) -> list[str]:
    """The last `n` passages of the default calibration's shuffled order, all past what it reads."""
    defaults = CalibrationSettings()
    docs = unread_documents(load_calibration_texts(None)[0], tokenizer, defaults.samples, defaults.seqlen, defaults.seed)
    if n > len(docs):
        raise SystemExit(f"only {len(docs)} passages lie outside the calibration set; ask for fewer")
    return docs[len(docs) - n :]


def split_last_word(passage: str) -> tuple[str, str]:
    context, word = passage.rstrip().rsplit(" ", 1)
    return context, " " + word


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--candidate", action="append", required=True, metavar="NAME=ARTIFACT")
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=Path("results/fidelity.json"))
    opts = parser.parse_args()

    model_dir = resolve_model(opts.model)
    tokenizer = load_tokenizer(model_dir)
    models = {"full precision": load_model(model_dir, torch.float16).float().eval()}
    for spec in opts.candidate:
        name, _, path = spec.partition("=")
        models[name] = load_dequantized_model(load_artifact(Path(path))).eval()
    passages = held_out_passages(tokenizer, opts.passages)

    kl_sum = {name: 0.0 for name in models}
    agree = {name: 0 for name in models}
    last_word: dict[str, dict[int, float]] = {name: {} for name in models}  # passage -> 1.0 if right
    predicted = 0
    start = time.perf_counter()
    for index, passage in enumerate(passages):
        context, word = split_last_word(passage)
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        word_ids = tokenizer(context + word, add_special_tokens=False)["input_ids"][len(context_ids) :]
        ids = torch.tensor([context_ids + word_ids])
        predicted += ids.shape[1] - 1
        reference = None
        for name, model in models.items():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            greedy = logprobs.argmax(-1)
            right = bool((greedy[len(context_ids) - 1 :] == torch.tensor(word_ids)).all())
            if reference is None:
                reference = (logprobs, greedy)
            kl_sum[name] += float((reference[0].exp() * (reference[0] - logprobs)).sum())
            agree[name] += int((greedy == reference[1]).sum())
            last_word[name][index] = float(right)
    seconds = time.perf_counter() - start

    base = last_word["full precision"]
    base_accuracy = sum(base.values()) / len(passages)
    rows = {}
    print(f"{len(passages)} held-out LAMBADA-dev passages, {predicted} predicted tokens, {seconds:.0f} s\n")
    print(f"{'model':24}{'KL (nats)':>11}{'top-1 agree':>13}{'last word':>11}{'retention':>11}{'lost':>6}{'gained':>8}")
    for name in models:
        pair = paired_difference(base, last_word[name])
        accuracy = sum(last_word[name].values()) / len(passages)
        se = retention_se_pct(pair, base_accuracy) or 0.0
        rows[name] = {
            "kl_mean": kl_sum[name] / predicted,
            "top1_agreement": agree[name] / predicted,
            "last_word_accuracy": accuracy,
            "last_word_retention_pct": 100 * accuracy / base_accuracy if base_accuracy else float("nan"),
            "retention_se_pct": se,  # paired: only the passages the two models disagree on vary
            "lost": pair["flipped_to_wrong"],
            "gained": pair["flipped_to_right"],
        }
        r = rows[name]
        print(f"{name:24}{r['kl_mean']:>11.5f}{100 * r['top1_agreement']:>12.2f}%{accuracy:>11.4f}"
              f"{r['last_word_retention_pct']:>8.1f}±{se:<3.1f}{r['lost']:>5}{r['gained']:>8}")
    write_results(opts.json, {
        "model": opts.model,
        "passages": len(passages),
        "predicted_tokens": predicted,
        "seconds": seconds,
        "candidates": dict(spec.partition("=")[::2] for spec in opts.candidate),
        "rows": rows,
    })


if __name__ == "__main__":
    main()
