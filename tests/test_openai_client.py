"""The official openai client against a real server: every endpoint it has, the fields it sends,
and the errors it raises. A field the server cannot honour must fail loudly, never be ignored."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from conftest import serving

from quantkit.runtime.engine import LLM, EngineConfig, LLMEngine
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.server import create_app
from quantkit.runtime.token_text import TokenText

API_KEY = "client-key"
NAMES = ["tiny", "tiny-alias"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say something."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=64, max_waiting=16))
    engine.tokenizer.chat_template = CHAT_TEMPLATE
    with serving(create_app(engine, api_key=API_KEY, model_name=NAMES)) as url:
        yield {"url": url, "engine": engine, "model_dir": tiny_model_dir}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def offline(server, prompt, **params):
    llm = LLM(str(server["model_dir"]), dtype="float32", num_blocks=64)
    return llm.generate([prompt], SamplingParams(**params))[0]


def test_models_lists_every_alias_and_responses_name_the_first(client):
    assert [m.id for m in client.models.list().data] == NAMES
    res = client.completions.create(model="tiny-alias", prompt=PROMPT, max_tokens=2)
    assert res.model == "tiny"


def test_an_unknown_model_is_not_found_and_a_missing_one_is_the_served_model(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.body["message"] == "The model `gpt-4` does not exist." and e.value.body["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    res = httpx.post(server["url"] + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                     headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert res.status_code == 200 and res.json()["model"] == "tiny"


def test_a_wrong_api_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)


REFUSED = {  # what the issue saw ignored, and more: each must be a 400 naming the field
    "json response_format": ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    "tools": ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    "tool_choice": ("chat", {"tool_choice": "auto"}, "tool_choice"),
    "audio modality": ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    "top_logprobs without logprobs": ("chat", {"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs above 20": ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "an unknown field": ("chat", {"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    "an unknown stream option": ("chat", {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                                 "continuous_usage_stats"),
    "suffix": ("completions", {"suffix": " and then"}, "suffix"),
    "best_of above n": ("completions", {"best_of": 3}, "best_of"),
    "logprobs above 20": ("completions", {"logprobs": 21}, "logprobs"),
    "n above 128": ("completions", {"n": 129}, "'n'"),
    "presence_penalty above 2": ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    "logit_bias of a word": ("completions", {"logit_bias": {"fox": 5}}, "logit_bias"),
    "logit_bias outside the vocabulary": ("completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fields_that_cannot_be_honoured_are_a_bad_request_naming_them(client, case):
    endpoint, args, name = REFUSED[case]
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **args)
        else:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **args)
    assert name in e.value.body["message"], e.value.body


def test_the_values_that_ask_for_nothing_pass(client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, response_format={"type": "text"}, tools=[],
                                   tool_choice="none", modalities=["text"], store=False, user="someone")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, best_of=1, suffix=None)


def test_chat_logprobs_carry_the_top_alternatives_as_text_with_true_bytes(server, client):
    res = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY)
    content = res.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert "Ġ" not in entry.token
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", errors="replace") == res.choices[0].message.content


def test_completion_logprobs_k_gives_k_alternatives_and_the_token_itself(client):
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    lp = res.choices[0].logprobs
    assert "".join(lp.tokens) == res.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the most likely


def test_echo_returns_the_prompt_and_its_logprobs_as_the_model_computes_them(server, client, hf):
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    choice = res.choices[0]
    prompt_ids = server["engine"].tokenize(PROMPT)
    assert choice.text.startswith(PROMPT) and len(choice.logprobs.tokens) == len(prompt_ids) + 3
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    ids = prompt_ids + offline(server, PROMPT, temperature=0, max_tokens=3, ignore_eos=True).token_ids
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(logp[i - 1, t]) for i, t in enumerate(ids) if i]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, echo=True).choices[0].text.startswith(PROMPT)


def test_n_choices_are_seeded_one_apart_and_usage_sums_them(client):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    both = client.completions.create(n=2, seed=7, **args)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == client.completions.create(seed=7, **args).choices[0].text
    assert both.choices[1].text == client.completions.create(seed=8, **args).choices[0].text
    assert both.usage.completion_tokens == 12 and both.usage.prompt_tokens == client.completions.create(seed=7, **args).usage.prompt_tokens


def test_streamed_n_choices_interleave_by_index_and_end_with_summed_usage(client):
    args = {"model": "tiny", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(messages=MESSAGES, **args)
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **args))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 == full.usage.completion_tokens
    streamed = list(client.completions.create(prompt=PROMPT, stream=True, **args))
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        by_index[chunk.choices[0].index] += chunk.choices[0].text
    assert by_index == {c.index: c.text for c in client.completions.create(prompt=PROMPT, **args).choices}


def test_several_prompts_give_n_choices_each_in_prompt_order(client):
    args = {"model": "tiny", "max_tokens": 4, "extra_body": {"ignore_eos": True}}
    res = client.completions.create(prompt=[PROMPT, "Once upon a time"], n=2, temperature=1.0, seed=5, **args)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    alone = client.completions.create(prompt="Once upon a time", n=2, temperature=1.0, seed=5, **args)
    assert [c.text for c in res.choices[2:]] == [c.text for c in alone.choices]


def test_penalties_and_logit_bias_change_what_is_generated(server, client):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, **GREEDY}
    plain = client.completions.create(**args).choices[0].text
    assert client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **args).choices[0].text != plain
    forced = server["engine"].tokenizer.encode(" fox")[-1]
    res = client.completions.create(logit_bias={str(forced): 100}, logprobs=0, **args)
    assert set(res.choices[0].logprobs.tokens) == {TokenText(server["engine"].tokenizer).text(forced)}
    client.completions.create(extra_body={"repetition_penalty": 1.3, "ignore_eos": True}, model="tiny", prompt=PROMPT, max_tokens=4)


def test_max_completion_tokens_bounds_a_chat_completion(client):
    res = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5, **GREEDY)
    assert res.usage.completion_tokens == 5 and res.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize_round_trip_behind_the_key(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    engine = server["engine"]
    res = httpx.post(server["url"] + "/tokenize", json={"model": "tiny", "prompt": PROMPT}, headers=headers).json()
    assert res == {"count": len(engine.tokenize(PROMPT)), "max_model_len": engine.max_model_len, "tokens": engine.tokenize(PROMPT)}
    chat = httpx.post(server["url"] + "/tokenize", json={"messages": MESSAGES}, headers=headers).json()
    prompt_ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    back = httpx.post(server["url"] + "/detokenize", json={"tokens": res["tokens"]}, headers=headers).json()
    assert back == {"prompt": PROMPT}
    assert httpx.post(server["url"] + "/tokenize", json={"prompt": PROMPT}).status_code == 401
    assert httpx.post(server["url"] + "/detokenize", json={"tokens": [10**9]}, headers=headers).status_code == 400
    too_long = httpx.post(server["url"] + "/tokenize", json={"prompt": "x" * (engine.max_prompt_chars + 1)}, headers=headers)
    assert too_long.status_code == 400 and "cannot fit" in too_long.json()["error"]["message"]
    assert httpx.post(server["url"] + "/tokenize", json={"prompt": PROMPT, "model": "gpt-4"}, headers=headers).status_code == 404


def test_version_reports_quantkits(server):
    from quantkit import __version__

    assert httpx.get(server["url"] + "/version").json() == {"version": __version__}
