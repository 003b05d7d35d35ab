"""Iteration-level continuous batching (vLLM v1 style): each step, a token budget over sequences.

There is no prefill or decode phase: a sequence simply needs len(token_ids) - num_computed_tokens
tokens computed. Running sequences go first in admission order, each taking what it needs up to
the remaining budget (so a long prompt is prefilled in chunks while the others keep decoding);
then waiting sequences are admitted FIFO into what is left. When the cache runs out of blocks,
the most recently admitted sequence is preempted by recomputation: its blocks are freed and it
goes back to the front of the queue. The oldest running sequence is therefore never preempted
while others run, and since add() only accepts a sequence that fits the cache alone, it always
progresses: every sequence finishes.

Decodes never wait behind a long prompt: a partial chunk uses up the budget, so nothing is
admitted behind it, and only the last running sequence can be mid-prefill. With max_num_seqs <=
max_num_batched_tokens, every running sequence is therefore in every step's batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, _check
from .sequence import Sequence, SequenceStatus


class QueueFull(Exception):
    """The waiting queue is at max_waiting: the server answers 503 and the client retries later."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step (the running set)
    max_num_batched_tokens: int = 512  # tokens computed in one step
    max_waiting: int = 256
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    # Off: a sequence's remaining tokens are computed in one step. One longer than the budget is
    # admitted only into an otherwise empty step (over budget) rather than rejected, because a
    # preempted sequence's prompt + generated tokens may outgrow a budget its prompt fitted.
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")


@dataclass
class ScheduledBatch:
    """What the model computes this step: seqs[i].token_ids[c : c + num_new_tokens[i]], c = its num_computed_tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # computation reaches the end: sample a token

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.samples.append(seq.num_computed_tokens + n == seq.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [s for s, sample in zip(self.seqs, self.samples) if sample]


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        # Cumulative, for metrics. Prefix cache, in tokens as vLLM counts: those looked up at
        # admissions (hit rate = hits / queries) and, of those, found cached.
        self.num_preemptions = 0
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0
        self.num_prompt_tokens_computed = 0  # prefill work done: cache hits excluded, recomputation after preemption included
        self.num_generation_tokens = 0  # tokens sampled

    def add(self, seq: Sequence) -> None:
        cfg = self.config
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"only a new sequence can be added, got {seq}")
        needed = seq.num_blocks(cfg.block_size, seq.max_num_tokens)
        if needed > cfg.num_blocks:  # it would preempt itself forever
            raise ValueError(
                f"request needs up to {seq.max_num_tokens} tokens (prompt {seq.num_prompt_tokens} + max_tokens "
                f"{seq.params.max_tokens}) = {needed} KV blocks, but the whole cache holds {cfg.num_blocks} blocks "
                f"of {cfg.block_size} tokens ({cfg.num_blocks * cfg.block_size} tokens): shorten the prompt or lower max_tokens")
        if len(self.waiting) >= cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting (max_waiting={cfg.max_waiting})")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        cfg, bm = self.config, self.block_manager
        batch, budget, preempted = ScheduledBatch(), cfg.max_num_batched_tokens, False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.ensure_slots(seq, n):
                victim = self.running.pop()  # the most recently admitted: never one already in the batch
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            batch.add(seq, n)
            budget -= n
            i += 1

        # Admitting while preempting would take the blocks back from whom we just freed them for.
        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.allocate_prompt(seq)
            n = seq.num_uncomputed_tokens
            if cfg.chunked_prefill:
                n = min(n, budget)
            elif n > budget and len(batch) > 0:
                self._undo_admission(seq)  # wait for a step with room for the whole remainder
                break
            if not bm.ensure_slots(seq, n):
                self._undo_admission(seq)  # FIFO: nobody jumps the queue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if bm.reads_prefix_cache(seq):
                self.num_prefix_cache_queries += seq.num_tokens
                self.num_prefix_cache_hits += cached
            batch.add(seq, n)
            budget -= n
        return batch

    def _undo_admission(self, seq: Sequence) -> None:
        self.block_manager.free(seq)  # returns the prefix hits, still named, to the free list
        seq.num_cached_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)  # num_computed_tokens = 0: prompt and outputs are recomputed
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # first back in: no starvation
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: dict[int, int], logprobs: dict[int, float] | None = None,
               top_logprobs: dict[int, dict[int, float]] | None = None) -> list[Sequence]:
        """Record a step's computation; append sampled tokens (with their logprobs and top
        alternatives, where given); return the sequences that got one."""
        out = []
        for seq, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update()
            prompt = seq.num_prompt_tokens
            self.num_prompt_tokens_computed += min(seq.num_computed_tokens + n, prompt) - min(seq.num_computed_tokens, prompt)
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
            if samples:
                if seq.seq_id not in sampled:
                    raise ValueError(f"sequence {seq.seq_id} completed its computation but no token was sampled for it")
                seq.append_token(sampled[seq.seq_id], (logprobs or {}).get(seq.seq_id), (top_logprobs or {}).get(seq.seq_id))
                self.num_generation_tokens += 1
                out.append(seq)
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq_id: int) -> bool:
        """Finish a waiting or running sequence with reason "abort"; False if it is not here."""
        for seq in (*self.running, *self.waiting):
            if seq.seq_id == seq_id:
                self.finish(seq, "abort")
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    def check_invariants(self) -> None:
        for seq in self.waiting:
            _check(seq.status is SequenceStatus.WAITING and not seq.block_table, f"waiting sequence holds blocks: {seq}")
        for seq in self.running:
            _check(seq.status is SequenceStatus.RUNNING, f"running list holds {seq}")
        self.block_manager.check_invariants(self.running)
