"""Hostile requests against a real `quantkit serve` process: each is refused with a 4xx and a message
that names the problem, costs the server nothing lasting, and leaves it serving everyone else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server import metric, requests_counted

from quantkit.bench.run import free_loopback_port
from quantkit.runtime.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

API_KEY = "limits-key"
MAX_REQUEST_BYTES = 512 * 1024  # given as --max-request-bytes 512KiB
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """`quantkit serve` over the tiny Llama (with a chat template) in a child process on a loopback port."""
    model = tmp_path_factory.mktemp("limits") / "tiny-chat"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    port = free_loopback_port()
    log = open(model.parent / "serve.log", "w+")
    child = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                              "--dtype", "float32", "--kv-cache-memory", "4MiB", "--api-key", API_KEY, "--max-request-bytes", "512KiB"],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the first use of a fresh checkout compiles the CPU kernels
        while True:
            assert child.poll() is None, f"quantkit serve exited: {Path(log.name).read_text()[-2000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "quantkit serve did not become healthy"
            time.sleep(0.2)
        yield {"url": url, "pid": child.pid, "log": Path(log.name)}
    finally:
        child.terminate()
        child.wait(timeout=30)
        log.close()


def post(served, body=None, raw: bytes | None = None, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(served["url"] + path, content=content, headers=headers, timeout=60, **kwargs)


def assert_refused(res: httpx.Response, status: int, *words: str) -> None:
    assert res.status_code == status, res.text
    message = res.json()["error"]["message"]
    for word in words:
        assert word in message, message


def still_serving(served) -> None:
    assert httpx.get(served["url"] + "/health", timeout=10).json() == {"status": "ok"}
    assert post(served, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_a_body_over_the_byte_limit_gets_413_unread_with_or_without_a_content_length(served):
    still_serving(served)  # warm: the first requests allocate what every later one reuses
    before = rss_bytes(served["pid"])
    body = b'{"prompt": "' + b"a" * (20 * 1024**2) + b'"}'  # 20 MB

    def chunked():  # no Content-Length: the server counts the bytes as they arrive
        for at in range(0, len(body), 64 * 1024):
            yield body[at : at + 64 * 1024]

    for content in (body, chunked()):
        assert_refused(post(served, raw=content), 413, f"limit of {MAX_REQUEST_BYTES} bytes", "--max-request-bytes")
    assert rss_bytes(served["pid"]) - before < 10 * 1024**2  # the body was never held
    still_serving(served)


def test_a_text_prompt_too_long_for_the_context_gets_400_before_tokenizing(served):
    models = httpx.get(served["url"] + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    context = models["data"][0]["max_model_len"]
    prompt = "x" * (MAX_REQUEST_BYTES - 100)  # within the byte limit, beyond any tokenization of the context
    assert_refused(post(served, {"prompt": prompt, "max_tokens": 1}), 400, "characters: it cannot fit", f"context of {context} tokens")
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    assert_refused(post(served, chat, path="/v1/chat/completions"), 400, "the messages' content has", "characters")
    assert_refused(post(served, {"prompt": [1] * (context + 1), "max_tokens": 1}), 400, f"more than the model's context of {context}")
    still_serving(served)


LONE_SURROGATES = [
    (rb'{"prompt": "a\ud800b", "max_tokens": 2}', "/v1/completions", "'prompt'"),
    (rb'{"prompt": ["a\udfffb"], "max_tokens": 2}', "/v1/completions", "'prompt[0]'"),
    (rb'{"prompt": "ab", "stop": ["x", "\ud800"], "max_tokens": 2}', "/v1/completions", "'stop[1]'"),
    (rb'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "a\ud800"}]}', "/v1/chat/completions",
     "'messages[1].content'"),
    (rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}', "/v1/chat/completions",
     "'messages[0].content[0].text'"),
]


def test_a_lone_surrogate_gets_400_naming_the_field_and_a_paired_one_is_text(served):
    for raw, path, field in LONE_SURROGATES:
        assert_refused(post(served, raw=raw, path=path), 400, field, "lone surrogate")
    assert post(served, raw=rb'{"prompt": "a\ud83d\ude00b", "max_tokens": 2}').status_code == 200  # U+1F600
    still_serving(served)


def test_json_nested_100000_deep_gets_400(served):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_refused(post(served, raw=deep), 400, "nested too deeply")
    still_serving(served)


def test_an_out_of_range_seed_gets_400_naming_seed_and_its_range(served):
    for seed in (2**64, -(2**63) - 1, 10**30):  # torch's generator: "Overflow when unpacking long long"
        res = post(served, {"prompt": PROMPT, "max_tokens": 2, "seed": seed})
        assert_refused(res, 400, "seed must be an int from -2**63 to 2**64 - 1")
    for seed in (-(2**63), 2**64 - 1):  # the ends of the range
        assert post(served, {"prompt": PROMPT, "max_tokens": 2, "temperature": 1, "seed": seed}).status_code == 200


def test_too_many_or_too_long_stop_strings_get_400_naming_the_bound(served):
    bound = f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters"
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    for stop in (["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_STRING_CHARS + 1)], ["y" * 1000] * 200):
        assert_refused(post(served, {**body, "stop": stop}), 400, bound)
    at_the_bound = [chr(ord("a") + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]
    res = post(served, {**body, "stop": at_the_bound})
    assert res.status_code == 200 and res.text.rstrip().endswith("data: [DONE]")


def test_a_stream_whose_client_leaves_is_counted_499_and_a_finished_one_200(served):
    url, headers = served["url"], {"Authorization": f"Bearer {API_KEY}"}
    left, done = requests_counted(url, "completions", "499"), requests_counted(url, "completions", "200")
    body = {"prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as res:
        assert res.status_code == 200
        next(line for line in res.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while requests_counted(url, "completions", "499") != left + 1:
        assert time.monotonic() < deadline, "the stream whose client left was not counted as 499"
        time.sleep(0.05)
    assert metric(url, "quantkit_kv_blocks_used") == 0 and metric(url, "quantkit_num_requests_running") == 0
    assert requests_counted(url, "completions", "200") == done  # not counted as a success too
    with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 3}, headers=headers, timeout=60) as res:
        assert [line for line in res.iter_lines() if line][-1] == "data: [DONE]"
    while requests_counted(url, "completions", "200") != done + 1:
        assert time.monotonic() < deadline, "a finished stream was not counted as 200"
        time.sleep(0.05)
    assert requests_counted(url, "completions", "499") == left + 1
