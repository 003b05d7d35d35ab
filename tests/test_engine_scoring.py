"""LLMEngine.score: the model's exact log-likelihoods, computed in blocks lent by the engine's own
block manager, so that scoring between steps changes nothing for the sequences running."""

from __future__ import annotations

import pytest
import torch

from quantkit.runtime.engine import EngineConfig, LLMEngine
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.scoring import ScoreRequest, ScoringBusy

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
BLOCK = 16


def engine(model_dir, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", block_size=BLOCK, **options))


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def reference(hf, req: ScoreRequest) -> tuple[float, bool]:
    """The whole sequence in one plain forward, no cache: sum of the continuation's logprobs, all argmax."""
    with torch.no_grad():
        logp = hf(torch.tensor([req.context + req.continuation])).logits[0].double().log_softmax(-1)
    rows = range(len(req.context) - 1, len(req.context) + len(req.continuation) - 1)
    return (sum(float(logp[r, t]) for r, t in zip(rows, req.continuation)),
            all(int(logp[r].argmax()) == t for r, t in zip(rows, req.continuation)))


def random_tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, 500, (n,), generator=gen).tolist()


def mixed_requests(seed: int) -> list[ScoreRequest]:
    """Lone requests and groups sharing a context, with lengths around block edges."""
    gen = torch.Generator().manual_seed(seed)
    reqs = [ScoreRequest(random_tokens(c, gen), random_tokens(n, gen)) for c, n in ((1, 1), (15, 2), (16, 1), (33, 9), (70, 4))]
    for context_len in (BLOCK + 1, 2 * BLOCK + 5):
        context = random_tokens(context_len, gen)
        reqs += [ScoreRequest(context, random_tokens(n, gen)) for n in (1, 3, 7)]
    return reqs


def assert_scores_equal_reference(hf, reqs, scores):
    assert len(scores) == len(reqs)
    for req, score in zip(reqs, scores):
        expected, expected_greedy = reference(hf, req)
        assert score.logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert score.greedy == expected_greedy


def lent_sizes(eng: LLMEngine, monkeypatch) -> list[int]:
    """Record how many blocks each scoring batch borrows."""
    bm, sizes = eng.scheduler.block_manager, []
    allocate = bm.allocate_blocks

    def spy(n):
        sizes.append(n)
        return allocate(n)

    monkeypatch.setattr(bm, "allocate_blocks", spy)
    return sizes


def test_scores_equal_a_plain_full_sequence_forward_and_every_block_comes_back(tiny_model_dir, hf, monkeypatch):
    eng = engine(tiny_model_dir, num_blocks=32, max_num_batched_tokens=64)
    sizes = lent_sizes(eng, monkeypatch)
    reqs = mixed_requests(seed=0)
    assert_scores_equal_reference(hf, reqs, eng.score(reqs))
    # A 64-token budget is 4 blocks: several batches, each within it but for the 74-token request alone.
    assert len(sizes) > 1 and sorted(sizes)[-1] == 5 and all(n <= 4 for n in sorted(sizes)[:-1])
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.lent_blocks
    eng.scheduler.check_invariants()
    assert eng.score([]) == []


def test_a_shared_context_is_computed_once_and_scores_as_if_each_request_were_alone(tiny_model_dir, monkeypatch):
    eng = engine(tiny_model_dir, num_blocks=32)
    gen = torch.Generator().manual_seed(1)
    context = random_tokens(2 * BLOCK + 5, gen)
    group = [ScoreRequest(context, random_tokens(n, gen)) for n in (1, 3, 7)]
    alone = [eng.score([req])[0] for req in group]
    filled = []
    fill_cache = eng.runner.fill_cache
    monkeypatch.setattr(eng.runner, "fill_cache", lambda step: (filled.append(step.token_ids), fill_cache(step)))
    together = eng.score(group)
    assert filled == [[context[: 2 * BLOCK]]]  # the context's whole blocks (less its last token), once
    for a, t in zip(alone, together):
        assert t.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-4) and t.greedy == a.greedy


