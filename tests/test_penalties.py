"""Penalties and logit bias: the sampler against a plain per-token reference, alone and in mixed batches."""

from collections import Counter

import pytest
import torch

from quantkit.runtime import sampling
from quantkit.runtime.sampling import SamplingParams, adjust_logits, make_generator, sample

VOCAB = 100


def reference_adjusted(logits: torch.Tensor, p: SamplingParams, tokens: list[int], num_prompt: int) -> torch.Tensor:
    """One row in float64, token by token: bias, then repetition over prompt and output, then
    frequency and presence over the output (vLLM's order)."""
    x = logits.double().clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(tokens):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, n in Counter(tokens[num_prompt:]).items():
        x[t] -= p.frequency_penalty * n + p.presence_penalty
    return x


def random_history(g: torch.Generator) -> tuple[list[int], int]:
    """Tokens from a small range, so that many repeat; a prompt of 1 to 20, an output of 0 to 30."""
    num_prompt, num_output = int(torch.randint(1, 21, (1,), generator=g)), int(torch.randint(0, 31, (1,), generator=g))
    return torch.randint(0, 30, (num_prompt + num_output,), generator=g).tolist(), num_prompt


def random_penalties(g: torch.Generator, **kw) -> SamplingParams:
    u = torch.rand(4, generator=g).tolist()
    bias = {int(t): float(b) for t, b in zip(torch.randperm(VOCAB, generator=g)[:5], torch.empty(5).uniform_(-100, 100, generator=g))}
    return SamplingParams(presence_penalty=4 * u[0] - 2, frequency_penalty=4 * u[1] - 2, repetition_penalty=0.5 + 1.5 * u[2],
                          logit_bias=bias if u[3] < 0.7 else {}, **kw)


@pytest.mark.parametrize("seed", range(5))
def test_penalties_and_bias_equal_a_token_by_token_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, VOCAB, generator=g) * 3  # both signs: repetition divides some and multiplies others
    params = [random_penalties(g) for _ in range(8)]
    params[0] = SamplingParams(presence_penalty=1.5)  # each on its own too
    params[1] = SamplingParams(frequency_penalty=-0.7)
    params[2] = SamplingParams(repetition_penalty=1.3)
    params[3] = SamplingParams(logit_bias={7: 100.0, 8: -55.5})
    histories = [random_history(g) for _ in range(8)]
    got = adjust_logits(logits, params, histories)
    expected = torch.stack([reference_adjusted(row, p, *h) for row, p, h in zip(logits, params, histories)])
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(got, logits)  # the penalties did something


def test_greedy_rows_take_the_argmax_of_the_adjusted_logits_and_logprobs_stay_raw():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(16, VOCAB, generator=g)
    params = [random_penalties(g, temperature=0, logprobs=True) for _ in range(16)]
    histories = [random_history(g) for _ in range(16)]
    out = sample(logits, params, [None] * 16, histories)
    expected = torch.stack([reference_adjusted(row, p, *h) for row, p, h in zip(logits, params, histories)])
    assert torch.equal(out.tokens, expected.argmax(-1))
    assert not torch.equal(out.tokens, logits.argmax(-1))
    raw = logits.double().log_softmax(-1)
    assert torch.allclose(out.logprobs.double(), raw.gather(-1, out.tokens[:, None]).squeeze(-1), atol=1e-6)


def test_a_sampled_row_with_penalties_draws_as_from_its_adjusted_logits():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, VOCAB, generator=g) * 2
    p = random_penalties(g, temperature=0.8, top_k=40, top_p=0.9)
    history = random_history(g)
    plain = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    adjusted = reference_adjusted(logits[0], p, *history).float()[None]
    for seed in range(20):  # the same generator: the same draw
        got = sample(logits, [p], [make_generator(seed)], [history]).tokens
        assert torch.equal(got, sample(adjusted, [plain], [make_generator(seed)]).tokens)


def test_in_a_mixed_batch_every_row_gives_what_it_gives_alone():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(6, VOCAB, generator=g) * 2
    params = [random_penalties(g, temperature=0.9, seed=1), SamplingParams(temperature=0), random_penalties(g, temperature=0),
              SamplingParams(temperature=1.2), random_penalties(g, temperature=0.7, top_p=0.8), SamplingParams(temperature=0.5, top_k=5)]
    histories = [random_history(g) for _ in range(6)]
    batch_gens, alone_gens = ([None if p.greedy else make_generator(i) for i, p in enumerate(params)] for _ in range(2))
    for _ in range(10):  # the generators keep advancing alike
        batched = sample(logits, params, batch_gens, histories).tokens
        alone = [sample(logits[i : i + 1], [params[i]], [alone_gens[i]], [histories[i]]).tokens.item() for i in range(6)]
        assert batched.tolist() == alone


def test_a_batch_without_penalties_reads_no_history_and_builds_no_counts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain batch paid for penalties")

    monkeypatch.setattr(sampling, "adjust_logits", refuse)
    monkeypatch.setattr(torch, "bincount", refuse)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(13))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=3)]
    sample(logits, params, [None, make_generator(0), make_generator(1)])  # histories=None: nothing to read
    with pytest.raises(ValueError, match="token history"):
        sample(logits[:1], [SamplingParams(presence_penalty=0.5)], [make_generator(0)])


def test_neutral_values_adjust_nothing():
    assert not SamplingParams(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1, logit_bias={}).adjusts_logits
    assert all(SamplingParams(**kw).adjusts_logits for kw in ({"presence_penalty": -0.1}, {"frequency_penalty": 2}, {"repetition_penalty": 0.9},
                                                              {"logit_bias": {0: 0.0}}))


# ---------------------------------------------------------------------------- in the engine


def reference_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy tokens from transformers' forward over the whole prefix, adjusted by the reference."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(reference_adjusted(logits, params, tokens, len(prompt)).argmax()))
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def engine_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def test_frequency_penalty_stops_a_greedy_loop_as_the_reference_does(tiny_model_dir, hf_model):
    from quantkit.runtime.engine import LLM

    prompts = engine_prompts([6, 20], seed=5)
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=32)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    penalised = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0)
    for prompt, free, out in zip(prompts, llm.generate(prompts, plain), llm.generate(prompts, penalised)):
        assert max(Counter(free.token_ids).values()) > 1  # the random model repeats itself
        assert out.token_ids == reference_greedy(hf_model, prompt, penalised) != free.token_ids
        assert max(Counter(out.token_ids).values()) == 1  # a penalty of 2 outweighs this model's whole logit range


def test_penalised_requests_in_a_batch_get_what_they_get_alone_and_what_the_reference_says(tiny_model_dir, hf_model):
    from quantkit.runtime.engine import LLM

    prompts = engine_prompts([9, 30, 4, 17], seed=6)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=1.0, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={prompts[2][0]: 0.5, 7: -100.0}, repetition_penalty=0.7),
              SamplingParams(temperature=0.9, seed=4, max_tokens=10, ignore_eos=True, frequency_penalty=-1.0, presence_penalty=0.5)]
    alone = [LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16, max_num_batched_tokens=16).generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    for i in (0, 2):
        assert alone[i] == reference_greedy(hf_model, prompts[i], params[i])
