"""What an operator sees: the startup banner, a line per request, periodic throughput lines on the
"quantkit.serve" log, and Prometheus metrics named and labelled as vLLM users expect."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from conftest import serving
from prometheus_client.parser import text_string_to_metric_families

from quantkit.bench.run import free_loopback_port
from quantkit.runtime.engine import EngineConfig, LLMEngine
from quantkit.runtime.server import create_app

PROMPT = "The quick brown fox"
LONG_PROMPT = list(range(3, 60))  # 57 tokens: 3 full blocks of 16 can be shared


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=64))


def serve_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "quantkit.serve"]


def wait_for(predicate, what: str, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def samples(url: str) -> list:
    return [s for family in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in family.samples]


def value(url: str, *names: str) -> float | tuple[float, ...]:
    """The values of these samples, from one scrape."""
    scraped = {s.name: s.value for s in samples(url)}
    found = tuple(scraped[name] for name in names)
    return found[0] if len(names) == 1 else found


def test_banner_request_lines_and_throughput_lines_while_there_is_work(engine, caplog):
    caplog.set_level(logging.INFO, logger="quantkit.serve")
    with serving(create_app(engine, model_name=["tiny", "alias"], stats_log_interval=0.2)) as url:
        banner = "\n".join(serve_log(caplog))
        assert f"serving {engine.model_name} as tiny, alias: dense checkpoint" in banner
        assert "dtype float32, device cpu" in banner and "kernels: int4 none (dense weights); attention decode" in banner
        assert "output head dense" in banner and "KV cache: 64 blocks x 16 tokens = 1024 tokens" in banner
        assert "max model len 512" in banner
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        rid = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["id"]
        line = wait_for(lambda: next((m for m in serve_log(caplog) if m.startswith(f"request {rid} ")), None), "no request line")
        assert re.fullmatch(rf"request {rid} 200: 1 choice\(s\), prompt \d+ tokens, output 40 tokens, TTFT [\d.]+ ms, total [\d.]+ ms", line)
        throughput = wait_for(lambda: [m for m in serve_log(caplog) if m.startswith("throughput:")], "no throughput line")
        assert re.fullmatch(r"throughput: prompt [\d.]+ tokens/s, generation [\d.]+ tokens/s; running \d+, waiting \d+; "
                            r"KV cache [\d.]+% used; prefix cache hit rate [\d.]+%", throughput[0])
        time.sleep(0.6)  # idle: no more lines
        idle = len([m for m in serve_log(caplog) if m.startswith("throughput:")])
        time.sleep(0.6)
        assert len([m for m in serve_log(caplog) if m.startswith("throughput:")]) == idle


def test_metrics_carry_model_name_counters_end_in_total_and_kv_usage_is_a_ratio(engine, monkeypatch):
    step = engine.step

    def slow_step():  # the stream below is surely still running when the metrics are read
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    with serving(create_app(engine, model_name="tiny")) as url:
        httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
        families = list(text_string_to_metric_families(httpx.get(url + "/metrics").text))
        assert all(s.labels.get("model_name") == "tiny" for f in families for s in f.samples)
        counters = {f.name for f in families if f.type == "counter"}
        assert {"quantkit_requests", "quantkit_num_preemptions", "quantkit_prompt_tokens", "quantkit_generation_tokens",
                "quantkit_prefix_cache_queries", "quantkit_prefix_cache_hits"} <= counters  # exposed with _total
        assert {"quantkit_num_requests_running", "quantkit_num_requests_waiting", "quantkit_kv_cache_usage_perc"} <= {
            f.name for f in families if f.type == "gauge"}
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as res:
            lines = res.iter_lines()  # held: a collected iterator closes the response
            next(line for line in lines if line.startswith("data:"))
            usage, used = value(url, "quantkit_kv_cache_usage_perc", "quantkit_kv_blocks_used")
        assert 0 < usage <= 1 and usage == pytest.approx(used / 64)


def test_prefix_cache_hits_and_queries_count_tokens(engine):
    with serving(create_app(engine)) as url:
        before = {name: value(url, name) for name in ("quantkit_prefix_cache_queries_total", "quantkit_prefix_cache_hits_total")}
        for _ in range(2):
            assert httpx.post(url + "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1}, timeout=60).status_code == 200
        assert value(url, "quantkit_prefix_cache_queries_total") - before["quantkit_prefix_cache_queries_total"] == 2 * len(LONG_PROMPT)
        assert value(url, "quantkit_prefix_cache_hits_total") - before["quantkit_prefix_cache_hits_total"] == 48  # the second's 3 blocks


def test_quantkit_serve_logs_its_banner_and_takes_aliases_and_a_max_model_len(tiny_model_dir, tmp_path):
    port = free_loopback_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "serve", str(tiny_model_dir), "--port", str(port), "--dtype", "float32",
                                  "--kv-cache-memory", "4MiB", "--served-model-name", "tiny", "--served-model-name", "alias",
                                  "--max-model-len", "256", "--stats-log-interval", "0.3"],
                                 stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert child.poll() is None, log.read_text()[-2000:]
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "quantkit serve did not become healthy", 300)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "alias"] and {m["max_model_len"] for m in models} == {256}
        res = httpx.post(url + "/v1/completions", json={"model": "alias", "prompt": PROMPT, "max_tokens": 30, "ignore_eos": True}, timeout=60)
        assert res.json()["model"] == "tiny"
        wait_for(lambda: "throughput:" in log.read_text(), "no throughput line in the log")
        text = log.read_text()
        assert "quantkit.serve: quantkit" in text and "max model len 256" in text and f"request {res.json()['id']} 200" in text
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_a_max_model_len_beyond_the_model_is_refused(tiny_model_dir):
    from click.testing import CliRunner

    from quantkit.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "100000"])
    assert result.exit_code == 2 and "--max-model-len 100000 is longer than" in result.output and "512" in result.output


def test_an_artifacts_banner_names_its_weights_hash_which_recording_an_evaluation_keeps(tiny_model_dir, tmp_path):
    from quantkit.artifact import append_to_manifest
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe
    from quantkit.runtime.server import kernel_paths, weights_identity

    artifact = tmp_path / "tiny-rtn"
    quantize(str(tiny_model_dir), artifact, Recipe().with_overrides(method="rtn", group_size=32))
    engine = LLMEngine(EngineConfig(model=str(artifact), dtype="float32", num_blocks=8))
    identity = weights_identity(engine)
    assert re.fullmatch(r"quantkit artifact, weights sha256 [0-9a-f]{16}", identity)
    assert kernel_paths(engine)["int4"] == "dequantize + float32 matmul"  # fp32: exact, no int4 kernel
    append_to_manifest(artifact, "evaluations", {"results": {}})  # rewrites quantkit.json and the card
    assert weights_identity(engine) == identity
