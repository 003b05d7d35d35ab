"""The OpenAI-compatible server, driven by the official openai client and by raw HTTP for the error cases."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import serving

from quantkit.runtime import async_engine
from quantkit.runtime.engine import LLM, EngineConfig, LLMEngine
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.server import create_app

API_KEY = "test-key"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A real uvicorn server on a free localhost port, over the tiny Llama in fp32."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=64, max_waiting=8))
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    app = create_app(engine, api_key=API_KEY, model_name="tiny")
    with serving(app) as url:
        yield {"url": url, "engine": engine, "model_dir": tiny_model_dir}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


def post(server, path: str, body, key: str | None = API_KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server["url"] + path, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60)


PROMPT = "The quick brown fox"


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample on the server's /metrics whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def requests_counted(url: str, endpoint: str, status: str) -> float:
    """The server's quantkit_requests_total for one endpoint and status (0 before the first)."""
    return metric(url, "quantkit_requests_total", endpoint=endpoint, status=status)


def offline_text(server, prompt, max_tokens):
    return LLM(str(server["model_dir"]), dtype="float32", num_blocks=64).generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]


def test_completion_with_the_openai_client_equals_offline_generation(server, client):
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    expected = offline_text(server, PROMPT, 10)
    assert res.choices[0].text == expected.text
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 10 and res.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_completion_concatenates_to_the_full_text(server, client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stream_ends_with_usage_when_asked(server, client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 7 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in text_chunks)


def test_chat_uses_the_chat_template_and_streams_the_same_text(server, client):
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant"
    prompt_ids = server["engine"].tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert full.choices[0].message.content == offline_text(server, prompt_ids, 8).text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("quantkit_requests_total", "quantkit_generation_tokens_total", "quantkit_time_to_first_token_seconds_bucket",
                 "quantkit_inter_token_latency_seconds_bucket", "quantkit_e2e_request_latency_seconds_count",
                 "quantkit_kv_blocks_free", "quantkit_num_requests_running", "quantkit_num_preemptions_total",
                 "quantkit_kv_cache_usage_perc", "quantkit_prefix_cache_queries_total", "quantkit_prefix_cache_hits_total"):
        assert name in text


BAD_REQUESTS = {
    "temperature below 0": ({"prompt": PROMPT, "temperature": -0.5}, "temperature"),
    "top_p zero": ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    "top_p above 1": ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    "max_tokens zero": ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    "max_tokens beyond the context": ({"prompt": PROMPT, "max_tokens": 100000}, "context"),
    "prompt longer than the context": ({"prompt": list(range(100)) * 6, "max_tokens": 1}, "context"),
    "max_tokens of the wrong type": ({"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    "stream of the wrong type": ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    "prompt missing": ({"max_tokens": 3}, "prompt"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(server, case):
    body, word = BAD_REQUESTS[case]
    res = post(server, "/v1/completions", body)
    assert res.status_code == 400, res.text
    assert word in res.json()["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_malformed_json_and_bad_chat_messages_get_400(server):
    assert post(server, "/v1/completions", None, raw=b'{"prompt": "x", ').status_code == 400
    assert post(server, "/v1/chat/completions", {"messages": "hello"}).status_code == 400
    assert post(server, "/v1/chat/completions", {"messages": [{"role": "user"}]}).status_code == 400


def test_missing_or_wrong_api_key_gets_401(server):
    assert post(server, "/v1/completions", {"prompt": PROMPT}, key=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": PROMPT}, key="wrong").status_code == 401
    assert httpx.get(server["url"] + "/v1/models").status_code == 401


def test_full_waiting_queue_gets_503_with_retry_after(server, monkeypatch):
    from quantkit.runtime.scheduler import QueueFull

    scheduler = server["engine"].scheduler
    add = scheduler.add

    def full(seq):
        raise QueueFull(f"{scheduler.config.max_waiting} requests already waiting")

    monkeypatch.setattr(scheduler, "add", full)  # every new request finds the queue full
    res = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert res.status_code == 503 and res.headers["retry-after"] == "1"
    monkeypatch.setattr(scheduler, "add", add)
    assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    # more choices than the queue ever holds: no retry helps, so 400 rather than 503
    res = post(server, "/v1/completions", {"prompt": [PROMPT, PROMPT], "n": 5, "max_tokens": 2})
    assert res.status_code == 400 and "max_waiting=8" in res.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_has_its_sequence_aborted(server):
    engine = server["engine"]
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as res:
        lines = res.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
    deadline = time.time() + 20
    while engine.has_unfinished() or engine.scheduler.num_used_blocks:
        assert time.time() < deadline, "the disconnected request kept running"
        time.sleep(0.05)
    assert metric(server["url"], "quantkit_kv_blocks_used") == 0


def test_a_streamed_completion_with_stop_strings_sends_the_text_cut_before_the_stop(server, client):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    free = client.completions.create(**args).choices[0].text
    stop = free[len(free) // 2 :][:3]  # from the middle of the free text: a partial match is held back first
    assert stop.strip()
    full = client.completions.create(stop=[stop, "never in this text"], **args).choices[0]
    chunks = list(client.completions.create(stop=[stop, "never in this text"], stream=True, **args))
    assert full.finish_reason == "stop" and free.startswith(full.text) and stop not in full.text
    assert "".join(c.choices[0].text for c in chunks) == full.text and chunks[-1].choices[0].finish_reason == "stop"


def test_out_of_vocabulary_token_ids_get_400_and_do_not_fail_other_requests(server, client):
    assert post(server, "/v1/completions", {"prompt": [1, 10**9], "max_tokens": 2}).status_code == 400
    assert post(server, "/v1/completions", {"prompt": [-1], "max_tokens": 2}).status_code == 400
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"top_k": 2**62})
    assert res.usage.completion_tokens == 3


def test_chat_accepts_text_content_parts_and_reports_template_errors_as_400(server, client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]}]
    joined = [{"role": "user", "content": "Say something."}]
    a = client.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=joined, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    engine = server["engine"]
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        res = post(server, "/v1/chat/completions", {"messages": joined})
    finally:
        engine.tokenizer.chat_template = CHAT_TEMPLATE
    assert res.status_code == 400 and "roles must alternate" in res.json()["error"]["message"]


def test_a_default_max_tokens_shrinks_to_the_room_left_in_the_context(server):
    long_prompt = list(range(100)) * 5  # 500 of the tiny model's 512 positions
    res = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 240}]})
    assert res.status_code == 200, res.text
    res = post(server, "/v1/completions", {"prompt": long_prompt, "temperature": 0, "ignore_eos": True})
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 12


