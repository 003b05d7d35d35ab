"""Per-request timings and what users quote from them: throughput and latency percentiles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Wall-clock seconds (any common origin) of one request's life."""

    sent: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # when each output token arrived
    done: float | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (numpy's default method); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99)}


def summarize(timings: list[RequestTiming], wall: float | None = None) -> dict:
    """Throughput over the run's span (first send to last completion) and latency percentiles."""
    ok = [t for t in timings if t.error is None and t.done is not None]
    if wall is None:
        wall = (max(t.done for t in ok) - min(t.sent for t in timings)) if ok else math.nan
    output = sum(t.output_tokens for t in ok)
    prompt = sum(t.prompt_tokens for t in ok)
    return {
        "requests": len(timings),
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        "wall_s": wall,
        "output_tokens": output,
        "prompt_tokens": prompt,
        "requests_per_s": len(ok) / wall if wall else math.nan,
        "output_tokens_per_s": output / wall if wall else math.nan,
        "total_tokens_per_s": (output + prompt) / wall if wall else math.nan,
        "ttft_s": latency_summary([t.ttft for t in ok if t.ttft is not None]),
        "itl_s": latency_summary([d for t in ok for d in t.inter_token]),
        "e2e_s": latency_summary([t.e2e for t in ok]),
    }


def best_under_slo(sweep: list[dict], metric: str, slo_s: float) -> dict | None:
    """The sweep point of highest output throughput whose p95 `metric` ("e2e_s" or "ttft_s") is
    within the SLO and that completed every request; None when no point qualifies."""
    passing = [p for p in sweep if p["failed"] == 0 and p[metric]["p95"] <= slo_s]
    return max(passing, key=lambda p: p["output_tokens_per_s"], default=None)
