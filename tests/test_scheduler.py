"""The scheduler: token budget, chunked prefill, preemption, FIFO admission, aborts.

A fake model stands in for the runner: it writes each computed token's "K/V" (the prefix it
ends) into the slot the block table gives, checks that attention would read back exactly the
sequence's own prefix, and samples a deterministic function of the prefix. So outputs must not
depend on batching, preemption or prefix caching, and any bookkeeping error shows up as wrong K/V.
"""

import random

import pytest

from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.scheduler import QueueFull, ScheduledBatch, Scheduler, SchedulerConfig
from quantkit.runtime.sequence import Sequence, SequenceStatus

VOCAB = 50
EOS = 0


def next_token(tokens: list[int]) -> int:
    return hash(tuple(tokens)) % VOCAB  # ints and tuples of ints hash deterministically


def seq(prompt: list[int] | int, max_tokens: int = 8, ignore_eos: bool = True) -> Sequence:
    """A request; an int prompt means that many pseudo-random tokens."""
    if isinstance(prompt, int):
        prompt = [random.Random(prompt).randrange(1, VOCAB) for _ in range(prompt)]
    return Sequence(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))


def reference_output(s: Sequence) -> list[int]:
    """What the fake model generates for the sequence alone, one token at a time."""
    tokens = list(s.prompt_token_ids)
    while len(tokens) - s.num_prompt_tokens < s.params.max_tokens:
        tokens.append(next_token(tokens))
        if tokens[-1] == EOS and not s.params.ignore_eos:
            break
    return tokens[s.num_prompt_tokens :]


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.sched, self.kv = sched, {}

    def slot(self, s: Sequence, pos: int) -> int:
        bs = self.sched.config.block_size
        return s.block_table[pos // bs] * bs + pos % bs

    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        bm = self.sched.block_manager
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            start = s.num_computed_tokens
            for pos in range(start, start + n):
                block = s.block_table[pos // bm.block_size]
                assert bm.ref_counts[block] == 1 and bm.hashes[block] is None, "write into a shared block"
                self.kv[self.slot(s, pos)] = tuple(s.token_ids[: pos + 1])
            for pos in range(start + n):
                assert self.kv[self.slot(s, pos)] == tuple(s.token_ids[: pos + 1]), f"wrong K/V at {pos} for {s}"
        return {s.seq_id: next_token(s.token_ids) for s in batch.sampling_seqs}


def step(sched: Scheduler, model: FakeModel) -> ScheduledBatch:
    """One engine step, stop checks included, checking the limits and the preemption rules."""
    running, waiting, preemptions = list(sched.running), list(sched.waiting), sched.num_preemptions
    batch = sched.schedule()
    preempted = [s for s in running if s.status is SequenceStatus.WAITING]
    assert sched.num_preemptions - preemptions == len(preempted)
    if preempted:
        assert preempted == running[-len(preempted):]  # the most recently admitted
        assert list(sched.waiting) == preempted + waiting  # back at the front, in admission order
        assert not any(s in waiting for s in batch.seqs)  # a step that preempts admits nobody
    cfg = sched.config
    assert batch.total_tokens <= cfg.max_num_batched_tokens or (not cfg.chunked_prefill and len(batch) == 1)
    assert len(batch) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    for s in sched.update(batch, model.run(batch)):
        if s.last_token == EOS and not s.params.ignore_eos:
            sched.finish(s, "stop")
        elif s.num_generated >= s.params.max_tokens:
            sched.finish(s, "length")
    sched.check_invariants()
    return batch


def run_all(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> int:
    for steps in range(1, max_steps):
        step(sched, model)
        if not sched.has_unfinished():
            return steps
    raise AssertionError("did not finish")


def make(**kw) -> tuple[Scheduler, FakeModel]:
    sched = Scheduler(SchedulerConfig(**{"block_size": 4, "num_blocks": 64, **kw}))
    return sched, FakeModel(sched)


def test_token_budget_and_max_num_seqs_hold_every_step():
    sched, model = make(max_num_batched_tokens=16, max_num_seqs=4)
    seqs = [seq(n, max_tokens=1 + n % 5) for n in (1, 30, 7, 40, 3, 16, 17, 2, 25, 9)]
    for s in seqs:
        sched.add(s)
    run_all(sched, model)  # step() asserts the limits
    for s in seqs:
        assert s.status is SequenceStatus.FINISHED and s.finish_reason == "length"
        assert s.output_token_ids == reference_output(s)
    assert sched.num_free_blocks == 64


def test_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding():
    sched, model = make(max_num_batched_tokens=8)
    a, b = seq(3, max_tokens=50), seq(3, max_tokens=50)
    sched.add(a), sched.add(b)
    first = step(sched, model)
    assert first.seqs == [a, b] and first.num_new_tokens == [3, 3] and first.samples == [True, True]

    c = seq(30)
    sched.add(c)
    chunks = []
    while not c.is_prefill_done:
        batch = step(sched, model)
        assert batch.seqs == [a, b, c]
        assert batch.num_new_tokens[:2] == [1, 1] and batch.samples[:2] == [True, True]  # decodes not stalled
        chunks.append((batch.num_new_tokens[2], batch.samples[2]))
    # 6 tokens of budget left per step; only the last chunk reaches the end and samples.
    assert chunks == [(6, False)] * 4 + [(6, True)]
    assert c.num_generated == 1 and a.num_generated == 6


def test_max_num_seqs_keeps_later_sequences_waiting():
    sched, model = make(max_num_seqs=2)
    seqs = [seq(4, max_tokens=3), seq(5, max_tokens=5), seq(6, max_tokens=5)]
    for s in seqs:
        sched.add(s)
    batch = step(sched, model)
    assert batch.seqs == seqs[:2] and sched.num_waiting == 1
    step(sched, model)
    step(sched, model)  # seqs[0] generates its third token and finishes
    assert seqs[0].finish_reason == "length" and sched.num_waiting == 1
    batch = step(sched, model)
    assert batch.seqs == [seqs[1], seqs[2]]


def test_preemption_evicts_the_newest_which_resumes_first_and_everything_finishes():
    # 6 blocks of 4 tokens; each sequence grows to 4 + 8 = 12 tokens = 3 blocks: fits alone, not all three.
    sched, model = make(num_blocks=6, max_num_seqs=3, enable_prefix_caching=False)
    a, b, c = seq([1, 2, 3, 4], max_tokens=8), seq([5, 6, 7, 8], max_tokens=8), seq([9, 10, 11, 12], max_tokens=8)
    d = seq([13, 14, 15], max_tokens=2)  # waits for a seat (max_num_seqs): must not overtake the preempted c
    for s in (a, b, c, d):
        sched.add(s)
    while sched.num_preemptions == 0:
        batch = step(sched, model)
    assert batch.seqs == [a, b]  # the oldest got their blocks
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert list(sched.waiting) == [c, d] and c.num_generated > 0
    readmitted = None
    while readmitted is None:
        batch = step(sched, model)
        if c in batch.seqs:
            readmitted = batch
    assert readmitted.seqs == [c, d]
    # c recomputes its prompt and the tokens it had generated, as one prefill, then samples.
    assert readmitted.num_new_tokens[0] == c.num_tokens - 1 and readmitted.samples[0]
    run_all(sched, model)
    for s in (a, b, c, d):
        assert s.output_token_ids == reference_output(s)  # preemption does not change outputs
    assert sched.num_free_blocks == 6


def test_admission_is_fifo_and_nobody_starves():
    sched, model = make(num_blocks=10, max_num_seqs=3, max_num_batched_tokens=12)
    rng = random.Random(1)
    seqs = [seq(rng.randint(1, 14), max_tokens=rng.randint(1, 10)) for _ in range(15)]
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        queue = list(sched.waiting)
        batch = step(sched, model)
        admitted = [s for s in batch.seqs if s in queue]
        assert admitted == queue[: len(admitted)]  # only the head of the queue gets in
    assert sched.num_preemptions > 0  # the cache was tight enough to matter
    assert all(s.output_token_ids == reference_output(s) for s in seqs)


def test_prefix_cache_hits_skip_the_shared_blocks():
    sched, model = make()
    system = [3] * 8  # two full blocks
    a = seq(system + [5, 6], max_tokens=4)
    sched.add(a)
    step(sched, model)
    b = seq(system + [7], max_tokens=4)
    sched.add(b)
    batch = step(sched, model)
    assert b.num_cached_tokens == 8 and batch.num_new_tokens[batch.seqs.index(b)] == 1
    assert b.block_table[:2] == a.block_table[:2]
    assert sched.num_prefix_cache_hits == 8 and sched.num_prefix_cache_queries == 10 + 9
    run_all(sched, model)
    assert b.output_token_ids == reference_output(b)


def test_a_sequence_owing_prompt_logprobs_computes_its_whole_prompt_yet_names_its_blocks():
    sched, model = make()
    system = [3] * 8  # two full blocks
    scored = Sequence(system + [5, 6], SamplingParams(max_tokens=4, prompt_logprobs=True))
    sched.add(scored)
    step(sched, model)
    plain = seq(system + [7], max_tokens=4)
    again = Sequence(system + [8], SamplingParams(max_tokens=4, prompt_logprobs=True))
    sched.add(plain), sched.add(again)
    batch = step(sched, model)  # FakeModel checks that `again` writes no shared block
    assert plain.num_cached_tokens == 8 and plain.block_table[:2] == scored.block_table[:2]
    assert again.num_cached_tokens == 0 and batch.num_new_tokens[batch.seqs.index(again)] == 9
    assert sched.num_prefix_cache_queries == 9 and sched.num_prefix_cache_hits == 8  # only `plain` looked
    run_all(sched, model)
    assert sched.num_prompt_tokens_computed == 10 + 9 + 9 - 8
    assert sched.num_generation_tokens == 3 * 4


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    sched, model = make(max_num_seqs=2)
    a, b, c = seq(9, max_tokens=20), seq(5, max_tokens=20), seq(6, max_tokens=20)
    for s in (a, b, c):
        sched.add(s)
    step(sched, model)
    assert sched.num_used_blocks == 3 + 2
    assert sched.abort(a.seq_id)
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort" and a.block_table == []
    assert sched.num_used_blocks == 2
    assert sched.abort(c.seq_id) and sched.num_waiting == 0  # c was waiting
    assert not sched.abort(c.seq_id) and not sched.abort(10**9)
    # Aborted between schedule() and update(): the update skips it.
    batch = sched.schedule()
    sampled = model.run(batch)
    assert sched.abort(b.seq_id)
    assert sched.update(batch, sampled) == []
    assert not sched.has_unfinished() and sched.num_free_blocks == 64
    sched.check_invariants()


def test_queue_full_beyond_max_waiting():
    sched, model = make(max_waiting=2, max_num_seqs=1)
    sched.add(seq(3)), sched.add(seq(3))
    with pytest.raises(QueueFull):
        sched.add(seq(3))
    step(sched, model)  # one admitted: room again
    sched.add(seq(3))


def test_a_request_that_cannot_fit_the_whole_cache_is_rejected_at_add():
    sched, _ = make(num_blocks=4)  # 16 tokens in all
    with pytest.raises(ValueError, match=r"prompt 10 \+ max_tokens 7\) = 5 KV blocks.*holds 4 blocks"):
        sched.add(seq(10, max_tokens=7))
    sched.add(seq(10, max_tokens=6))
    with pytest.raises(ValueError, match="at least one prompt token"):
        Sequence([])


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it():
    sched, model = make(max_num_batched_tokens=8, chunked_prefill=False)
    a = seq(4, max_tokens=3)
    sched.add(a)
    step(sched, model)
    long, short = seq(20, max_tokens=2), seq(2, max_tokens=2)
    sched.add(long), sched.add(short)
    batch = step(sched, model)
    assert batch.seqs == [a]  # long does not fit next to a, and short may not overtake it
    while a.status is not SequenceStatus.FINISHED:
        step(sched, model)
    batch = step(sched, model)
    assert batch.seqs == [long] and batch.num_new_tokens == [20]  # alone, over budget, not stuck
    run_all(sched, model)
    assert long.output_token_ids == reference_output(long)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_random_traffic_with_aborts_ends_with_every_block_free(prefix_caching, chunked):
    rng = random.Random(f"{prefix_caching}-{chunked}")
    sched, model = make(num_blocks=14, max_num_seqs=5, max_num_batched_tokens=16,
                        enable_prefix_caching=prefix_caching, chunked_prefill=chunked)
    shared = [[rng.randrange(1, 4) for _ in range(rng.randint(1, 12))] for _ in range(3)]  # common system prompts
    pending = []
    for _ in range(60):
        prompt = rng.choice(shared) + [rng.randrange(1, 4) for _ in range(rng.randint(0, 8))]
        pending.append(seq(prompt, max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.5))
    everyone, aborted = list(pending), set()
    while pending or sched.has_unfinished():
        while pending and rng.random() < 0.6:
            try:
                sched.add(pending[0])
                pending.pop(0)
            except QueueFull:
                break
        if rng.random() < 0.05 and (sched.running or sched.waiting):
            victim = rng.choice([*sched.running, *sched.waiting])
            assert sched.abort(victim.seq_id)
            aborted.add(victim.seq_id)
        before = list(sched.running)
        batch = step(sched, model)
        # No running sequence skips a step unless preempted (max_num_seqs <= token budget).
        assert all(s in batch.seqs or s.status is SequenceStatus.WAITING for s in before)
    assert sched.num_free_blocks == 14 and sched.num_used_blocks == 0
    assert len(aborted) > 0 and sched.num_preemptions > 0
    assert (sched.num_prefix_cache_hits > 0) == prefix_caching
    for s in everyone:
        assert s.status is SequenceStatus.FINISHED
        if s.seq_id not in aborted:
            assert s.output_token_ids == reference_output(s), s