def test_scoring_between_steps_leaves_the_running_generation_and_the_books_intact(tiny_model_dir, hf, monkeypatch):
    prompt = random_tokens(40, torch.Generator().manual_seed(2))
    quiet = engine(tiny_model_dir, num_blocks=12)
    rid = quiet.add_request(prompt, GREEDY)
    while quiet.has_unfinished():
        outputs = quiet.step()
    expected_tokens = next(o for o in outputs if o.request_id == rid).token_ids

    busy = engine(tiny_model_dir, num_blocks=12)
    bm = busy.scheduler.block_manager
    rid = busy.add_request(prompt, GREEDY)
    for _ in range(3):
        busy.step()
    seq = busy.sequences[rid]
    owned, free_before = set(seq.block_table), bm.num_free_blocks
    lent = []
    allocate = bm.allocate_blocks
    monkeypatch.setattr(bm, "allocate_blocks", lambda n: lent.append(allocate(n)) or lent[-1])
    reqs = mixed_requests(seed=3)  # more blocks in all than the 9 left free: several batches
    assert_scores_equal_reference(hf, reqs, busy.score(reqs))
    assert sum(map(len, lent)) > free_before and all(not owned & set(blocks) for blocks in lent)
    assert bm.num_free_blocks == free_before and set(seq.block_table) == owned
    busy.scheduler.check_invariants()
    while busy.has_unfinished():
        outputs = busy.step()
        busy.scheduler.check_invariants()
    assert next(o for o in outputs if o.request_id == rid).token_ids == expected_tokens


def test_scoring_unnames_the_free_prefix_cache_blocks_it_overwrites(tiny_model_dir):
    eng = engine(tiny_model_dir, num_blocks=6)
    prompt = random_tokens(40, torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def generate():
        rid = eng.add_request(prompt, params)
        while eng.has_unfinished():
            outputs = eng.step()
        return next(o for o in outputs if o.request_id == rid)

    first = generate()
    bm = eng.scheduler.block_manager
    assert bm.hash_to_block  # the finished prompt's whole blocks stay named in the free list
    eng.score([ScoreRequest(random_tokens(90, torch.Generator().manual_seed(5)), [1, 2, 3])])  # 92 inputs: all 6 blocks
    assert not bm.hash_to_block
    eng.scheduler.check_invariants()
    again = generate()  # a stale name would serve the scored tokens' K/V as this prompt's
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids


def test_requests_that_cannot_be_scored_are_refused_with_the_fix(tiny_model_dir, hf):
    eng = engine(tiny_model_dir, num_blocks=8)
    bm = eng.scheduler.block_manager
    ok = ScoreRequest([1, 2, 3], [4])
    longest = eng.max_model_len
    with pytest.raises(ValueError, match="more than the model's context .* truncate its context"):
        eng.score([ok, ScoreRequest([5] * longest, [6, 7])])
    with pytest.raises(ValueError, match="whole cache holds 8: raise kv_cache_memory"):
        eng.score([ScoreRequest([5] * 200, [6])])
    with pytest.raises(ValueError, match="empty continuation"):
        eng.score([ScoreRequest([1], [])])
    with pytest.raises(ValueError, match="empty context"):
        eng.score([ScoreRequest([], [1])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.score([ScoreRequest([1], [10**6])])
    # Fits the cache, but not what a running sequence leaves free: refused, nothing lent.
    eng.add_request([1] * 60, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    eng.step()
    free = bm.num_free_blocks
    with pytest.raises(ScoringBusy, match=f"leave {free} of 8 free: score when fewer requests are running"):
        eng.score([ScoreRequest([5] * 100, [6])])
    assert bm.num_free_blocks == free and not bm.lent_blocks
    eng.scheduler.check_invariants()
    # The longest window that fits: the context's length, the last token only predicted.
    longest_fit = ScoreRequest(random_tokens(longest, torch.Generator().manual_seed(7)), [6])
    assert_scores_equal_reference(hf, [longest_fit], engine(tiny_model_dir, num_blocks=64).score([longest_fit]))


def test_blocks_come_back_when_the_model_fails_mid_batch(tiny_model_dir, monkeypatch):
    eng = engine(tiny_model_dir, num_blocks=16)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng.runner, "token_logprobs", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.score(mixed_requests(seed=6))
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.lent_blocks
    eng.scheduler.check_invariants()
