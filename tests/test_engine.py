"""The engine produces exactly the model's own greedy tokens, alone or under load, and honours every stop rule."""

from __future__ import annotations

import pytest
import torch

from quantkit.kernels import cpu_ext
from quantkit.runtime.engine import LLM, EngineConfig, LLMEngine
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.sequence import StopStrings

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    """Reference: transformers' forward, recomputing the whole prefix for every new token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def test_greedy_tokens_equal_transformers_on_a_tiny_llama(tiny_model_dir):
    prompts = random_prompts([1, 7, 30], seed=0)
    outputs = LLM(str(tiny_model_dir), dtype="float32", num_blocks=32).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(tiny_model_dir, prompt, 12)
        assert out.finish_reason == "length"


def test_greedy_tokens_equal_transformers_on_the_default_model(smollm2_dir):
    from quantkit.sources import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, in a small village by the sea, there lived")]
    outputs = LLM(str(smollm2_dir), dtype="float32", kv_cache_memory=64 * 1024**2).generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(smollm2_dir, prompt, 10)


def test_each_request_is_the_same_alone_as_among_16_with_chunked_prefill_and_preemption(tiny_model_dir):
    prompts = random_prompts([3, 40, 17, 1, 64, 9, 33, 5, 50, 16, 2, 28, 71, 11, 45, 8], seed=1)
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 5, ignore_eos=True) for i in range(16)]
    alone = [LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    # 12 blocks of 16 tokens cannot hold 16 requests at once: the scheduler must preempt. A
    # 24-token budget forces long prompts into chunks.
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=12, max_num_batched_tokens=24)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert together == alone
    assert llm.engine.scheduler.num_free_blocks == 12


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_model_dir):
    prompts = random_prompts([5, 20, 9], seed=2)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate([prompts[0]], seeded)[0].token_ids
    mixed = [seeded, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True), GREEDY]
    together = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate(prompts, mixed)
    assert together[0].token_ids == alone


def test_stop_token_ids_stop_strings_and_max_tokens(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16)
    prompt = random_prompts([6], seed=3)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    # Stop on the 4th generated token: generation ends there.
    by_id = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[free.token_ids[3]]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]
    # A stop string taken from the free text: the output text ends right before it.
    stop = free.text[len(free.text) // 2 :][:3]
    if stop.strip():
        by_text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
        assert by_text.finish_reason == "stop" and stop not in by_text.text and free.text.startswith(by_text.text)
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_when_one_token_completes_two_stop_strings_the_text_ends_before_the_earlier_one(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16)
    prompt = random_prompts([6], seed=3)[0]
    free = llm.generate([prompt], GREEDY)[0]
    texts = [llm.engine.tokenizer.decode(free.token_ids[:i], skip_special_tokens=True) for i in range(len(free.token_ids) + 1)]
    # a token that adds two new characters at once, neither seen before it
    step = next(i for i in range(1, len(texts)) if len(texts[i]) >= len(texts[i - 1]) + 2
                and len({*texts[i][len(texts[i - 1]):][:2]} - {*texts[i - 1]}) == 2)
    first, second = texts[step][len(texts[step - 1])], texts[step][len(texts[step - 1]) + 1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[second, first]))[0]
    assert out.finish_reason == "stop" and out.text == texts[step - 1]  # cut at `first`, though listed second
    stops = StopStrings(["c", "b", "z"])
    assert stops.update("abcabc") and stops.text == "a"
    assert not StopStrings(["z"]).update("abc")


def first_stop(text: str, stops: list[str]) -> int | None:
    """Reference: where the earliest stop string begins in the whole text."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def longest_partial_stop(text: str, stops: list[str]) -> int:
    """Reference: the longest end of the text that begins some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_strings_read_a_step_at_a_time_find_what_a_search_of_the_whole_text_finds():
    rng = torch.Generator().manual_seed(0)

    def pick(alphabet: str, n: int) -> str:
        return "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=rng).tolist())

    for _ in range(500):
        stops = [pick("ab c", int(torch.randint(1, 6, (1,), generator=rng))) for _ in range(int(torch.randint(1, 5, (1,), generator=rng)))]
        full, matcher, end = pick("ab c", 60), StopStrings(stops), 0
        while end < len(full):
            end += int(torch.randint(1, 5, (1,), generator=rng))
            text = full[:end]
            if end % 3 == 0:  # the decoder may rewrite its last character once the next one arrives
                text = text[:-1] + "\ufffd"
            expected = first_stop(text, stops)
            assert matcher.update(text) == (expected is not None), (stops, text)
            if expected is not None:
                assert matcher.text == text[:expected] and matcher.stable_len == expected
                break
            complete = text.rstrip("\ufffd")  # a partial character is held back too
            assert matcher.stable_len == len(complete) - longest_partial_stop(complete, stops), (stops, text)


def test_stop_strings_hold_back_a_partial_stop_and_a_partial_character():
    stops = StopStrings(["world"])
    stops.update("hello wor")
    assert stops.text == "hello wor" and stops.stable_len == len("hello ")
    stops = StopStrings([])
    stops.update("abc\ufffd")
    assert stops.stable_len == 3


def test_stop_strings_follow_a_decoder_that_rewrites_earlier_text():
    stops = StopStrings(["xyz"])
    assert not stops.update("ab x")
    assert not stops.update("aB xy") and stops.stable_len == len("aB ")
    assert stops.update("aB xyz") and stops.text == "aB "


def test_stop_strings_read_each_new_character_once_per_stop_string():
    class CountingText(str):
        reads = 0

        def __getitem__(self, key):
            if isinstance(key, int):
                CountingText.reads += 1
            return str.__getitem__(self, key)

    stops = ["x" * 255 + "y", "needle", "z" * 256]
    matcher = StopStrings(stops)
    text = "x" * 300 + " and more text" * 100  # keeps a long partial match of the first stop alive for a while
    for end in range(1, len(text) + 1):
        assert not matcher.update(CountingText(text[:end]))
    # each character once per stop string, and each step's last one for a partial character;
    # whole-text rescans would read about len(text) ** 2 / 2 characters per stop string
    assert CountingText.reads == len(stops) * len(text) + len(text)


def test_eos_ends_generation_unless_ignored(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16)
    prompt = random_prompts([6], seed=3)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    llm.engine.eos_token_ids = {free.token_ids[2]}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == free.token_ids[2]


def test_logprobs_are_the_model_log_softmax_of_the_chosen_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts([8], seed=4)[0]
    out = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True))[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_bad_requests_are_rejected_with_the_reason(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=16))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="cache"):
        engine.add_request([1] * 300, SamplingParams(max_tokens=10))  # 16 blocks x 16 = 256 tokens


def test_prompts_too_long_for_the_context_are_refused_before_tokenizing(tiny_model_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=16))
    assert engine.max_token_chars == max(len(t) for t in engine.tokenizer.get_vocab())
    assert engine.max_prompt_chars == engine.max_model_len * engine.max_token_chars

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer ran")

    monkeypatch.setattr(engine.tokenizer, "encode", no_tokenizing)
    with pytest.raises(ValueError, match=f"characters: it cannot fit the model's context of {engine.max_model_len} tokens"):
        engine.add_request("x" * (engine.max_prompt_chars + 1), GREEDY)
    # token ids: the length is checked before each id is (these are outside the vocabulary too)
    with pytest.raises(ValueError, match=f"{engine.max_model_len + 1} token ids, more than the model's context"):
        engine.add_request([10**9] * (engine.max_model_len + 1), GREEDY)
    assert not engine.has_unfinished()


def test_abort_frees_the_blocks_of_a_running_request(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=16))
    rid = engine.add_request(random_prompts([40], seed=5)[0], GREEDY)
    engine.step()
    assert engine.scheduler.num_used_blocks > 0
    assert engine.abort(rid)
    assert engine.scheduler.num_used_blocks == 0 and not engine.has_unfinished()


@pytest.mark.skipif(not cpu_ext.cpu_has_int8_instructions(),
                    reason="this CPU lacks AVX-512 BF16 and VNNI: the int8 output head is not built for it")
def test_int8_head_decodes_the_default_model_like_the_dense_head(smollm2_dir):
    # The int8 head moves logits by a few hundredths (BENCHMARKS.md: top-1 kept at 99.5% of
    # WikiText-2 positions); these continuations have no near-tie within their first 10 tokens.
    from quantkit.sources import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, in a small village by the sea, there lived")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    dense = LLM(str(smollm2_dir), kv_cache_memory=64 * 1024**2, int8_head=False)
    int8 = LLM(str(smollm2_dir), kv_cache_memory=64 * 1024**2)  # by default: its head was Q8_0, the int8 copy is the closer one
    assert int8.engine.runner.model.lm_head.int8 is not None and dense.engine.runner.model.lm_head.int8 is None
    assert [o.token_ids for o in int8.generate(prompts, params)] == [o.token_ids for o in dense.generate(prompts, params)]


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks_in_bf16(tiny_model_dir):
    # Its first chunks sample nothing: the head is asked for zero rows (the bf16 GEMV refused them).
    prompt = random_prompts([40], seed=3)[0]
    chunked = LLM(str(tiny_model_dir), dtype="bfloat16", num_blocks=8, max_num_batched_tokens=16).generate([prompt], GREEDY)[0]
    assert len(chunked.token_ids) == GREEDY.max_tokens and chunked.finish_reason == "length"
