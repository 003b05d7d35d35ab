"""The GPU receipts of issue 27 in one run (about 8 minutes on a bare H100), written as JSON.

Sections, each timed and recorded on its own (a failing one records its error, the rest go on):
  gemm       Triton W4A16 GEMM vs cuBLAS fp16 (dense weights) vs Triton dequantize + cuBLAS, at
             M = 1, 16, 256, 1024 on Llama-3-8B's linear shapes (g128); at M = 1 the weight bytes
             per second and their share of the HBM bandwidth measured here (a device copy)
  decode     decode tok/s of a random-weight int4 Llama-3-8B-shaped model, CUDA graphs vs eager,
             at batch 1, 16 and 64 over 512-token contexts; the share of HBM bandwidth at batch 1
  serving    64 requests through the engine, continuous batching vs one at a time, and Hugging
             Face `generate` one at a time (a subset: it is slow), on a random-weight model of
             SmolLM2-135M's config quantized on the GPU (`quantkit quantize --device cuda`)
  agreement  the same artifact's greedy tokens on CUDA and on the CPU (float32 and bfloat16)
  awq_block  seconds of AWQ (scale and clip search, rounding) for one Llama-3-8B decoder block

Random weights: the figures measure speed and agreement of the code paths, not a model's
quality. Run by benchmarks/gpu_check.sh on the device machine; on CPU, `--smoke` runs every
section on tiny shapes (Triton in its interpreter) to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
# --smoke's shape; SmolLM2's vocabulary, so the carried tokenizer fits it
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=49152, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
GROUP_SIZE = 128  # --smoke: SMOKE_GROUP_SIZE (its layers are narrower than 128)
SMOKE_GROUP_SIZE = 32


def llama_config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "torch_dtype": "bfloat16",
            "head_dim": shape["hidden_size"] // shape["num_attention_heads"], "bos_token_id": 1, "eos_token_id": 2, **shape}


def timed(fn, device: str, repeat: int = 20) -> float:
    """Mean seconds of fn() after warm-up (CUDA events on a GPU)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def hbm_bytes_per_second(device: str, smoke: bool) -> float:
    """Device-to-device copy, bytes read plus written per second: the bandwidth figures are shares of."""
    n = (1 << 20) if smoke else (1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / timed(lambda: b.copy_(a), device, repeat=3 if smoke else 20)


def group_size(smoke: bool) -> int:
    return SMOKE_GROUP_SIZE if smoke else GROUP_SIZE


def random_awq(k: int, n: int, device: str, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random AWQ GEMM tensors: qweight [K, N/8], qzeros [K/g, N/8] int32 (every nibble random), scales [K/g, N] fp16."""
    words = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
    zeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(k // group, n, device=device) * 0.01 + 0.002).half()
    return words, zeros, scales


# ---------------------------------------------------------------------------- sections
def section_gemm(device: str, smoke: bool) -> dict:
    from quantkit.kernels.triton_gemm import awq_dequantize, w4a16_gemm

    h, i = (LLAMA3_8B if not smoke else TINY)["hidden_size"], (LLAMA3_8B if not smoke else TINY)["intermediate_size"]
    kv = 8 * 128 if not smoke else 32
    shapes = {"qkv": (h, h + 2 * kv), "o": (h, h), "gate_up": (h, 2 * i), "down": (i, h)}
    rows = (1, 16, 256, 1024) if not smoke else (1, 16)
    bandwidth = hbm_bytes_per_second(device, smoke)
    out = {"hbm_bytes_per_s_copy": bandwidth, "group_size": group_size(smoke), "shapes": {}}
    repeat = 3 if smoke else 50
    for name, (k, n) in shapes.items():
        qw, qz, s = random_awq(k, n, device, group_size(smoke))
        dense = awq_dequantize(qw, qz, s, torch.float16).t().contiguous()  # [N, K]: what cuBLAS reads as a dense layer
        packed_bytes = qw.numel() * 4 + qz.numel() * 4 + s.numel() * 2
        per_m = {}
        for m in rows:
            x = torch.randn(m, k, device=device).half()
            exact = x.float() @ dense.float().t()
            got = w4a16_gemm(x, qw, qz, s)
            rel = float((got.float() - exact).norm() / exact.norm())
            t_gemm = timed(lambda: w4a16_gemm(x, qw, qz, s), device, repeat)
            t_cublas = timed(lambda: torch.nn.functional.linear(x, dense), device, repeat)
            t_deq = timed(lambda: x @ awq_dequantize(qw, qz, s, torch.float16), device, repeat)
            per_m[m] = {"w4a16_us": t_gemm * 1e6, "cublas_fp16_us": t_cublas * 1e6, "dequantize_cublas_us": t_deq * 1e6,
                        "w4a16_vs_cublas": t_cublas / t_gemm, "rel_error_vs_fp32": rel}
            if m == 1:
                per_m[m]["weight_bytes_per_s"] = packed_bytes / t_gemm
                per_m[m]["hbm_fraction"] = packed_bytes / t_gemm / bandwidth
        out["shapes"][name] = {"k": k, "n": n, "rows": per_m}
        print(f"gemm {name} {k}x{n}: " + ", ".join(f"M={m} {r['w4a16_us']:.1f}us (cuBLAS {r['cublas_fp16_us']:.1f}, deq+cuBLAS "
                                                   f"{r['dequantize_cublas_us']:.1f})" for m, r in per_m.items()), flush=True)
    # the crossover the backend's TRITON_DENSE_FROM_ROWS stands for: the first M where dequantize + cuBLAS wins on every shape
    wins = [m for m in rows if all(s["rows"][m]["dequantize_cublas_us"] < s["rows"][m]["w4a16_us"] for s in out["shapes"].values())]
    out["dense_wins_from_rows"] = min(wins) if wins else None
    return out


def random_int4_weights(shape: dict, device: str, dtype: torch.dtype, group: int):
    """ModelWeights of a random int4 Llama of `shape`, made on the device (an 8B model in seconds)."""
    from quantkit.runtime.weights import ModelWeights

    config = llama_config(shape)
    h, i, d = shape["hidden_size"], shape["intermediate_size"], config["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    tensors = {"model.embed_tokens.weight": (torch.randn(shape["vocab_size"], h, device=device) * 0.02).to(dtype),
               "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
    if not shape["tie_word_embeddings"]:
        tensors["lm_head.weight"] = (torch.randn(shape["vocab_size"], h, device=device) * 0.02).to(dtype)
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        for name, (k, n) in {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                             "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}.items():
            tensors[f"{p}.{name}.qweight"], tensors[f"{p}.{name}.qzeros"], tensors[f"{p}.{name}.scales"] = random_awq(k, n, device, group)
    return ModelWeights(Path("random-int4"), config, tensors, quantized=True)


def section_decode(device: str, smoke: bool) -> dict:
    from quantkit.runtime.model_runner import ModelRunner, RunnerLimits, StepInput

    shape = LLAMA3_8B if not smoke else TINY
    batches = (1, 16, 64) if not smoke else (1, 4)
    context, steps, block = (512, 32, 16) if not smoke else (32, 4, 16)
    weights = random_int4_weights(shape, device, torch.bfloat16, group_size(smoke))
    weight_bytes = sum(t.numel() * t.element_size() for n, t in weights.tensors.items() if n != "model.embed_tokens.weight")
    bandwidth = hbm_bytes_per_second(device, smoke)
    blocks_per_seq = -(-(context + steps + 1) // block)
    results = {"model": "random int4 Llama-3-8B shape" if not smoke else "tiny", "context": context, "weight_bytes_per_step": weight_bytes}
    for eager in (True, False):
        limits = RunnerLimits(max_num_seqs=max(batches), max_num_batched_tokens=2048, enforce_eager=eager,
                              decode_graphs="cuda" if device == "cuda" else "emulated")
        runner = ModelRunner(weights, torch.bfloat16, block, num_blocks=max(batches) * blocks_per_seq + 1, device=device, limits=limits)
        for bs in batches:
            tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(bs)]
            gen = torch.Generator().manual_seed(bs)
            prompt = torch.randint(0, shape["vocab_size"], (bs, context), generator=gen).tolist()
            for s in range(bs):  # prefill one sequence a step: the largest step stays within max_num_batched_tokens
                runner.run(StepInput([prompt[s]], [0], [tables[s]], [True]))
            position, tokens = context, [[7] for _ in range(bs)]

            def decode_step():
                nonlocal position
                logits = runner.run(StepInput(tokens, [position] * bs, tables, [True] * bs))
                position = position + 1 if position + 1 < context + steps else context  # overwrite, never overflow the tables
                return logits

            decode_step()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                decode_step().argmax(-1).tolist()  # as the engine: tokens come back to the host each step
            seconds = (time.perf_counter() - t0) / steps
            key = f"{'eager' if eager else 'cuda_graphs'}_batch{bs}"
            results[key] = {"step_ms": seconds * 1e3, "tok_per_s": bs / seconds}
            if bs == 1:
                results[key]["hbm_fraction"] = weight_bytes / seconds / bandwidth
            print(f"decode {key}: {seconds * 1e3:.2f} ms/step, {bs / seconds:.0f} tok/s", flush=True)
        runner = None  # free its cache before the next variant allocates one
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def build_random_model(shape: dict, tokenizer_dir: Path | None, out: Path) -> Path:
    """A random-weight Hugging Face Llama of `shape`, saved with a real tokenizer where one is given."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in llama_config(shape).items() if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, out / name)
    return out


def quantize_on(model_dir: Path, out: Path, device: str, smoke: bool) -> tuple[Path, float]:
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    recipe = Recipe().with_overrides(group_size=group_size(smoke), samples=32 if not smoke else 4, seqlen=512 if not smoke else 64)
    t0 = time.perf_counter()
    quantize(str(model_dir), out, recipe, force=True, device=device)
    return out, time.perf_counter() - t0


def section_serving(device: str, smoke: bool, work: Path, tokenizer_dir: Path | None) -> dict:
    import transformers

    from quantkit.runtime.engine import EngineConfig, LLMEngine
    from quantkit.runtime.sampling import SamplingParams

    shape = SMOLLM2_135M if not smoke else TINY
    dense = build_random_model(shape, tokenizer_dir, work / "dense")
    artifact, quantize_seconds = quantize_on(dense, work / "int4", device, smoke)
    n_requests, prompt_len, max_tokens = (64, 256, 128) if not smoke else (4, 16, 4)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, shape["vocab_size"], (prompt_len,), generator=gen).tolist() for _ in range(n_requests)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    results = {"model": "random SmolLM2-135M shape, AWQ int4 quantized on " + device, "quantize_seconds": quantize_seconds,
               "requests": n_requests, "prompt_tokens": prompt_len, "max_tokens": max_tokens}
    for mode, seqs in (("continuous", 64), ("one_at_a_time", 1)):
        engine = LLMEngine(EngineConfig(model=str(artifact), device=device, max_num_seqs=seqs, max_num_batched_tokens=2048,
                                        max_waiting=n_requests))
        engine.add_request(prompts[0][:8], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up (kernels compile)
        while engine.has_unfinished():
            engine.step()
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        generated = 0
        while engine.has_unfinished():
            generated += sum(1 for out in engine.step() if out.token_ids)
        seconds = time.perf_counter() - t0
        results[mode] = {"seconds": seconds, "output_tok_per_s": n_requests * max_tokens / seconds, "kv_blocks": engine.runner.num_blocks}
        print(f"serving {mode}: {n_requests * max_tokens / seconds:.0f} output tok/s", flush=True)
        del engine
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).to(device)
    subset = 8 if not smoke else 2
    t0 = time.perf_counter()
    for p in prompts[:subset]:
        hf.generate(torch.tensor([p], device=device), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    seconds = time.perf_counter() - t0
    results["hf_generate_one_at_a_time"] = {"requests": subset, "seconds": seconds, "output_tok_per_s": subset * max_tokens / seconds,
                                            "weights": "dense bf16 (the model before quantization)"}
    results["continuous_vs_one_at_a_time"] = results["continuous"]["output_tok_per_s"] / results["one_at_a_time"]["output_tok_per_s"]
    results["continuous_vs_hf"] = results["continuous"]["output_tok_per_s"] / results["hf_generate_one_at_a_time"]["output_tok_per_s"]
    return results


def section_agreement(device: str, smoke: bool, work: Path) -> dict:
    from quantkit.runtime.engine import LLM
    from quantkit.runtime.sampling import SamplingParams

    artifact = work / "int4"
    if not artifact.is_dir():
        raise RuntimeError("the serving section makes the artifact this section reads; it did not run")
    gen = torch.Generator().manual_seed(1)
    vocab = (SMOLLM2_135M if not smoke else TINY)["vocab_size"]
    prompts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (5, 17, 40, 64, 100, 130, 200, 255)]
    params = SamplingParams(temperature=0, max_tokens=32 if not smoke else 4, ignore_eos=True)
    results = {}
    for dtype in ("float32", "bfloat16"):
        tokens = {}
        for where in (device, "cpu"):
            llm = LLM(str(artifact), dtype=dtype, device=where)
            tokens[where] = [out.token_ids for out in llm.generate(prompts, params)]
            del llm
        same = sum(a == b for x, y in zip(tokens[device], tokens["cpu"]) for a, b in zip(x, y))
        total = sum(len(x) for x in tokens["cpu"])
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens[device], tokens["cpu"])]
        results[dtype] = {"tokens_equal": same / total, "sequences_identical": sum(p == len(x) for p, x in zip(prefix, tokens["cpu"])),
                          "sequences": len(prompts), "first_divergence": prefix}
        print(f"agreement {dtype}: {same}/{total} tokens, {results[dtype]['sequences_identical']}/{len(prompts)} sequences identical", flush=True)
    return results


