"""What `quantkit bench` shows and writes: terminal tables, JSON, PNG plots."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Piped into a log file, rich would fold the tables to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=180)


def _ms(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:,.0f}"


def runs_table(title: str, rows: dict[str, dict], label: str = "mode") -> Table:
    table = Table(title=title)
    for column in (label, "req/s", "out tok/s", "total tok/s", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms", "E2E p50/p95/p99 ms", "failed"):
        table.add_column(column, justify="left" if column == label else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['requests_per_s']:.3f}", f"{r['output_tokens_per_s']:.1f}", f"{r['total_tokens_per_s']:.1f}",
                      *("/".join(_ms(r[k][q]) for q in ("p50", "p95", "p99")) for k in ("ttft_s", "itl_s", "e2e_s")),
                      str(r["failed"]))
    return table


def ratios_table(ratios: dict[str, float]) -> Table:
    table = Table(title="ratios")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for name, value in ratios.items():
        table.add_row(name.replace("_", " "), f"{value:.2f}x")
    return table


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(results: dict[str, dict], path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(results)
    values = [results[n]["output_tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names, values, color="#4c72b0")
    slowest = min(v for v in values if v > 0)
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.0f} tok/s ({value / slowest:.1f}x)", va="center")
    ax.set_xlabel("output tokens/s")
    ax.set_title(title)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweeps: dict[str, list[dict]], path: Path, slo_metric: str, slo_s: float | None) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sweeps.items():
        rates = [p["rate"] for p in points]
        left.plot(rates, [p["output_tokens_per_s"] for p in points], marker="o", label=name)
        right.plot(rates, [1000 * p[slo_metric]["p95"] for p in points], marker="o", label=name)
    left.set_xlabel("request rate (req/s)")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    right.set_xlabel("request rate (req/s)")
    right.set_ylabel(f"p95 {slo_metric.removesuffix('_s').upper()} (ms)")
    right.set_title("p95 latency")
    if slo_s is not None:
        right.axhline(1000 * slo_s, color="red", linestyle="--", label="SLO")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
