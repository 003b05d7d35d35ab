"""Abuse: hostile requests against `quantkit serve` while a well-behaved client measures its own latency.

Starts `quantkit serve MODEL` on a free 127.0.0.1 port (with an API key), then runs these cases,
each after an idle window in which the well-behaved client measures its idle latency:
- bad requests: malformed JSON, wrong types, lone surrogates, JSON nested 100,000 deep, seeds out
  of range, too many / too long stop strings, prompts too long for the context, bad auth, ...
  (the list once a second, 10 times);
- oversized bodies: 20 MB prompts, three with a Content-Length and one chunked, at once (once a
  second, 10 times);
- a stop-string storm: the original attack (2,000 stops of 1,000 characters), one over the bound,
  and 16 concurrent streams each with the most stop strings allowed, all of the longest length;
  and its control, the same 16 streams without stop strings;
- 64 concurrent streams, half of whose clients leave after 3 chunks; and its control, 64 streams
  read to the end.
The well-behaved client (its own process) alternates GET /health and a 4-token completion. Prints
a table (status codes seen, the client's p95 during each case against its idle p95, the server's
RSS before/after, KV blocks free at the end) and writes JSON. Every request has a timeout, each
case a deadline and the whole run --max-seconds; it talks to 127.0.0.1 only and stops by itself.

    python benchmarks/abuse.py /tmp/abuse-art          # an artifact (or smollm2-135m, the dense model)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
from common import write_results  # noqa: E402

HOST = "127.0.0.1"  # loopback only: this sends hostile traffic
API_KEY = "abuse-bench-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The history of the city begins"
MiB = 1024**2

# The well-behaved client, in its own process so that the abusers' work does not slow its clock:
# one JSON line per request on stdout, until stdin closes or its deadline passes.
POLITE = """
import json, sys, threading, time
import httpx
url, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
deadline = time.monotonic() + seconds
with httpx.Client(timeout=60) as client:
    while not stop.is_set() and time.monotonic() < deadline:
        for kind, call in (("health", lambda: client.get(url + "/health")),
                           ("completion", lambda: client.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer " + key}))):
            start = time.monotonic()
            try:
                status = call().status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            print(json.dumps({"kind": kind, "t": start, "s": time.monotonic() - start, "status": status}), flush=True)
        time.sleep(0.05)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`quantkit serve` in a child process; its RSS and its /metrics."""

    def __init__(self, model: str, log: Path, startup_s: float = 600):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "serve", model, "--host", HOST, "--port", str(self.port),
                                      "--api-key", API_KEY], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"quantkit serve exited with status {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"quantkit serve did not become healthy in {startup_s:.0f} s; see {log}")
            time.sleep(0.5)

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        counts: dict[str, float] = {}
        for labels, value in re.findall(r"^quantkit_requests_total\{(.*)\} (\S+)$", text, re.M):
            status = re.search(r'status="(\d+)"', labels).group(1)
            counts[status] = counts.get(status, 0) + float(value)
        gauge = {name: float(v) for name, v in re.findall(r"^(quantkit_\w+)(?:\{.*\})? (\S+)$", text, re.M)}
        return {"requests": counts, "kv_free": gauge["quantkit_kv_blocks_free"], "kv_used": gauge["quantkit_kv_blocks_used"],
                "running": gauge["quantkit_num_requests_running"], "waiting": gauge["quantkit_num_requests_waiting"]}

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["running"] == 0 and m["waiting"] == 0 and m["kv_used"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Polite:
    """The well-behaved client's samples, read from its process as they come."""

    def __init__(self, url: str, seconds: float):
        self.proc = subprocess.Popen([sys.executable, "-c", POLITE, url, API_KEY, str(seconds)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.samples: list[dict] = []
        self._reader = threading.Thread(target=lambda: self.samples.extend(json.loads(line) for line in self.proc.stdout), daemon=True)
        self._reader.start()

    def window(self, start: float, end: float) -> dict:
        rows = [s for s in self.samples if start <= s["t"] < end]  # requests begun in the window
        out = {}
        for kind in ("health", "completion"):
            times = sorted(s["s"] for s in rows if s["kind"] == kind)
            out[kind] = {"n": len(times), "p95_s": p95(times), "max_s": times[-1] if times else None,
                         "errors": sum(s["status"] != 200 for s in rows if s["kind"] == kind)}
        return out

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=90)
        self._reader.join(timeout=10)


def p95(sorted_values: list[float]) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(0.95 * len(sorted_values)))]


# ---------------------------------------------------------------------------- the cases
def bad_requests(context: int) -> list[tuple[str, str, str, dict, int]]:
    """(name, method, path, httpx arguments, the status it must get)."""
    c, chat = "/v1/completions", "/v1/chat/completions"

    def raw(data: bytes) -> dict:
        return {"content": data, "headers": {**AUTH, "Content-Type": "application/json"}}

    def js(body) -> dict:
        return {"json": body, "headers": AUTH}

    return [
        ("malformed JSON", "POST", c, raw(b'{"prompt": "x", '), 400),
        ("body not an object", "POST", c, raw(b"[1, 2]"), 400),
        ("empty body", "POST", c, raw(b""), 400),
        ("invalid UTF-8", "POST", c, raw(b'{"prompt": "\xff\xfe"}'), 400),
        ("prompt a number", "POST", c, js({"prompt": 5}), 400),
        ("prompt missing", "POST", c, js({"max_tokens": 3}), 400),
        ("max_tokens a string", "POST", c, js({"prompt": PROMPT, "max_tokens": "ten"}), 400),
        ("temperature a string", "POST", c, js({"prompt": PROMPT, "temperature": "hot"}), 400),
        ("stream a string", "POST", c, js({"prompt": PROMPT, "stream": "yes"}), 400),
        ("stop a number", "POST", c, js({"prompt": PROMPT, "stop": 5}), 400),
        ("messages a string", "POST", chat, js({"messages": "hi"}), 400),
        ("image content part", "POST", chat, js({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400),
        ("n = 129", "POST", c, js({"prompt": PROMPT, "n": 129}), 400),
        ("top_p 0", "POST", c, js({"prompt": PROMPT, "top_p": 0}), 400),
        ("temperature -1", "POST", c, js({"prompt": PROMPT, "temperature": -1}), 400),
        ("max_tokens 0", "POST", c, js({"prompt": PROMPT, "max_tokens": 0}), 400),
        ("max_tokens 10**9", "POST", c, js({"prompt": PROMPT, "max_tokens": 10**9}), 400),
        ("lone surrogate in prompt", "POST", c, raw(rb'{"prompt": "a\ud800b"}'), 400),
        ("lone surrogate in stop", "POST", c, raw(rb'{"prompt": "ab", "stop": ["\udfff"]}'), 400),
        ("lone surrogate in a message", "POST", chat, raw(rb'{"messages": [{"role": "user", "content": "a\ud800"}]}'), 400),
        ("JSON nested 100,000 deep", "POST", c, raw(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400),
        ("seed 2**64", "POST", c, js({"prompt": PROMPT, "seed": 2**64}), 400),
        ("seed 10**30", "POST", c, js({"prompt": PROMPT, "seed": 10**30}), 400),
        ("seed -2**63 - 1", "POST", c, js({"prompt": PROMPT, "seed": -(2**63) - 1}), 400),
        ("17 stop strings", "POST", c, js({"prompt": PROMPT, "stop": [f"s{i}" for i in range(17)], "stream": True}), 400),
        ("a 257-character stop", "POST", c, js({"prompt": PROMPT, "stop": ["z" * 257], "stream": True}), 400),
        ("token id 10**9", "POST", c, js({"prompt": [1, 10**9]}), 400),
        ("token id -1", "POST", c, js({"prompt": [-1]}), 400),
        (f"{context + 1} token ids", "POST", c, js({"prompt": [1] * (context + 1), "max_tokens": 1}), 400),
        ("1,000,000-character prompt", "POST", c, js({"prompt": "x" * 1_000_000, "max_tokens": 1}), 400),
        ("empty token prompt", "POST", c, js({"prompt": []}), 400),
        ("no API key", "POST", c, {"json": {"prompt": PROMPT}}, 401),
        ("wrong API key", "POST", c, {"json": {"prompt": PROMPT}, "headers": {"Authorization": "Bearer nope"}}, 401),
        ("Basic auth", "POST", c, {"json": {"prompt": PROMPT}, "headers": {"Authorization": "Basic YTpi"}}, 401),
        ("GET a POST endpoint", "GET", c, {"headers": AUTH}, 405),
        ("unknown path", "POST", "/v1/engines", js({"prompt": PROMPT}), 404),
    ]


# The quick cases fire a round (the bad-request list once; four oversized bodies at once) every
# ROUND_SECONDS, ROUNDS times, so that the well-behaved client takes enough samples during them
# for a p95. Paced rather than a flood: a flood of any requests, good or bad, shares the cores.
ROUNDS = 10
ROUND_SECONDS = 1.0


async def paced_rounds(fire_round) -> None:
    start = time.monotonic()
    for i in range(ROUNDS):
        await fire_round()
        await asyncio.sleep(max(0.0, start + (i + 1) * ROUND_SECONDS - time.monotonic()))


async def case_bad_requests(client: httpx.AsyncClient, url: str, context: int) -> dict:
    cases = bad_requests(context)
    seen: dict[str, list] = {name: [] for name, *_ in cases}
    limit = asyncio.Semaphore(8)

    async def fire(name, method, path, kwargs):
        async with limit:
            try:
                seen[name].append((await client.request(method, url + path, **kwargs)).status_code)
            except httpx.HTTPError as e:
                seen[name].append(type(e).__name__)

    async def fire_round():
        await asyncio.gather(*(fire(name, m, p, kw) for name, m, p, kw, _ in cases))

    await paced_rounds(fire_round)
    detail = [{"request": name, "expected": expected, "seen": statuses(seen[name])} for name, _, _, _, expected in cases]
    return {"requests": len(cases) * ROUNDS, "statuses": statuses(s for v in seen.values() for s in v),
            "as_expected": all(list(d["seen"]) == [str(d["expected"])] for d in detail), "detail": detail}


async def case_oversized(client: httpx.AsyncClient, url: str) -> dict:
    body = b'{"prompt": "' + b"a" * (20 * MiB) + b'", "max_tokens": 1}'

    def chunked():
        for at in range(0, len(body), 64 * 1024):
            yield body[at : at + 64 * 1024]

    async def chunked_async():
        for part in chunked():
            yield part

    async def send(content):
        try:
            return (await client.post(url + "/v1/completions", content=content, headers={**AUTH, "Content-Type": "application/json"})).status_code
        except httpx.HTTPError as e:
            return type(e).__name__

    seen = []

    async def fire_round():
        seen.extend(await asyncio.gather(send(body), send(body), send(body), send(chunked_async())))

    await paced_rounds(fire_round)
    return {"requests": len(seen), "statuses": statuses(seen), "as_expected": set(seen) == {413}}


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, leave_after: int | None = None) -> str:
    """Status of one streaming request: its HTTP status, 'left' if this client left after leave_after chunks."""
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as res:
            if res.status_code != 200:
                await res.aread()
                return res.status_code
            chunks = 0
            async for line in res.aiter_lines():
                if line.startswith("data:"):
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        return "left"
            return 200
    except httpx.HTTPError as e:
        return type(e).__name__


async def case_stop_storm(client: httpx.AsyncClient, url: str, streams: int = 16, max_tokens: int = 96, control: bool = False) -> dict:
    """16 streams with the most and longest stop strings allowed, and two requests over the bound;
    control: the same 16 streams with no stop strings (the load without the abuse)."""
    from quantkit.runtime.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    # Strings the text keeps partly matching (runs of its commonest characters), never completed.
    pieces = [" ", "e", "the ", " of", "\n", "a", "in ", "s", "t", "o", ". ", "and ", "n", "r", ", ", "i"]
    worst = [(p * MAX_STOP_STRING_CHARS)[: MAX_STOP_STRING_CHARS - 1] + "\x00" for p in pieces[:MAX_STOP_STRINGS]]
    base = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": True}
    original = {**base, "stop": ["q" * 1000] * 2000, "max_tokens": 200}  # the attack: 2 MB of stop strings
    over = {**base, "stop": ["q" * 1000] * 200}  # 200 KB: under the byte limit, over the stop bound
    if control:
        seen = await asyncio.gather(*(read_stream(client, url, {**base, "seed": i}) for i in range(streams)))
        return {"requests": len(seen), "statuses": statuses(seen), "as_expected": set(seen) == {200}}
    seen = await asyncio.gather(read_stream(client, url, original), read_stream(client, url, over),
                                *(read_stream(client, url, {**base, "stop": worst, "seed": i}) for i in range(streams)))
    return {"requests": len(seen), "statuses": statuses(seen),
            "as_expected": seen[0] == 413 and seen[1] == 400 and set(seen[2:]) == {200}}


async def case_streams(client: httpx.AsyncClient, url: str, streams: int = 64, max_tokens: int = 64, leave: bool = True) -> dict:
    """`streams` concurrent streams; with leave, every other client leaves after 3 chunks."""
    base = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": True}
    seen = await asyncio.gather(*(read_stream(client, url, {**base, "seed": i}, leave_after=3 if leave and i % 2 else None)
                                  for i in range(streams)))
    leavers = streams // 2 if leave else 0
    return {"requests": len(seen), "statuses": statuses(seen), "as_expected": seen.count("left") == leavers and seen.count(200) == streams - leavers}


def statuses(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Artifact or model directory, or smollm2-135m.")
    parser.add_argument("--idle-seconds", type=float, default=8.0, help="The well-behaved client's idle window before each case.")
    parser.add_argument("--case-timeout", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=540.0, help="The whole run, server start excluded.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "abuse.json")
    args = parser.parse_args()

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"quantkit-abuse-serve-{os.getpid()}.log"  # one access line per request
    started = time.monotonic()
    server = Server(args.model, log)
    print(f"quantkit serve {args.model} on {server.url}: healthy after {time.monotonic() - started:.0f} s (log: {log})", flush=True)
    polite = Polite(server.url, args.max_seconds)
    deadline = time.monotonic() + args.max_seconds
    rows = []
    try:
        context = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["max_model_len"]

        async def run_all() -> None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10), limits=limits) as client:
                # Warm-up: one batch as wide as the widest case, so its buffers exist before any baseline.
                await case_streams(client, server.url, streams=64, max_tokens=4)
                server.wait_idle()
                rss_start = server.rss()
                cases = [("bad requests", lambda: case_bad_requests(client, server.url, context)),
                         ("oversized bodies (20 MB x 4 at once)", lambda: case_oversized(client, server.url)),
                         (CONTROLS["stop-string storm"], lambda: case_stop_storm(client, server.url, control=True)),
                         ("stop-string storm", lambda: case_stop_storm(client, server.url)),
                         (CONTROLS["64 streams, half leave early"], lambda: case_streams(client, server.url, leave=False)),
                         ("64 streams, half leave early", lambda: case_streams(client, server.url))]
                for name, run in cases:
                    if time.monotonic() + args.idle_seconds + args.case_timeout > deadline:
                        print(f"{name}: skipped, the run's --max-seconds is spent", flush=True)
                        continue
                    idle_start = time.monotonic()
                    await asyncio.sleep(args.idle_seconds)
                    before, rss_before = server.metrics(), server.rss()
                    start = time.monotonic()
                    try:
                        result = await asyncio.wait_for(run(), args.case_timeout)
                    except asyncio.TimeoutError:
                        result = {"requests": None, "statuses": {"case timed out": 1}, "as_expected": False}
                    end = time.monotonic()
                    after = await asyncio.to_thread(server.wait_idle)
                    await asyncio.sleep(1.0)  # the allocator's trims
                    counted = {s: after["requests"].get(s, 0) - before["requests"].get(s, 0) for s in after["requests"]}
                    row = {"case": name, **result, "seconds": end - start,
                           "server_counted": {s: int(v) for s, v in sorted(counted.items()) if v},
                           "idle": polite.window(idle_start + 1.0, start), "during": polite.window(start, end),
                           "rss_before": rss_before, "rss_after": server.rss(), "rss_start": rss_start,
                           "kv_free_end": int(after["kv_free"]), "kv_total": int(after["kv_free"] + after["kv_used"])}
                    rows.append(row)
                    print(summary_line(row), flush=True)

        asyncio.run(run_all())
        healthy = httpx.get(server.url + "/health", timeout=10).json()
    finally:
        polite.stop()
        server.stop()

    table = markdown(rows)
    print("\n" + table)
    targets = targets_met(rows)
    for name, met in targets.items():
        print(f"{name}: {'met' if met else 'NOT met'}")
    write_results(args.out, {"command": " ".join(["python", "benchmarks/abuse.py", *sys.argv[1:]]), "model": args.model,
                             "healthy_at_end": healthy, "cases": rows, "targets": targets, "table": table})


# The same load without the abuse: what the abusive case's latency is also compared with.
CONTROLS = {"stop-string storm": "control: the storm's 16 streams, no stop strings",
            "64 streams, half leave early": "control: 64 streams, all read to the end"}


def ratio(row: dict, kind: str, reference: dict | None = None) -> float | None:
    base = (reference or row)["during" if reference else "idle"][kind]["p95_s"]
    during = row["during"][kind]["p95_s"]
    return during / base if base and during else None


def control_of(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["case"] == CONTROLS.get(row["case"])), None)


def summary_line(row: dict) -> str:
    return (f"{row['case']}: {row['statuses']} in {row['seconds']:.1f} s; p95 health {ms(row['idle']['health']['p95_s'])} -> "
            f"{ms(row['during']['health']['p95_s'])}, completion {ms(row['idle']['completion']['p95_s'])} -> "
            f"{ms(row['during']['completion']['p95_s'])}; RSS {row['rss_before'] / MiB:.0f} -> {row['rss_after'] / MiB:.0f} MiB; "
            f"KV free {row['kv_free_end']}/{row['kv_total']}")


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


def markdown(rows: list[dict]) -> str:
    lines = ["| case | requests | status codes seen (server counted) | well-behaved p95: /health, idle → during | 4-token completion, idle → during | server RSS before → after | KV blocks free at end |",
             "|---|---:|---|---|---|---|---|"]
    for r in rows:
        seen = ", ".join(f"{s} x{n}" for s, n in r["statuses"].items())
        counted = ", ".join(f"{s} x{n}" for s, n in r["server_counted"].items())
        cells, control = [], control_of(rows, r)
        for kind in ("health", "completion"):
            x = ratio(r, kind)
            cell = f"{ms(r['idle'][kind]['p95_s'])} → {ms(r['during'][kind]['p95_s'])} ({x:.2f}x)" if x else "-"
            if control and ratio(r, kind, control):
                cell += f"; {ratio(r, kind, control):.2f}x its control"
            cells.append(cell)
        lines.append(f"| {r['case']} | {r['requests']} | {seen} ({counted}) | {cells[0]} | {cells[1]} | "
                     f"{r['rss_before'] / MiB:.0f} → {r['rss_after'] / MiB:.0f} MiB | {r['kv_free_end']} / {r['kv_total']} |")
    return "\n".join(lines)


def targets_met(rows: list[dict]) -> dict[str, bool]:
    if not rows:
        return {}
    start = rows[0]["rss_start"]
    return {
        "every response as expected (no 5xx)": all(r["as_expected"] for r in rows),
        "well-behaved /health p95 within 2x of idle in every case": all((ratio(r, "health") or 99) <= 2 for r in rows),
        "well-behaved completion p95 within 2x of idle in every case": all((ratio(r, "completion") or 99) <= 2 for r in rows),
        "abusive cases: well-behaved p95 within 2x of the same load without the abuse": all(
            (ratio(r, kind, c) or 99) <= 2 for r in rows if (c := control_of(rows, r)) for kind in ("health", "completion")),
        "server RSS back within 10% after every case": all(abs(r["rss_after"] - r["rss_before"]) <= 0.1 * r["rss_before"] for r in rows),
        "server RSS at the end within 10% of the start": abs(rows[-1]["rss_after"] - start) <= 0.1 * start,
        "all KV blocks free at the end": rows[-1]["kv_free_end"] == rows[-1]["kv_total"],
    }


if __name__ == "__main__":
    main()
