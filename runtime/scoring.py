"""Scoring: log p(continuation | context) for many requests, computed in the engine's KV cache.

This is what lm-eval's log-likelihood requests need (LLMEngine.score): no sampling, no
scheduling across steps, just whole sequences run through the model in as few passes as the
cache and the token budget allow, with the logprob of every continuation token read off the
rows that predict it.

Multiple-choice tasks score several continuations of one context (HellaSwag: 4, PIQA: 2). A
group of such requests computes the context's whole blocks once, in shared cache blocks, and
each request then computes only its own tail on top: prefix caching, used for scoring. The
planning here decides the groups and packs them into batches; the engine lends the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .model_runner import StepInput


@dataclass(frozen=True)
class ScoreRequest:
    """Score `continuation` as what follows `context` (both token ids; neither may be empty)."""

    context: list[int]
    continuation: list[int]

    @property
    def inputs(self) -> list[int]:
        """The tokens run through the model: the last one is only predicted."""
        return (self.context + self.continuation)[:-1]


@dataclass(frozen=True)
class Score:
    """Sum of the continuation tokens' logprobs, and whether each was the model's argmax."""

    logprob: float
    greedy: bool


class ScoringBusy(RuntimeError):
    """Running sequences hold so much of the cache that a request cannot fit what is free."""


def shared_len(group: Sequence[ScoreRequest], block_size: int) -> int:
    """Context tokens computed once for the group: whole blocks, leaving at least the context's
    last token to each request (its output predicts the first continuation token)."""
    if len(group) < 2:
        return 0
    return (len(group[0].context) - 1) // block_size * block_size


def blocks_needed(group: Sequence[ScoreRequest], block_size: int) -> int:
    shared = shared_len(group, block_size)
    return shared // block_size + sum(-(-(len(r.inputs) - shared) // block_size) for r in group)


def context_groups(requests: Sequence[ScoreRequest], block_size: int, budget: int) -> Iterator[list[int]]:
    """Indices of requests with the same context, split where a group would not fit `budget` tokens of blocks."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(requests):
        by_context.setdefault(tuple(req.context), []).append(i)
    for group in by_context.values():
        part: list[int] = []
        for i in group:
            if part and blocks_needed([requests[j] for j in part + [i]], block_size) * block_size > budget:
                yield part
                part = []
            part.append(i)
        yield part


def plan_batches(requests: Sequence[ScoreRequest], block_size: int, budget: int) -> Iterator[list[list[int]]]:
    """Batches of groups (request indices), each within `budget` tokens of blocks unless one
    request alone is larger. Largest first, so a batch too big for the device fails at once."""
    sized = sorted(((blocks_needed([requests[i] for i in g], block_size) * block_size, g)
                    for g in context_groups(requests, block_size, budget)), key=lambda item: -item[0])
    batch: list[list[int]] = []
    used = 0
    for need, group in sized:
        if batch and used + need > budget:
            yield batch
            batch, used = [], 0
        batch.append(group)
        used += need
    if batch:
        yield batch


@dataclass
class ScoringPasses:
    """A batch laid out on its blocks: `shared` fills the groups' shared context blocks (None when
    no group shares), `own` then computes every request's own tokens; `rows` of `own`'s flattened
    tokens predict `targets`, `counts[k]` of them for the batch's k-th request."""

    shared: StepInput | None
    own: StepInput
    rows: list[int]
    targets: list[int]
    counts: list[int]


def lay_out(requests: Sequence[ScoreRequest], batch: list[list[int]], blocks: list[int], block_size: int) -> ScoringPasses:
    """Two passes over `blocks` (exactly the batch's blocks_needed): the shared context, then each request on top."""
    free = iter(blocks)

    def take(n_tokens: int) -> list[int]:
        return [next(free) for _ in range(-(-n_tokens // block_size))]

    shared_pass = StepInput([], [], [], [])
    own_pass = StepInput([], [], [], [])
    rows, targets, counts, offset = [], [], [], 0
    for group in batch:
        reqs = [requests[i] for i in group]
        shared = shared_len(reqs, block_size)
        shared_blocks = take(shared)
        if shared:
            shared_pass.token_ids.append(reqs[0].context[:shared])
            shared_pass.starts.append(0)
            shared_pass.block_tables.append(shared_blocks)
            shared_pass.sample.append(False)
        for req in reqs:
            own = req.inputs[shared:]
            own_pass.token_ids.append(own)
            own_pass.starts.append(shared)
            own_pass.block_tables.append(shared_blocks + take(len(own)))
            own_pass.sample.append(False)
            n_cont = len(req.continuation)
            rows.extend(range(offset + len(own) - n_cont, offset + len(own)))  # the positions predicting the continuation
            targets.extend(req.continuation)
            counts.append(n_cont)
            offset += len(own)
    return ScoringPasses(shared_pass if shared_pass.token_ids else None, own_pass, rows, targets, counts)