def section_awq_block(device: str, smoke: bool) -> dict:
    from quantkit.pipeline import time_block_quantization

    shape = LLAMA3_8B if not smoke else TINY
    samples, seqlen = (128, 512) if not smoke else (4, 32)
    time_block_quantization(llama_config(shape), device=device, num_samples=8, seqlen=seqlen)  # warm-up: CUDA start-up, kernels compile
    timing = time_block_quantization(llama_config(shape), device=device, num_samples=samples, seqlen=seqlen)
    return {"config": "Llama-3-8B" if not smoke else "tiny", "samples": samples, "seqlen": seqlen, **dataclasses.asdict(timing)}


SECTIONS = ("gemm", "decode", "serving", "agreement", "awq_block")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--tokenizer", type=Path, help="a directory with tokenizer.json (SmolLM2's, carried to the device)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")) / "gpu_check.json")
    args = parser.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device, "smoke": args.smoke,
              "torch": torch.__version__, "sections": {}}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30, "sms": props.multi_processor_count}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            t0 = time.perf_counter()
            try:
                if name == "serving":
                    result = section_serving(args.device, args.smoke, Path(tmp), args.tokenizer)
                elif name == "agreement":
                    result = section_agreement(args.device, args.smoke, Path(tmp))
                else:
                    result = globals()[f"section_{name}"](args.device, args.smoke)
                report["sections"][name] = {"ok": True, "seconds": time.perf_counter() - t0, **result}
            except Exception as e:  # one section's failure must not lose the others' receipts
                traceback.print_exc()
                report["sections"][name] = {"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
            args.out.write_text(json.dumps(report, indent=1, default=str))
            print(f"== {name}: {'ok' if report['sections'][name]['ok'] else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if all(s["ok"] for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
