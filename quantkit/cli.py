"""The `quantkit` command line: it parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import os

# Decided deliberately, before torch loads OpenMP: with spinning (ACTIVE) waits, two threads
# on two cores stall ~16 ms per parallel op whenever any other process wants a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from .bench.offline import MODES as _OFFLINE_MODES  # noqa: E402  (cheap: no torch, no httpx)
from .errors import QuantkitError  # noqa: E402
from .export_formats import COMPRESSED_TENSORS, SUPPORTED_FORMATS  # noqa: E402


class _Group(click.Group):
    """Turns QuantkitError into a one-line message and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="quantkit")
def main() -> None:
    """quantkit: AWQ int4 quantization, packaging, evaluation and serving."""


# --device on every command that runs a model. The choices are kernels/backend.py's DEVICES,
# spelled out: importing it here would load torch for every command (even --help).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _activations_option(f):
    # kernels/backend.py's ACTIVATIONS, spelled out for the same reason as DEVICE_CHOICES
    return click.option("--activations", type=click.Choice(["bf16", "int8"]), default="bf16", show_default=True,
                        help="Activations of the int4 linears in batched steps: int8 runs W4A8 (VNNI) where the CPU has it "
                             "(the log says when it does not), bf16 the int4 kernels.")(f)


def _device_option(what: str):
    return click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                        help=f"{what}: cuda, cpu, or auto (cuda where a GPU is visible).")


@main.command()
@click.argument("model", required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe YAML (settings below override it).")
@click.option("--method", type=click.Choice(["awq", "rtn"]), help="awq (default) or the round-to-nearest baseline.")
@click.option("--group-size", type=int, help="Input features per scale/zero group: 32, 64 or 128.")
@click.option("--calib", "calib_source", help="Calibration text: .txt/.jsonl file, hf:NAME[:CONFIG]:SPLIT:COLUMN, or lambada-dev (bundled).")
@click.option("--samples", type=int, help="Calibration samples (default 128).")
@click.option("--seqlen", type=int, help="Tokens per calibration sample (default 512).")
@click.option("--seed", type=int, help="Seed of the calibration sampling.")
@click.option("--search-samples", type=int, help="Samples whose outputs score the scale search (default 16).")
@click.option("--duo-scaling/--no-duo-scaling", default=None, help="Scale by activation and weight magnitude.")
@click.option("--clip/--no-clip", default=None, help="Search per-group weight clipping (default on).")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), help="Round codes to nearest (AWQ's) or GPTQ's error-compensating order (same grid and format).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (or an interrupted run's blocks).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished block.")
@_device_option("Where calibration, the scale/clip searches and rounding run, one decoder block at a time "
                "(the model stays in CPU memory; the artifact's format is the same either way)")
def quantize(model, out, recipe, method, group_size, calib_source, samples, seqlen, seed, search_samples, duo_scaling, clip, rounding, force, resume,
             device) -> None:
    """Quantize MODEL (a directory, a hub id or 'smollm2-135m') to an int4 AWQ artifact.

    MODEL may be left out when the recipe names one.
    """
    from .pipeline import run_quantize

    path = run_quantize(
        model, out, recipe, force=force, resume=resume, method=method, group_size=group_size, source=calib_source, samples=samples,
        seqlen=seqlen, seed=seed, search_samples=search_samples, duo_scaling=duo_scaling, clip=clip, rounding=rounding,
        device=device,
    )
    click.echo(f"wrote {path}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--layers/--no-layers", default=True, help="Print the per-layer table.")
def inspect(artifact, layers) -> None:
    """Print an artifact's config, sizes, per-layer errors and hash verification."""
    from .inspection import inspect_artifact

    ok = inspect_artifact(artifact, show_layers=layers, echo=click.echo)
    if not ok:
        sys.exit(1)


