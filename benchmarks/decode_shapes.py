"""Batch-1 decode step, int4 vs bf16, on a bigger model's shapes: Qwen3-0.6B's (random weights).

The default model is small (135M, hidden 576) and its vocabulary modest; what int4 saves per step
depends on the shapes: the linears shrink 4x, the output head (151,936 x 1,024 for Qwen3-0.6B,
tied to the embeddings) stays dense unless its int8 copy is asked for. The weights are random
(no hub access here); speed does not depend on their values. The model is built once in the cache
(bf16 safetensors, the SmolLM2 tokenizer for RTN's bookkeeping), quantized with RTN at group 128,
then both formats run the runtime's decode step at context 256, interleaved step by step, with
the layers in one C++ call and as modules, with the dense and the int8 output head, on one thread
and on all (the runtime decodes int4 on one, dense bf16 on all: kernels/threads.py).

    python benchmarks/decode_shapes.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import decode_step_input, decode_threads, linear_weight_bytes, write_results  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, bos_token_id=None, pad_token_id=None, eos_token_id=0)


def build(out: Path) -> None:
    """A random Qwen3-0.6B-shaped checkpoint in bf16, with the SmolLM2 tokenizer's files."""
    import shutil

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantkit.sources import resolve_model

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B)).to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in resolve_model("smollm2-135m").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "quantkit" / "bench" / "qwen3-0.6b-random")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_shapes.json")
    args = parser.parse_args()

    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe
    from quantkit.runtime.model_runner import ModelRunner
    from quantkit.runtime.weights import load_weights

    dense_dir, int4_dir = args.dir / "bf16", args.dir / "rtn-g128"
    if not (dense_dir / "config.json").is_file():
        build(dense_dir)
    if not (int4_dir / "quantkit.json").is_file():
        quantize(str(dense_dir), int4_dir, Recipe().with_overrides(method="rtn", group_size=128, samples=4, seqlen=64), force=True)

    # (format, head) -> (runner, its fused decoder, the step); each is timed with the layers in one
    # C++ call and as modules, every variant one step in turn (this machine drifts within minutes).
    models = {}
    for fmt, path in (("int4", int4_dir), ("bf16", dense_dir)):
        for head in ("dense_head", "int8_head"):
            runner = ModelRunner(load_weights(path), torch.bfloat16, block_size=16, num_blocks=32, int8_head=head == "int8_head")
            step = decode_step_input(runner)
            models[fmt, head] = (runner, runner.model.fused_decoder, lambda runner=runner, step=step: runner.run(step))
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for (fmt, head), (runner, decoder, run) in models.items():
                for layers in ("one_call", "modules"):
                    for threads in ("one_thread", "all_threads"):  # int4 decodes on one, dense bf16 on all (kernels/threads.py)
                        runner.model.fused_decoder = decoder if layers == "one_call" else None
                        with decode_threads("one" if threads == "one_thread" else "all"):
                            t0 = time.perf_counter()
                            run()
                            times.setdefault(f"{fmt}_{head}_{layers}_{threads}", []).append(time.perf_counter() - t0)
    step = {name: statistics.median(t) for name, t in times.items()}
    bytes_ = {fmt: linear_weight_bytes(models[fmt, "dense_head"][0].model) for fmt in ("int4", "bf16")}
    print(f"Qwen3-0.6B shapes (random weights), batch-1 decode step at context 256, {args.rounds} interleaved rounds, medians:")
    print(f"  decoder linears: int4 {bytes_['int4'] / 1e6:.0f} MB, bf16 {bytes_['bf16'] / 1e6:.0f} MB; head 151936 x 1024: "
          f"bf16 {151936 * 1024 * 2 / 1e6:.0f} MB, int8 {151936 * 1024 * (1 + 2 / 32) / 1e6:.0f} MB")
    for head in ("dense_head", "int8_head"):
        for layers in ("one_call", "modules"):
            for threads in ("one_thread", "all_threads"):
                i4, bf = step[f"int4_{head}_{layers}_{threads}"], step[f"bf16_{head}_{layers}_{threads}"]
                print(f"  {head:10} {layers:8} {threads:11}: int4 {i4 * 1e3:7.2f} ms, bf16 {bf * 1e3:7.2f} ms, int4 speedup {bf / i4:.2f}x")
        best = {fmt: min(t for n, t in step.items() if n.startswith(f"{fmt}_{head}_")) for fmt in ("int4", "bf16")}
        print(f"  {head:10} each format at its fastest: int4 {best['int4'] * 1e3:7.2f} ms, bf16 {best['bf16'] * 1e3:7.2f} ms,"
              f" int4 speedup {best['bf16'] / best['int4']:.2f}x")
    write_results(args.out, {"config": QWEN3_0_6B, "rounds": args.rounds, "linear_weight_bytes": bytes_, "step_s": step})


if __name__ == "__main__":
    main()
