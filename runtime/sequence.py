"""One request's state as the scheduler, the block manager and the model runner see it."""

from __future__ import annotations

import itertools
from enum import Enum, auto

from .sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # queued, or preempted: holds no blocks
    RUNNING = auto()  # admitted: holds blocks, scheduled every step
    FINISHED = auto()  # done or aborted: blocks freed


_ids = itertools.count()
_arrivals = itertools.count()


class Sequence:
    """A prompt followed by its generated tokens, and how much of it sits in the KV cache.

    The model still has to compute token_ids[num_computed_tokens:]; when that computation reaches
    the end of token_ids it samples the next token. Preemption drops the cache and sets
    num_computed_tokens to 0, so generated tokens are recomputed as if they were prompt.
    """

    def __init__(self, token_ids: list[int], params: SamplingParams | None = None, seq_id: int | None = None):
        if len(token_ids) == 0:
            raise ValueError("a sequence needs at least one prompt token (the model samples from the last one)")
        self.seq_id: int = next(_ids) if seq_id is None else seq_id
        self.arrival: int = next(_arrivals)  # process-wide order of creation
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens: int = len(token_ids)
        self.num_computed_tokens: int = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens: int = 0  # of those, prefix-cache hits at the last admission
        self.block_table: list[int] = []
        # Chained content hashes of the leading full, computed blocks (prefix caching bookkeeping).
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        self.params = params if params is not None else SamplingParams()
        self.generator = None  # torch.Generator set by the engine (sampling.make_generator)
        self.finish_reason: str | None = None
        self.output_logprobs: list[float] = []

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"prompt={self.num_prompt_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: 1 when decoding, more during (re)prefill."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def max_num_tokens(self) -> int:
        """The longest this sequence can grow: what the KV cache must be able to hold."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks needed to hold num_tokens (default: all current) tokens."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def append_token(self, token_id: int, logprob: float | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
