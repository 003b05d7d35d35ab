"""`run_offline` and `run_online`: run a workload, print progress, write JSON and PNGs into a directory."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from quantkit.errors import QuantkitError

from . import cost, offline, online, report
from .stats import best_under_slo
from .workload import BenchRequest, bundled_corpus, load_jsonl, synthesize


DEFAULT_REQUESTS = 32


def make_workload(tokenizer_model: str, workload_file: Path | None, requests: int | None, seed: int,
                  prompt_tokens: tuple[int, int], output_tokens: tuple[int, int]) -> list[BenchRequest]:
    """The first `requests` lines of a JSONL workload (all when None), or `requests` synthesized ones."""
    if requests is not None and requests < 1:
        raise QuantkitError(f"--requests {requests}: a workload needs at least one request.")
    if workload_file is not None:
        return load_jsonl(workload_file)[:requests]
    from quantkit.sources import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(tokenizer_model))
    return synthesize(tokenizer, bundled_corpus(), requests or DEFAULT_REQUESTS, seed, prompt_tokens, output_tokens)


def _environment() -> dict:
    import platform

    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_offline(artifact: Path, baseline: str | None, workload: list[BenchRequest], modes: list[str], out_dir: Path,
                config_overrides: dict, price_per_hour: float | None, memory_budget: int, concurrency: int, context_tokens: int,
                progress=print) -> dict:
    from quantkit.sources import resolve_model

    baseline = baseline or offline.artifact_baseline(artifact)
    if not baseline:
        raise QuantkitError(f"{artifact} names no source model in its manifest; pass --baseline MODEL.")
    config = offline.OfflineConfig(artifact=str(artifact), baseline=baseline, **config_overrides)
    results = {}
    for mode in modes:
        progress(f"{mode}: {len(workload)} requests ...")
        results[mode] = offline.run_mode_isolated(mode, workload, config)
        r = results[mode]
        progress(f"  {r['output_tokens_per_s']:.1f} output tok/s, e2e p95 {r['e2e_s']['p95']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    ratios = offline.speedups(results)
    tokens = [len(r.prompt_ids or ()) + r.max_tokens for r in workload]
    memory = cost.memory_report(artifact, resolve_model(baseline), tokens, memory_budget, concurrency, context_tokens)
    if price_per_hour:
        memory["dollars_per_million_output_tokens"] = {m: cost.dollars_per_million_tokens(price_per_hour, r["output_tokens_per_s"])
                                                      for m, r in results.items()}
    data = {"mode": "offline", "environment": _environment(), "config": asdict(config), "price_per_hour": price_per_hour,
            "workload": {"requests": len(workload), "prompt_tokens": [len(r.prompt_ids or ()) for r in workload],
                         "output_tokens": [r.max_tokens for r in workload]},
            "results": results, "ratios": ratios, "memory": memory}
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "offline.json", data)
    report.plot_speedups(results, out_dir / "offline_throughput.png", f"{len(workload)} requests, all queued at t=0")
    return data


def free_loopback_port() -> int:
    """A port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawned_server(artifact: Path, max_num_seqs: int, kv_cache_memory: str, startup_timeout: float = 300.0, device: str = "auto",
                   activations: str = "bf16") -> Iterator[str]:
    """`quantkit serve` in a child process on a free loopback port; yields its URL, stops it after."""
    import httpx

    port = free_loopback_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"quantkit-bench-serve-{port}.log", "w")
    child = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
                              "--max-num-seqs", str(max_num_seqs), "--kv-cache-memory", kv_cache_memory, "--max-waiting", "4096", "--device", device,
                              "--activations", activations],
                             stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if child.poll() is not None:
                raise QuantkitError(f"quantkit serve {artifact} exited with status {child.returncode}; see {log.name}.")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise QuantkitError(f"quantkit serve {artifact} did not become healthy in {startup_timeout:.0f} s; see {log.name}.")
            time.sleep(0.5)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        log.close()


def run_online(targets: dict[str, online.Target | tuple[Path, int, str]], workload: list[BenchRequest], rates: list[float],
               arrival: str, seed: int, slo_metric: str, slo_s: float, max_seconds: float, price_per_hour: float | None,
               out_dir: Path, progress=print, device: str = "auto", activations: str = "bf16") -> dict:
    """Sweep every target; a target is a Target (a URL) or (artifact, max_num_seqs, kv_cache_memory) to spawn."""
    sweeps: dict[str, list[dict]] = {}
    for name, target in targets.items():
        def show(point: dict, name: str = name) -> None:
            progress(f"  {name} @ {point['rate']:g} req/s: {point['output_tokens_per_s']:.1f} out tok/s, p95 {slo_metric.removesuffix('_s')} "
                     f"{1000 * point[slo_metric]['p95']:,.0f} ms, failed {point['failed']}")

        progress(f"{name}: rates {', '.join(f'{r:g}' for r in sorted(rates))} req/s, {len(workload)} requests each ...")
        if isinstance(target, online.Target):
            sweeps[name] = online.sweep(target, workload, rates, arrival, seed, max_seconds, show)
        else:
            artifact, seqs, kv = target
            with spawned_server(artifact, seqs, kv, device=device, activations=activations) as url:
                sweeps[name] = online.sweep(online.Target(url), workload, rates, arrival, seed, max_seconds, show)
    best = {name: best_under_slo(points, slo_metric, slo_s) for name, points in sweeps.items()}
    summary = {}
    for name, point in best.items():
        summary[name] = None if point is None else {
            "rate": point["rate"], "requests_per_s": point["requests_per_s"], "output_tokens_per_s": point["output_tokens_per_s"],
            f"{slo_metric}_p95": point[slo_metric]["p95"],
            "dollars_per_million_output_tokens": cost.dollars_per_million_tokens(price_per_hour, point["output_tokens_per_s"]) if price_per_hour else None,
        }
    data = {"mode": "online", "environment": _environment(), "arrival": arrival, "seed": seed, "slo": {"metric": slo_metric, "p95_s": slo_s},
            "price_per_hour": price_per_hour, "workload": {"requests": len(workload)}, "sweeps": sweeps, "best_under_slo": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "online.json", data)
    report.plot_sweep(sweeps, out_dir / "online_sweep.png", slo_metric, slo_s)
    return data
