"""Prompt logprobs, top logprobs and the engine's counters, against a dense forward of the whole sequence.

Prompt logprobs must come out complete and equal to the dense reference however the prompt was
computed: in chunks, beside a prefix another request has cached, or recomputed after preemption.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.runtime.engine import LLM, EngineConfig, LLMEngine, RequestOutput
from quantkit.runtime.sampling import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    """log_softmax of transformers' forward over a whole sequence, in float64: row i predicts token i + 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].double().log_softmax(-1)

    return logprobs


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


def assert_top(got: dict[int, float], row: torch.Tensor, k: int) -> None:
    """The k most likely tokens of a reference row, most likely first. Near-ties (the tiny model has
    some within 1e-5) may swap places, so: the values are the reference's top k, and each id's
    reference logprob is the value reported for it."""
    assert len(got) == k
    values = list(got.values())
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(row.topk(k).values.tolist(), abs=TOL)
    assert [float(row[t]) for t in got] == pytest.approx(values, abs=TOL)


def assert_prompt_logprobs(out: RequestOutput, dense, top_k: int = 0) -> None:
    reference = dense(out.prompt_token_ids)
    prompt = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx([float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=TOL)
    if not top_k:
        assert out.prompt_top_logprobs is None
        return
    assert len(out.prompt_top_logprobs) == len(prompt) and out.prompt_top_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert_top(out.prompt_top_logprobs[i], reference[i - 1], top_k)


def assert_output_logprobs(out: RequestOutput, dense, top_k: int) -> None:
    reference = dense(out.prompt_token_ids + out.token_ids)
    rows = range(len(out.prompt_token_ids) - 1, len(out.prompt_token_ids) - 1 + len(out.token_ids))
    assert out.logprobs == pytest.approx([float(reference[r, t]) for r, t in zip(rows, out.token_ids)], abs=TOL)
    assert len(out.top_logprobs) == len(out.token_ids)
    for r, top in zip(rows, out.top_logprobs):
        assert_top(top, reference[r], top_k)


def test_prompt_and_top_logprobs_equal_a_dense_forward_with_chunked_prefill(tiny_model_dir, dense):
    prompts = random_prompts([45, 7, 1], seed=0)
    asks = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5, prompt_logprobs=True)
    plain = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    # a 16-token budget: the long prompt is scored over several steps, beside the others
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16, max_num_batched_tokens=16)
    long, other, one = llm.generate(prompts, [asks, plain, asks])
    assert_prompt_logprobs(long, dense, top_k=5)
    assert_output_logprobs(long, dense, top_k=5)
    assert one.prompt_logprobs == [None] and one.prompt_top_logprobs == [None]
    assert other.prompt_logprobs is None and other.prompt_top_logprobs is None and other.top_logprobs == [] and other.logprobs == []
    # the alternatives follow top_logprobs alone; without it, the prompt logprobs come on their own
    only_prompt = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=True))[0]
    assert_prompt_logprobs(only_prompt, dense, top_k=0)
    assert only_prompt.top_logprobs == [] and only_prompt.logprobs == []


def test_prompt_logprobs_take_no_prefix_hits_yet_publish_their_blocks_and_the_counters_add_up(tiny_model_dir, dense):
    system, other_system = random_prompts([32, 32], seed=1)  # two full blocks each
    tails = random_prompts([5, 9, 3, 6, 4], seed=2)
    asks = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=True, logprobs=True, top_logprobs=2)
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=16)

    def run(prompt: list[int], params: SamplingParams) -> RequestOutput:
        return llm.generate([prompt], params)[0]

    first = run(system + tails[0], plain)  # caches system
    shared = run(system + tails[1], asks)  # must compute system itself
    assert shared.num_cached_tokens == 0
    assert_prompt_logprobs(shared, dense, top_k=2)
    assert_output_logprobs(shared, dense, top_k=2)
    publisher = run(other_system + tails[2], asks)  # the first to compute other_system: names its blocks
    reader = run(other_system + tails[3], plain)
    assert reader.num_cached_tokens == 32
    hit = run(system + tails[4], plain)
    assert hit.num_cached_tokens == 32

    outputs = [first, shared, publisher, reader, hit]
    stats = llm.engine.stats()
    looked_up = [first, reader, hit]  # the prompt-logprob requests never looked
    assert stats["prefix_cache_queries"] == sum(len(o.prompt_token_ids) for o in looked_up)
    assert stats["prefix_cache_hits"] == 64
    assert stats["prompt_tokens_computed"] == sum(len(o.prompt_token_ids) for o in outputs) - 64
    assert stats["generation_tokens"] == sum(len(o.token_ids) for o in outputs) == 3 * 4 + 2 * 3
    assert stats["kv_blocks_total"] == 16 == stats["kv_blocks_free"] + stats["kv_blocks_used"]
    assert {"running", "waiting", "preemptions"} <= stats.keys()


def test_prompt_logprobs_survive_preemption_mid_prefill_without_duplicates(tiny_model_dir, dense):
    prompts = random_prompts([30, 45, 20, 50], seed=7)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=True, logprobs=True, top_logprobs=3)
    llm = LLM(str(tiny_model_dir), dtype="float32", num_blocks=10, max_num_batched_tokens=8)
    sched = llm.engine.scheduler
    preempted_mid_prefill = []
    preempt = sched._preempt

    def watch(seq):
        if 1 < len(seq.prompt_logprobs) < seq.num_prompt_tokens:
            preempted_mid_prefill.append(seq.seq_id)
        preempt(seq)

    sched._preempt = watch
    outputs = llm.generate(prompts, params)
    assert preempted_mid_prefill  # some prompt logprobs were already in when its K/V was dropped
    alone = [LLM(str(tiny_model_dir), dtype="float32", num_blocks=16).generate([p], params)[0] for p in prompts]
    for out, ref in zip(outputs, alone):
        assert_prompt_logprobs(out, dense, top_k=3)
        assert out.token_ids == ref.token_ids
        assert_output_logprobs(out, dense, top_k=3)
    assert sched.num_free_blocks == 10


def test_logit_bias_ids_outside_the_vocabulary_are_refused(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_blocks=16))
    vocab = engine.runner.config.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias token id {vocab} is outside the vocabulary \[0, {vocab}\)"):
        engine.add_request([1, 2, 3], SamplingParams(logit_bias={1: 1.0, vocab: 2.0}))
    assert not engine.has_unfinished()
    engine.add_request([1, 2, 3], SamplingParams(logit_bias={vocab - 1: 2.0}))