def test_a_default_max_tokens_also_shrinks_to_the_room_left_in_the_kv_cache(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=8, block_size=16))  # 128 tokens
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    assert engine.max_sequence_tokens == 128 < engine.max_model_len
    with serving(create_app(engine, model_name="tiny")) as url:
        body = {"messages": [{"role": "user", "content": "Say something."}], "temperature": 0, "ignore_eos": True}
        res = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert res.status_code == 200, res.text  # the chat default (256 tokens) would not fit the cache
        usage = res.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 128
        res = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 256}, timeout=60)
        assert res.status_code == 400 and "whole cache holds 8 blocks" in res.json()["error"]["message"]  # asked for: refused


def test_streamed_logprobs_are_the_full_responses_split_across_chunks(server, client):
    args = {"model": "tiny", "max_tokens": 9, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(prompt=PROMPT, logprobs=1, **args).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(prompt=PROMPT, logprobs=1, stream=True, **args)]
    assert [t for c in chunks for t in c.tokens] == full.tokens and len(full.tokens) == 9
    assert [lp for c in chunks for lp in c.token_logprobs] == pytest.approx(full.token_logprobs, abs=1e-5)
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(messages=messages, logprobs=True, **args).choices[0].logprobs.content
    stream = list(client.chat.completions.create(messages=messages, logprobs=True, stream=True, **args))
    streamed = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in full] and len(full) == 9
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in full], abs=1e-5)


def test_a_non_streaming_client_that_disconnects_has_its_sequence_aborted(server, monkeypatch):
    engine = server["engine"]
    step = engine.step

    def slow_step():  # 400 steps now take >= 4 s, so the client surely leaves first
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    left_before = requests_counted(server["url"], "completions", "499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5)
    deadline = time.time() + 20
    while engine.has_unfinished() or engine.scheduler.num_used_blocks:
        assert time.time() < deadline, "the disconnected request kept running"
        time.sleep(0.05)
    # and its handler returns (a waiting handler would hold a task and its queue forever)
    while requests_counted(server["url"], "completions", "499") != left_before + 1:
        assert time.time() < deadline, "the disconnected request's handler never returned"
        time.sleep(0.05)


def test_the_engine_hands_freed_heap_back_to_the_os_once_each_time_it_goes_idle(server, monkeypatch):
    trims = []
    monkeypatch.setattr(async_engine, "return_free_memory_to_the_os", lambda: trims.append(server["engine"].has_unfinished()))
    for _ in range(2):
        before = len(trims)
        assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}).status_code == 200
        deadline = time.time() + 20
        while len(trims) == before:
            assert time.time() < deadline, "the engine went idle without trimming the heap"
            time.sleep(0.05)
    time.sleep(0.3)  # several idle polls of the engine loop: none trims again
    assert trims == [False, False]
