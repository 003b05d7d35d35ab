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
        self.detokenizer = None  # IncrementalDetokenizer set by the engine: the output's text, a few tokens decoded a step
        self.finish_reason: str | None = None
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[dict[int, float]] = []  # per output token with top_logprobs > 0
        # Per prompt token, when asked: its logprob given its prefix (the first has no prefix: None),
        # and its top_logprobs alternatives. Filled in as the prefill computes the rows before them.
        p = self.params
        self.prompt_logprobs: list[float | None] | None = [None] if p.prompt_logprobs else None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = [None] if p.prompt_logprobs and p.top_logprobs else None
        self.stops = StopStrings(self.params.stop)  # the output text and where a stop string cuts it

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
    def owes_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed: the rows before them must run, so
        admission takes no prefix-cache hits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks needed to hold num_tokens (default: all current) tokens."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def append_token(self, token_id: int, logprob: float | None = None, top_logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top_logprobs is not None:
            self.output_top_logprobs.append(top_logprobs)

    def add_prompt_logprobs(self, logprobs: list[float], top_logprobs: list[dict[int, float]] | None = None) -> None:
        """The logprobs of the next len(logprobs) prompt tokens (and their alternatives, if asked)."""
        self.prompt_logprobs.extend(logprobs)
        if self.prompt_top_logprobs is not None:
            self.prompt_top_logprobs.extend(top_logprobs)


class StopStrings:
    """A sequence's output text, and the first stop string in it, read a step at a time.

    For each stop string it keeps how long a prefix of that string the text read so far ends with
    (Knuth-Morris-Pratt), so a step reads only its new characters, once per stop string, however
    long the text is. The longest such partial match is what a stream must hold back: the next
    step may complete it.
    """

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self._longest = max(map(len, self.stops), default=0)
        self._borders = [_borders(s) for s in self.stops]
        self._matched = [0] * len(self.stops)
        self._read = ""  # the text read so far: `text` without a trailing partial character
        self.text = ""  # the decoded output so far, cut before the stop string once one appears
        self.stopped = False

    @property
    def stable_len(self) -> int:
        """How much of `text` no later step can change or cut: what a stream may send now."""
        if self.stopped:
            return len(self.text)
        return len(self._read) - max(self._matched, default=0)

    def update(self, text: str) -> bool:
        """Take the whole output decoded so far; True once it holds a stop string, and then `text`
        ends right before the earliest one (by where it begins; ties: whichever is listed first)."""
        if self.stopped:
            return True
        self.text = text
        # U+FFFD at the end is a character whose bytes have not all been generated yet.
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        if not self.stops:
            self._read = text[:end]
            return False
        start = len(self._read)
        if not text.startswith(self._read):
            # The decoder rewrote some of what it gave before (e.g. its clean-up of spaces before
            # punctuation): start again where the texts part, from no partial match, a longest
            # stop's length earlier (a partial match is shorter than that).
            start = _common_prefix_len(self._read, text)
            self._matched = [0] * len(self.stops)
            self._find(text, max(0, start - self._longest + 1), start)  # no full match there: it was read before
        self._read = text[:end]
        at = self._find(text, start, end)
        if at is None:
            return False
        self.text, self.stopped = text[:at], True
        return True

    def _find(self, text: str, start: int, end: int) -> int | None:
        """Read text[start:end]; where the earliest stop string completed in it begins, or None."""
        earliest = None
        for j, stop in enumerate(self.stops):
            k, borders, n = self._matched[j], self._borders[j], len(stop)
            for i in range(start, end):
                c = text[i]
                while k and stop[k] != c:
                    k = borders[k - 1]
                if stop[k] == c:
                    k += 1
                    if k == n:  # this stop's first occurrence: later ones begin later
                        if earliest is None or i - n + 1 < earliest:
                            earliest = i - n + 1
                        k = borders[k - 1]
                        break
            self._matched[j] = k
        return earliest


def _borders(s: str) -> list[int]:
    """borders[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    borders, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = borders[k - 1]
        if s[i] == s[k]:
            k += 1
        borders[i] = k
    return borders


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over C-speed comparisons."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low
