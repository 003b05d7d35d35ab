"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

import pytest
import torch

from quantkit.runtime.sampling import (
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    make_generator,
    sample,
)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "0.7"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("top_k", True),
        ("max_tokens", 0),
        ("max_tokens", 8.0),
        ("seed", 1.5),
        ("seed", 2**64),  # torch: "Overflow when unpacking long long"
        ("seed", -(2**63) - 1),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("top_logprobs", -1),
        ("top_logprobs", MAX_TOP_LOGPROBS + 1),
        ("top_logprobs", 2.0),
        ("prompt_logprobs", 1),
        ("presence_penalty", 2.01),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0),
        ("repetition_penalty", 0.001),
        ("repetition_penalty", 2.5),
        ("repetition_penalty", float("inf")),
        ("logit_bias", [5]),
        ("logit_bias", {"5": 1.0}),  # JSON's string keys are the server's to convert
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {5: float("nan")}),
        ("logit_bias", {5: None}),
        ("logit_bias", {t: 1.0 for t in range(MAX_LOGIT_BIAS_TOKENS + 1)}),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value, "logprobs": True} if field.startswith("top_logprobs") else {field: value})


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"logprobs": True, "top_logprobs": 21}, r"top_logprobs must be an int from 0 to 20, got 21"),
        ({"top_logprobs": 3}, r"top_logprobs \(3\) needs logprobs=True"),
        ({"presence_penalty": 3}, r"presence_penalty must be a finite number in \[-2, 2\], got 3"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be a finite number in \[0.01, 2\] \(1 = off\), got 0"),
        ({"logit_bias": {5: -101}}, r"logit_bias\[5\] must be a finite number in \[-100, 100\], got -101"),
        ({"logit_bias": dict.fromkeys(range(301), 1.0)}, r"logit_bias may hold at most 300 tokens, got 301"),
    ],
)
def test_the_new_fields_name_their_range_and_the_value(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_the_bounds_themselves_are_accepted():
    SamplingParams(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS, prompt_logprobs=True, presence_penalty=-2, frequency_penalty=2,
                   repetition_penalty=2, logit_bias={t: (-100.0 if t % 2 else 100) for t in range(MAX_LOGIT_BIAS_TOKENS)})
    SamplingParams(repetition_penalty=0.01, prompt_logprobs=True)  # prompt logprobs need no logprobs for the output


def test_a_seed_names_its_range_and_every_seed_in_it_makes_a_generator():
    with pytest.raises(ValueError, match=r"seed must be an int from -2\*\*63 to 2\*\*64 - 1"):
        SamplingParams(seed=10**30)
    for seed in (-(2**63), -1, 0, 2**63, 2**64 - 1):
        make_generator(SamplingParams(seed=seed).seed)


@pytest.mark.parametrize("stop", [["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_STRING_CHARS + 1)]])
def test_stop_strings_are_bounded_in_number_and_length(stop):
    with pytest.raises(ValueError, match=f"stop may hold at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams(stop=stop)
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # the bound itself is allowed


def test_good_values_are_accepted():
    p = SamplingParams(temperature=0, top_k=-1, top_p=1, seed=0, max_tokens=1, stop="\n\n", stop_token_ids=[2])
    assert p.greedy and p.stop == ["\n\n"]
    assert not SamplingParams(temperature=0.5, top_k=40, top_p=0.9).greedy


def logits_batch(rows: int = 4, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_draws_no_randomness():
    logits = logits_batch()
    gen = make_generator(5)
    state = gen.get_state()
    tokens = sample(logits, [SamplingParams(temperature=0)] * 4, [gen] * 4).tokens
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(params):
    logits = logits_batch(rows=8)
    for seed in range(10):
        tokens = sample(logits, [params] * 8, [make_generator(seed) for _ in range(8)]).tokens
        assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-6, 1e-39, 5e-324])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    logits = logits_batch(rows=8) * 1e3  # logits / 1e-39 would overflow fp32 to inf, softmax to NaN
    out = sample(logits, [SamplingParams(temperature=temperature, seed=1)] * 8, [make_generator(s) for s in range(8)])
    tokens, logprobs = out.tokens, out.logprobs
    assert SamplingParams(temperature=temperature).greedy and torch.equal(tokens, logits.argmax(-1))
    assert torch.isfinite(logprobs).all()
    assert not SamplingParams(temperature=1e-4).greedy  # small but representable: sampled


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it():
    logits = torch.zeros(1, 2)  # two tokens of probability exactly 1/2: the first alone reaches 0.5
    draws = {sample(logits, [SamplingParams(top_p=0.5)], [make_generator(s)]).tokens.item() for s in range(30)}
    assert len(draws) == 1
    draws = {sample(logits, [SamplingParams(top_p=0.51)], [make_generator(s)]).tokens.item() for s in range(30)}
    assert draws == {0, 1}


def test_a_seeded_row_samples_the_same_alone_or_in_any_batch():
    logits = logits_batch(rows=4, vocab=1000, seed=1)
    mine = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_p=0.5), SamplingParams(temperature=0.4, top_k=3)]

    alone_gen, batch_gen = make_generator(7), make_generator(7)
    other_gens = [None, make_generator(1), make_generator(2)]
    for _ in range(20):  # successive steps keep agreeing: the generator advances the same way
        alone = sample(logits[2:3], [mine], [alone_gen]).tokens
        batched = sample(logits[[0, 1, 2, 3]], [others[0], others[1], mine, others[2]], [other_gens[0], other_gens[1], batch_gen, other_gens[2]]).tokens
        assert batched[2] == alone[0]
    # and the seed matters
    draws = {sample(logits[2:3], [mine], [make_generator(s)]).tokens.item() for s in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8)])