@main.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--baseline", help="Model to compare with (default: the artifact's source model).")
@click.option("--tasks", default="wikitext,hellaswag,piqa,winogrande,lambada", show_default=True, help="Comma-separated tasks.")
@click.option("--limit", type=int, help="Evaluate only the first N examples of each task (quick runs).")
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe whose gates apply (default: the artifact's recipe).")
@click.option("--gate", is_flag=True, help="Exit 1 when a gate of the recipe is breached.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Report path (.json; a .md is written beside it).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@_device_option("Where both models are scored (through the runtime's engine)")
@_activations_option
def eval_(artifact, baseline, tasks, limit, recipe, gate, output, dtype, device, activations) -> None:
    """Evaluate ARTIFACT (a quantkit artifact or an AutoAWQ GEMM checkpoint) against its FP16 baseline.

    Runs lm-eval on both, reports the delta and, with --gate, exits 1 when a gate is breached.
    """
    from quantkit.kernels.backend import resolve_device

    from .evaluate import plan_evaluation, run_plan
    from .gates import judge_gates

    device = resolve_device(device)  # --device cuda without a GPU: refused before any evaluation time is spent
    plan = plan_evaluation(artifact, tasks, baseline, recipe, gate, output, default_output=True)  # every check before any evaluation
    report = run_plan(plan, limit, dtype, echo=click.echo, device=device, activations=activations)
    if gate:
        _enforce(judge_gates(report, plan.gates))


@main.command("export")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(SUPPORTED_FORMATS), default=COMPRESSED_TENSORS, show_default=True,
              help="Target layout: compressed-tensors (pack-quantized, as vLLM and llm-compressor load it) or gguf "
              "(llama.cpp's Q4_1 blocks, for group sizes 32, 64 and 128).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export_(artifact, out, fmt, force) -> None:
    """Write ARTIFACT in another checkpoint layout, with the same dequantized weights."""
    from .export import export_artifact

    click.echo(f"wrote {export_artifact(artifact, out, fmt, force=force)}")


@main.command("gate")
@click.argument("report", type=click.Path(path_type=Path))
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe whose gates apply (default: the recipe recorded in the evaluated artifact's manifest).")
def gate_(report, recipe) -> None:
    """Re-check a saved evaluation REPORT against a recipe's gates (exit 1 on a breach)."""
    from .gates import format_table, gates_for_report, judge_gates, load_report

    data = load_report(report)
    gates, origin = gates_for_report(data, report, recipe)
    click.echo(format_table(data))
    click.echo(f"gates from {origin}")
    _enforce(judge_gates(data, gates))


def _enforce(verdict) -> None:
    """Print the verdict (to stderr when it failed) and exit 1 on a breach; gates not judged are listed, not failed."""
    from .gates import format_verdict

    click.echo(format_verdict(verdict), err=not verdict.passed)
    if not verdict.passed:
        sys.exit(1)


def _parse_bytes(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise QuantkitError(f"cannot read {text!r} as a size; write e.g. 512MiB, 2GiB or a number of bytes.") from None


@main.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="QUANTKIT_API_KEY", help="Require 'Authorization: Bearer KEY' (or set QUANTKIT_API_KEY).")
@click.option("--kv-cache-memory", help="KV cache budget (e.g. 256MiB, 20GiB); sets the number of blocks. Default: 256 MiB on CPU; "
              "on CUDA what --gpu-memory-utilization leaves after the weights and the largest step.")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="CUDA: the share of the GPU's memory the server may hold, KV cache included (without --kv-cache-memory).")
@click.option("--enforce-eager", is_flag=True, help="CUDA: run decode steps eagerly instead of replaying CUDA graphs.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@_device_option("Where the model runs (cuda: Triton kernels, cpu: quantkit's C++ kernels)")
@_activations_option
@click.option("--max-model-len", type=click.IntRange(min=1), help="Context length served (default: the model's max_position_embeddings).")
@click.option("--max-num-seqs", default=64, show_default=True, type=int, help="Sequences per step.")
@click.option("--max-num-batched-tokens", default=512, show_default=True, type=int, help="Token budget per step.")
@click.option("--max-waiting", default=256, show_default=True, type=int, help="Queue length beyond which requests get 503.")
@click.option("--block-size", default=16, show_default=True, type=int, help="Tokens per KV block.")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Model id requests name and /v1/models lists (default: MODEL). Repeat for aliases; the first is the one reported.")
@click.option("--int8-head/--no-int8-head", default=None,
              help="Decode reads an int8 copy of the output head (half its bf16 bytes; +29 MiB for SmolLM2-135M). "
                   "Default: only where the copy is no further from the checkpoint than the bf16 head (SmolLM2's, born Q8_0).")
@click.option("--max-request-bytes", help="Largest request body accepted (e.g. 4MiB); larger ones get 413 unread. "
              "Default: room for a max-context prompt, 32 bytes per context token, at least 1 MiB.")
@click.option("--stats-log-interval", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between throughput lines on the log while there is work (0: none).")
def serve(model, host, port, api_key, kv_cache_memory, gpu_memory_utilization, enforce_eager, dtype, device, activations, max_model_len, max_num_seqs, max_num_batched_tokens, max_waiting, block_size,
          served_model_names, int8_head, max_request_bytes, stats_log_interval) -> None:
    """Serve MODEL (an artifact, a model directory or 'smollm2-135m') with an OpenAI-compatible API."""
    import logging

    import uvicorn

    from quantkit.kernels.backend import resolve_device
    from quantkit.runtime.engine import EngineConfig, LLMEngine
    from quantkit.runtime.server import create_app

    device = resolve_device(device)  # --device cuda without a GPU: refused before the weights load
    request_bytes = _parse_bytes(max_request_bytes) if max_request_bytes else None
    if request_bytes is not None and request_bytes < 1:
        raise QuantkitError(f"--max-request-bytes must be at least 1 byte, got {max_request_bytes!r}.")
    engine = LLMEngine(EngineConfig(
        model=model, dtype=dtype, block_size=block_size, kv_cache_memory=_parse_bytes(kv_cache_memory) if kv_cache_memory else None,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, activations=activations, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting, int8_head=int8_head,
        device=device,
    ))
    if max_model_len is not None and engine.max_model_len < max_model_len:
        raise QuantkitError(f"--max-model-len {max_model_len} is longer than {model}'s context of {engine.max_model_len} tokens "
                            "(max_position_embeddings); give at most that.")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    handler = logging.StreamHandler()  # the banner, a line per request, the throughput lines
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    serve_log = logging.getLogger("quantkit.serve")
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    app = create_app(engine, api_key=api_key, model_name=list(served_model_names) or None, max_request_bytes=request_bytes,
                     stats_log_interval=stats_log_interval)
    uvicorn.run(app, host=host, port=port, log_level="info")


# ---------------------------------------------------------------------------- bench
@main.group()
def bench() -> None:
    """Measure serving: offline (modes side by side) or online (rate sweep against servers)."""



def _workload_options(f):
    for option in reversed([
        click.option("--workload", "workload_file", type=click.Path(path_type=Path), help="JSONL of {prompt, max_tokens} (default: synthesized)."),
        click.option("--requests", type=int, help="Requests: synthesized (default 32), or the first N of --workload (default: all)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--prompt-tokens", default="32-512", show_default=True, help="Synthesized prompt length range LOW-HIGH."),
        click.option("--output-tokens", default="32-256", show_default=True, help="Synthesized output length range LOW-HIGH."),
        click.option("--price-per-hour", type=float, help="Machine price in $/hour: report $ per million output tokens."),
        click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
                     help="Directory for JSON and PNGs."),
    ]):
        f = option(f)
    return f


@bench.command("offline")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--baseline", help="Dense model of the artifact (default: its manifest's source).")
@click.option("--modes", default=",".join(_OFFLINE_MODES), show_default=True, help="Comma-separated modes.")
@click.option("--static-batch", default=8, show_default=True, type=int, help="Batch size of hf-static.")
@click.option("--max-num-seqs", default=64, show_default=True, type=int, help="Sequences per step (continuous).")
@click.option("--kv-cache-memory", default="512MiB", show_default=True)
@click.option("--memory-budget", default="8GiB", show_default=True, help="Budget for the most-sequences-that-fit figure.")
@click.option("--concurrency", default=32, show_default=True, type=int, help="Sequences in the GPU tier estimate.")
@click.option("--context-tokens", default=4096, show_default=True, type=int, help="Context per sequence in the GPU tier estimate.")
@click.option("--int8-head/--no-int8-head", default=None, help="The engine's modes read an int8 copy of the output head, or not "
              "(default: as serve decides, where lossless).")
@_device_option("Where every mode runs (the engine's and Hugging Face's)")
@_activations_option
@_workload_options
def bench_offline(artifact, baseline, modes, static_batch, max_num_seqs, kv_cache_memory, memory_budget, concurrency, context_tokens,
                  int8_head, device, activations, workload_file, requests, seed, prompt_tokens, output_tokens, price_per_hour, out_dir) -> None:
    """One workload, all queued at t=0: HF one-at-a-time and static batching vs quantkit's engine, bf16 vs int4.

    ARTIFACT is a quantkit artifact or an AutoAWQ GEMM checkpoint (which needs --baseline).
    """
    from quantkit.bench import run as qb
    from quantkit.bench.report import console, ratios_table, runs_table
    from quantkit.bench.workload import parse_range
    from quantkit.kernels.backend import resolve_device

    from .evaluate import open_candidate

    if open_candidate(artifact).foreign and not baseline:  # an AutoAWQ checkpoint names no source model
        raise QuantkitError(f"{artifact} is an AutoAWQ checkpoint with no record of its dense model; pass --baseline MODEL.")
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in _OFFLINE_MODES]
    if unknown or not chosen:
        raise QuantkitError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(_OFFLINE_MODES)}.")
    workload = qb.make_workload(str(artifact), workload_file, requests, seed, parse_range(prompt_tokens), parse_range(output_tokens))
    data = qb.run_offline(artifact, baseline, workload, chosen, out_dir,
                          {"static_batch": static_batch, "max_num_seqs": max_num_seqs, "kv_cache_memory": _parse_bytes(kv_cache_memory),
                           "int8_head": int8_head, "device": resolve_device(device), "activations": activations},
                          price_per_hour, _parse_bytes(memory_budget), concurrency, context_tokens, progress=click.echo)
    console.print(runs_table(f"offline: {len(workload)} requests queued at t=0", data["results"]))
    console.print(ratios_table(data["ratios"]))
    for mode, r in data["results"].items():
        if "kv_waste" in r:
            click.echo(f"KV waste {mode}: paged {100 * r['kv_waste']['paged']:.2f}%, contiguous reservation would waste "
                       f"{100 * r['kv_waste']['contiguous_reservation']:.1f}%")
    m = data["memory"]
    click.echo(f"weights: fp16 {m['weight_bytes']['fp16'] / 2**20:.0f} MiB, int4 {m['weight_bytes']['int4'] / 2**20:.0f} MiB "
               f"({m['int4_over_fp16_weight_bytes']:.2f}x); sequences fitting {memory_budget}: {m['max_sequences_in_budget']}")
    click.echo(f"wrote {out_dir}/offline.json and offline_throughput.png")


@bench.command("online")
@click.option("--url", "urls", multiple=True, help="OpenAI-compatible server, [NAME=]URL (repeatable).")
@click.option("--serve", "serve_artifact", type=click.Path(path_type=Path), help="Start `quantkit serve` on this artifact (loopback).")
@click.option("--serve-max-num-seqs", default="64", show_default=True, help="Comma list: one spawned server per value (1 = one at a time).")
@click.option("--kv-cache-memory", default="512MiB", show_default=True, help="KV budget of spawned servers.")
@click.option("--model", help="Model name to request from --url servers (default: the first they list).")
@click.option("--api-key", envvar="QUANTKIT_API_KEY", help="Bearer key for --url servers.")
@click.option("--tokenizer", "tokenizer_model", help="Tokenizer for synthesized prompts (default: --serve artifact, else smollm2-135m).")
@click.option("--rates", default="0.05,0.1,0.2,0.4", show_default=True, help="Request rates to sweep (req/s).")
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True)
@click.option("--slo-metric", type=click.Choice(["e2e", "ttft"]), default="e2e", show_default=True)
@click.option("--slo", "slo_s", type=float, required=True, help="p95 latency objective in seconds.")
@click.option("--max-seconds-per-rate", default=600.0, show_default=True, type=float, help="Stop sending after this long at one rate.")
@_device_option("Where spawned servers (--serve) run")
@_activations_option
@_workload_options
def bench_online(urls, serve_artifact, serve_max_num_seqs, kv_cache_memory, model, api_key, tokenizer_model, rates, arrival, slo_metric,
                 slo_s, max_seconds_per_rate, device, activations, workload_file, requests, seed, prompt_tokens, output_tokens, price_per_hour, out_dir) -> None:
    """Sweep request rates against servers; report the best throughput whose p95 latency meets --slo."""
    from quantkit.bench import run as qb
    from quantkit.bench.online import Target, check_url
    from quantkit.bench.report import console, runs_table
    from quantkit.bench.workload import parse_range

    targets: dict = {}
    for item in urls:
        name, sep, url = item.partition("=") if "=" in item.split("://")[0] else ("", "", item)
        check_url(url)
        targets[name or url] = Target(url, model=model, api_key=api_key)
    if serve_artifact is not None:
        for seqs in serve_max_num_seqs.split(","):
            if not seqs.strip().isdigit() or int(seqs) < 1:
                raise QuantkitError(f"--serve-max-num-seqs {serve_max_num_seqs!r}: give positive integers, e.g. 1,64.")
            targets[f"quantkit-max-seqs-{int(seqs)}"] = (serve_artifact, int(seqs), kv_cache_memory)
    if serve_artifact is not None:
        from quantkit.kernels.backend import resolve_device

        device = resolve_device(device)  # before any server starts: --device cuda without a GPU is refused here
    if not targets:
        raise QuantkitError("nothing to measure: give --url URL (any OpenAI-compatible server) and/or --serve ARTIFACT.")
    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise QuantkitError(f"--rates {rates!r} is not a comma list of numbers.") from None
    if not rate_list or min(rate_list) <= 0:
        raise QuantkitError(f"--rates {rates!r}: give rates > 0 req/s.")
    tokenizer_model = tokenizer_model or (str(serve_artifact) if serve_artifact else "smollm2-135m")
    workload = qb.make_workload(tokenizer_model, workload_file, requests, seed, parse_range(prompt_tokens), parse_range(output_tokens))
    data = qb.run_online(targets, workload, rate_list, arrival, seed, f"{slo_metric}_s", slo_s, max_seconds_per_rate, price_per_hour,
                         out_dir, progress=click.echo, device=device, activations=activations)
    for name, points in data["sweeps"].items():
        console.print(runs_table(f"{name}: {arrival} arrivals", {f"{p['rate']:g} req/s": p for p in points}, label="rate"))
    for name, best in data["best_under_slo"].items():
        if best is None:
            click.echo(f"{name}: no rate met p95 {slo_metric} <= {slo_s:g} s")
        else:
            cost = f", ${best['dollars_per_million_output_tokens']:.2f} per million output tokens" if best["dollars_per_million_output_tokens"] else ""
            click.echo(f"{name}: best under the SLO {best['output_tokens_per_s']:.1f} out tok/s at {best['rate']:g} req/s "
                       f"({best['requests_per_s']:.3f} req/s done){cost}")
    click.echo(f"wrote {out_dir}/online.json and online_sweep.png")



if __name__ == "__main__":
    main()
