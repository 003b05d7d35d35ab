"""Offline mode: one workload, every request queued at t = 0, served by each way of serving it.

Modes (all greedy, every request generates exactly its max_tokens):
  hf-one-at-a-time   Hugging Face `generate`, one request after another (dense weights)
  hf-static          Hugging Face `generate` on fixed batches, left-padded; a batch runs until its
                     longest request is done and only then returns, and the next batch starts
  engine-one-at-a-time-{bf16,int4}   quantkit's engine limited to one sequence
  engine-continuous-{bf16,int4}      quantkit's engine, continuous batching

Each mode runs in its own process, so its peak RSS is its own and no mode warms another's caches.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from .stats import RequestTiming, summarize
from .workload import BenchRequest

MiB = 1024**2
MODES = ("hf-one-at-a-time", "hf-static", "engine-one-at-a-time-bf16", "engine-one-at-a-time-int4",
         "engine-continuous-bf16", "engine-continuous-int4")


@dataclass(frozen=True)
class OfflineConfig:
    artifact: str  # int4 artifact
    baseline: str  # the dense model it came from
    static_batch: int = 8
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_memory: int = 512 * MiB
    threads: int | None = None  # default: every core
    int8_head: bool | None = None  # the engine's modes read an int8 copy of the output head; None: where lossless (as serve)
    device: str = "auto"  # every mode's device: the engine's (kernels/backend.py) and Hugging Face's
    activations: str = "bf16"  # the engine's modes: "int8" runs W4A8 in batched steps where the CPU can


class KVWasteMeter:
    """Time-averaged reserved-but-unused KV slots over reserved slots (each step weighted by its
    duration), and the same for a runtime that reserves prompt + max_tokens contiguously per request."""

    def __init__(self) -> None:
        self.paged = self.contiguous = self.time = 0.0

    def observe(self, seconds: float, reserved: int, used: int, contiguous_reserved: int) -> None:
        if reserved == 0 or seconds <= 0:
            return
        self.paged += seconds * (1 - used / reserved)
        self.contiguous += seconds * (1 - used / contiguous_reserved)
        self.time += seconds

    def result(self) -> dict[str, float]:
        if not self.time:
            return {"paged": float("nan"), "contiguous_reservation": float("nan")}
        return {"paged": self.paged / self.time, "contiguous_reservation": self.contiguous / self.time}


def run_engine(model: str, workload: list[BenchRequest], max_num_seqs: int, config: OfflineConfig) -> dict:
    from quantkit.runtime.engine import EngineConfig, LLMEngine
    from quantkit.runtime.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, dtype="bfloat16", kv_cache_memory=config.kv_cache_memory, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=config.max_num_batched_tokens, max_waiting=len(workload), int8_head=config.int8_head,
                                    device=config.device, activations=config.activations))
    prompts = [list(r.prompt_ids) if r.prompt_ids else engine.tokenize(r.prompt) for r in workload]
    start = time.perf_counter()
    timings, ids = {}, []
    for prompt, request in zip(prompts, workload):
        rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=request.max_tokens, ignore_eos=True))
        timings[rid] = RequestTiming(sent=start, prompt_tokens=len(prompt))
        ids.append(rid)
    budget = {rid: len(p) + r.max_tokens for rid, p, r in zip(ids, prompts, workload)}
    meter, peak_blocks, block = KVWasteMeter(), 0, engine.config.block_size
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            timing = timings[out.request_id]
            timing.token_times.extend([now] * (len(out.token_ids) - timing.output_tokens))
            if out.finished:
                timing.done = now
        running = engine.scheduler.running
        if running:
            used_blocks = engine.scheduler.num_used_blocks
            peak_blocks = max(peak_blocks, used_blocks)
            meter.observe(now - t0, used_blocks * block, sum(s.num_computed_tokens for s in running), sum(budget[s.seq_id] for s in running))
    result = summarize([timings[r] for r in ids], time.perf_counter() - start)
    result["kv_waste"] = meter.result()
    result["kv"] = {"blocks": engine.runner.num_blocks, "block_size": block, "peak_blocks_used": peak_blocks,
                    "bytes_per_token": engine.runner.block_bytes // block, "preemptions": engine.scheduler.num_preemptions}
    result["int8_head"] = engine.runner.int8_head  # what ran: the option can be refused (no kernel here)
    result["device"] = engine.runner.backend.device
    result["activations"] = engine.runner.backend.activations  # what ran: int8 falls back to bf16 where W4A8 cannot run
    return result


class _TokenClock:
    """A transformers streamer that notes when each generation step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        value.cpu()  # on a GPU the token exists once it can be read back
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model: str, workload: list[BenchRequest], batch_size: int, device: str = "auto") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.kernels.backend import resolve_device
    from quantkit.sources import load_tokenizer, resolve_model

    device = resolve_device(device)

    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [list(r.prompt_ids) if r.prompt_ids else tokenizer.encode(r.prompt, add_special_tokens=True) for r in workload]
    start = time.perf_counter()
    timings = []
    for first in range(0, len(workload), batch_size):
        batch_prompts = prompts[first : first + batch_size]
        batch_requests = workload[first : first + batch_size]
        width = max(map(len, batch_prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch_prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
        steps = max(r.max_tokens for r in batch_requests)  # padded: the batch runs as long as its longest
        clock = _TokenClock()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                        pad_token_id=pad, streamer=clock)
        done = time.perf_counter()
        for prompt, request in zip(batch_prompts, batch_requests):
            timings.append(RequestTiming(sent=start, prompt_tokens=len(prompt), token_times=clock.times[: request.max_tokens], done=done))
    result = summarize(timings, time.perf_counter() - start)
    result["device"] = device
    return result


def _run_mode(mode: str, workload: list[BenchRequest], config: OfflineConfig) -> dict:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    if mode == "hf-one-at-a-time":
        result = run_hf(config.baseline, workload, 1, config.device)
    elif mode == "hf-static":
        result = run_hf(config.baseline, workload, config.static_batch, config.device)
    else:
        model = config.artifact if mode.endswith("int4") else config.baseline
        result = run_engine(model, workload, 1 if "one-at-a-time" in mode else config.max_num_seqs, config)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result


def _child(mode: str, workload: list[BenchRequest], config: OfflineConfig, queue) -> None:
    try:
        queue.put(("ok", _run_mode(mode, workload, config)))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_mode_isolated(mode: str, workload: list[BenchRequest], config: OfflineConfig) -> dict:
    """Run one mode in a fresh process (spawned: no inherited torch state) and return its result."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the child: no spinning between ops
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(mode, workload, config, queue))
    child.start()
    status, payload = queue.get()
    child.join()
    if status != "ok":
        raise RuntimeError(f"mode {mode} failed: {payload}")
    return payload


def speedups(results: dict[str, dict]) -> dict[str, float]:
    """The ratios users quote, for the modes present."""
    def ratio(a: str, b: str, key: str = "output_tokens_per_s") -> float | None:
        if a in results and b in results:
            return results[a][key] / results[b][key]
        return None

    out = {
        "continuous_int4_over_engine_one_at_a_time_int4": ratio("engine-continuous-int4", "engine-one-at-a-time-int4"),
        "continuous_int4_over_hf_one_at_a_time": ratio("engine-continuous-int4", "hf-one-at-a-time"),
        "continuous_int4_over_hf_static": ratio("engine-continuous-int4", "hf-static"),
        "continuous_int4_over_continuous_bf16": ratio("engine-continuous-int4", "engine-continuous-bf16"),
        "hf_static_over_hf_one_at_a_time": ratio("hf-static", "hf-one-at-a-time"),
    }
    a, b = results.get("engine-one-at-a-time-bf16"), results.get("engine-one-at-a-time-int4")
    if a and b:  # single-stream decode speed: median time between tokens
        out["int4_over_bf16_single_stream_decode"] = a["itl_s"]["p50"] / b["itl_s"]["p50"]
    return {k: v for k, v in out.items() if v is not None}


def artifact_baseline(artifact: Path) -> str | None:
    """The dense model an artifact was quantized from, as its manifest records it."""
    from quantkit.artifact import MANIFEST_NAME, read_manifest

    if not (artifact / MANIFEST_NAME).is_file():
        return None
    source = read_manifest(artifact).get("source", {})
    return source.get("spec") or source.get("path")