def test_empirical_distribution_matches_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    expected = torch.softmax(logits / temperature, -1)
    if top_k:
        expected[top_k:] = 0
    if top_p < 1:  # logits are sorted: keep the shortest head whose mass reaches top_p
        keep = int((expected.cumsum(-1) - expected < top_p).sum())
        expected[keep:] = 0
    expected /= expected.sum()

    n = 20_000
    gen = make_generator(1234)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample(logits.expand(n, -1), [params] * n, [gen] * n).tokens
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert torch.allclose(freq, expected, atol=0.012), (freq, expected)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn


def test_logprobs_are_the_raw_model_log_softmax_at_the_chosen_token():
    logits = logits_batch(rows=3)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=5), SamplingParams(temperature=2.0, top_p=0.9)]
    out = sample(logits, params, [None, make_generator(0), make_generator(1)])
    tokens, logprobs = out.tokens, out.logprobs
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected)


def test_unseeded_generators_differ_and_an_rng_makes_them_reproducible():
    import random

    a, b = make_generator(), make_generator()
    assert not torch.equal(a.get_state(), b.get_state())
    c, d = make_generator(rng=random.Random(3)), make_generator(rng=random.Random(3))
    assert torch.equal(c.get_state(), d.get_state())


def test_top_logprobs_are_the_k_most_likely_under_the_raw_distribution():
    logits = logits_batch(rows=4, vocab=1000, seed=3)
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=5), SamplingParams(temperature=0.8, logprobs=True, top_logprobs=20),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=True, top_logprobs=1, presence_penalty=2, logit_bias={3: 50.0})]
    histories = [([1, 2, 3], 1)] * 4
    out = sample(logits, params, [None, make_generator(0), None, None], histories)
    values, ids = torch.log_softmax(logits.double(), -1).topk(20, dim=-1)
    for i, p in enumerate(params):  # each row reads its own k: the batch holds the largest
        k = p.top_logprobs
        assert torch.equal(out.top_ids[i, :k], ids[i, :k])
        assert torch.allclose(out.top_logprobs[i, :k].double(), values[i, :k], atol=1e-6)
    assert out.tokens[3] == 3  # the bias picked the token, the reported distribution stays the model's
    assert sample(logits, [SamplingParams()] * 4, [make_generator(0)] * 4).top_ids is None
