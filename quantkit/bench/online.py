"""Online mode: a client that sends a workload to any OpenAI-compatible server at a request rate.

Requests arrive as a Poisson process (or at a constant rate); each streams its completion, so
time to first token and the time between tokens are measured at the client, as users see them.
A sweep tries increasing rates and keeps the best throughput whose p95 latency meets the SLO.
Every loop is bounded: a number of requests per rate and a time limit per rate.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

from quantkit.errors import QuantkitError

from .stats import RequestTiming, summarize
from .workload import BenchRequest


@dataclass(frozen=True)
class Target:
    url: str  # base URL, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str | None = None  # default: the first model the server lists
    api_key: str | None = None
    ignore_eos: bool = True  # vLLM, llama.cpp and quantkit accept it: exact output lengths

    @property
    def base(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


def check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise QuantkitError(f"--url {url!r} is not an http(s) URL; give for example http://127.0.0.1:8000.")


def arrival_offsets(n: int, rate: float, arrival: str, seed: int) -> list[float]:
    """Send times (seconds from the start) of n requests at `rate` per second."""
    if rate <= 0:
        raise QuantkitError(f"request rate {rate} must be > 0.")
    if arrival == "constant":
        return [i / rate for i in range(n)]
    if arrival == "poisson":
        rng, t, out = random.Random(seed), 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(rate)
        return out
    raise QuantkitError(f"arrival {arrival!r} is unknown; use poisson or constant.")


async def served_model(client: httpx.AsyncClient, target: Target) -> str:
    if target.model:
        return target.model
    response = await client.get(f"{target.base}/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise QuantkitError(f"{target.base}/models lists no model; pass --model NAME.")
    return models[0]["id"]


async def _one_request(client: httpx.AsyncClient, target: Target, model: str, request: BenchRequest, timing: RequestTiming) -> None:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if target.ignore_eos:
        body["ignore_eos"] = True
    try:
        async with client.stream("POST", f"{target.base}/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return
            usage = None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        timing.token_times.append(time.perf_counter())
            timing.done = time.perf_counter()
            if usage and usage.get("prompt_tokens"):
                timing.prompt_tokens = usage["prompt_tokens"]
            if usage and usage.get("completion_tokens", 0) > len(timing.token_times) and timing.token_times:
                # Several tokens in one chunk (servers may batch text): count them, at that chunk's time.
                timing.token_times.extend([timing.token_times[-1]] * (usage["completion_tokens"] - len(timing.token_times)))
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        timing.error = f"{type(e).__name__}: {e}"


async def run_rate(target: Target, workload: list[BenchRequest], rate: float, arrival: str = "poisson", seed: int = 0,
                   max_seconds: float = 600.0, timeout: float = 600.0) -> dict:
    """Send the workload at `rate` requests/s; stop sending after max_seconds and cancel what is
    still running at max_seconds + timeout. Returns the summary of this rate."""
    offsets = arrival_offsets(len(workload), rate, arrival, seed)
    limits = httpx.Limits(max_connections=len(workload) + 1, max_keepalive_connections=len(workload) + 1)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, headers=headers) as client:
        model = await served_model(client, target)
        start = time.perf_counter()
        timings: list[RequestTiming] = []
        tasks = []
        for offset, request in zip(offsets, workload):
            if offset > max_seconds:
                break
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            timing = RequestTiming(sent=time.perf_counter(), prompt_tokens=len(request.prompt_ids or ()))
            timings.append(timing)
            tasks.append(asyncio.create_task(_one_request(client, target, model, request, timing)))
        remaining = max(1.0, start + max_seconds + timeout - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        for timing in timings:
            if timing.done is None and timing.error is None:
                timing.error = "timed out"
    result = summarize(timings)
    result.update({"rate": rate, "arrival": arrival, "model": model})
    return result


def sweep(target: Target, workload: list[BenchRequest], rates: list[float], arrival: str = "poisson", seed: int = 0,
          max_seconds: float = 600.0, progress=None) -> list[dict]:
    """run_rate at each rate in turn (ascending); the same requests at every rate."""
    results = []
    for rate in sorted(rates):
        results.append(asyncio.run(run_rate(target, workload, rate, arrival, seed, max_seconds)))
        if progress:
            progress(results[-1])
    return results
