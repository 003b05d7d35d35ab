"""Sampling: per-request parameters and one batched sampler whose randomness is per row.

Every random row draws its noise from its own `torch.Generator`, so a request's tokens depend
only on its logits, its parameters and its generator, never on which other requests share the
batch: with the same logits, a seeded request gives the same text alone or under load, and
across preemptions. The logits themselves are batch-invariant in float32 only (in bfloat16 the
kernels are chosen by the batch's row count; docs/architecture.md, "How the runtime works").
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

# Seeds for unseeded requests. Its own instance, so nothing else that touches `random` shifts them;
# an engine that wants reproducible unseeded runs passes its own `random.Random(seed)`.
_SEED_SOURCE = random.Random()


# Dividing logits by a temperature this small overflows fp32 to inf (softmax of inf is NaN), and
# the distribution is already a point mass on the argmax: such requests are greedy (as in vLLM).
GREEDY_BELOW_TEMPERATURE = 1e-5

# Stop strings are matched against every step's new text: bounded so that a request cannot make
# that cost (or the stream's held-back text) large. OpenAI allows 4 strings; vLLM sets no bound.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

# What torch.Generator.manual_seed accepts: any 64-bit seed, signed or unsigned (a negative seed
# is read as its two's complement, so -1 and 2**64 - 1 give the same stream).
SEED_RANGE = (-(2**63), 2**64 - 1)

# The most alternatives a position reports (vLLM's default max_logprobs; OpenAI allows 20).
MAX_TOP_LOGPROBS = 20
# OpenAI's bounds on logit_bias: at most 300 tokens, each biased by -100 to 100.
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGIT_BIAS = 100.0
# presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI). repetition_penalty lies in
# [0.01, 2] (1 = off, below 1 favours repetition): the top is common practice's; below the bottom,
# dividing logits by it heads for fp32 overflow (inf logits make the softmax NaN).
MAX_PENALTY = 2.0
REPETITION_PENALTY_RANGE = (0.01, 2.0)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)  # a single str is accepted and wrapped
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # the logprob of each generated token
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens at each generated position
    prompt_logprobs: bool = False  # the logprob of each prompt token given its prefix (and its top_logprobs alternatives)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of tokens in prompt or output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, ">= -1 (0 or -1 = off)", lambda v: v >= -1)
        _check_int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
        if self.seed is not None:
            low, high = SEED_RANGE
            _check_int("seed", self.seed, f"from -2**63 to 2**64 - 1 ({low} to {high}), or None", lambda v: low <= v <= high)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {short_repr(self.stop)}")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters each, "
                             f"got {len(self.stop)} strings, the longest {max(map(len, self.stop))} characters")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {short_repr(self.stop_token_ids)}")
        for name in ("ignore_eos", "logprobs", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {short_repr(getattr(self, name))}")
        _check_int("top_logprobs", self.top_logprobs, f"from 0 to {MAX_TOP_LOGPROBS}", lambda v: 0 <= v <= MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs ({self.top_logprobs}) needs logprobs=True")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]", lambda v: abs(v) <= MAX_PENALTY)
        low, high = REPETITION_PENALTY_RANGE
        _check_number("repetition_penalty", self.repetition_penalty, f"in [{low:g}, {high:g}] (1 = off)", lambda v: low <= v <= high)
        self._check_logit_bias()

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {short_repr(bias)}")
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {short_repr(token)}")
            _check_number(f"logit_bias[{token}]", value, f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", lambda v: abs(v) <= MAX_LOGIT_BIAS)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before sampling (they need the token history)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)


def short_repr(v: object, limit: int = 200) -> str:
    """repr for an error message, cut: the value may be as large as the request."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not to an API


def _check_int(name: str, v: object, allowed: str, ok) -> None:
    if not _is_int(v) or not ok(v):
        raise ValueError(f"{name} must be an int {allowed}, got {short_repr(v)}")


def _check_number(name: str, v: object, allowed: str, ok) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be a finite number {allowed}, got {short_repr(v)}")


def make_generator(seed: int | None = None, rng: random.Random | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator a sequence keeps for its whole life: seeded by the request, else from `rng`."""
    if seed is None:
        seed = (rng or _SEED_SOURCE).getrandbits(63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k, then top-p (over the top-k survivors), removes; rows [R, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p[:, None]) & (rank > 0), -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32: each token's logprob under the raw model distribution
    # [B, K], K = the largest top_logprobs asked in the batch (None if 0): the most likely tokens
    # first, under the same raw distribution; row i reads its first params[i].top_logprobs columns.
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: Seq[tuple[Seq[int], int]] | None = None) -> SamplerOutput:
    """Tokens, their logprobs and the top_logprobs alternatives for logits [B, V].

    First the rows that ask for them get their logit_bias, repetition_penalty, then frequency and
    presence penalties (vLLM's order), from histories[i] = (row i's token ids, prompt then output;
    the prompt's length); only rows that adjust their logits read it. Then temperature 0 -> argmax.
    Otherwise logits / temperature, top-k, top-p, then the exponential race argmax(p_i / E_i)
    with E_i ~ Exp(1) drawn from the row's generator: it picks i with probability p_i, and the draw
    uses V numbers from that generator only (a row without a generator falls back to torch's
    global one). Greedy rows draw nothing.

    Logprobs are under the raw model distribution, log_softmax(logits), before penalties, bias,
    temperature and filtering (vLLM's default): they measure the model, not the sampling settings.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} need one params and one generator per row, got {len(params)} and {len(generators)}")
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1)
    adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
    if adjusted:
        if histories is None or len(histories) != len(params):
            raise ValueError("penalties and logit_bias need each row's token history")
        idx = torch.tensor(adjusted, device=logits.device)
        logits = logits.index_copy(0, idx, adjust_logits(logits[idx], [params[i] for i in adjusted], [histories[i] for i in adjusted]))
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        vocab = logits.shape[-1]
        idx = torch.tensor(rows, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        x = logits[idx] / temperature[:, None]
        top_k = torch.tensor([min(params[i].top_k, vocab) if params[i].top_k > 0 else vocab for i in rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        if (top_k < vocab).any() or (top_p < 1).any():
            x = _filter_top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        noise = torch.stack([_exponential(vocab, generators[i], logits.device) for i in rows])
        tokens[idx] = (probs / noise).argmax(dim=-1)
    out = SamplerOutput(tokens, raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1))
    k = min(max((p.top_logprobs for p in params), default=0), logits.shape[-1])
    if k:
        out.top_logprobs, out.top_ids = raw_logprobs.topk(k, dim=-1)
    return out


def adjust_logits(x: torch.Tensor, params: list[SamplingParams], histories: list[tuple[Seq[int], int]]) -> torch.Tensor:
    """Rows x [R, V] with their logit_bias, repetition, then frequency and presence penalties applied."""
    vocab, device = x.shape[-1], x.device
    bias = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias.items()]
    if bias:
        r, t, b = zip(*bias)
        x = x.index_put((torch.tensor(r, device=device), torch.tensor(t, device=device)), torch.tensor(b, device=device), accumulate=True)
    if any(p.repetition_penalty != 1 for p in params):
        seen = _token_counts([ids for ids, _ in histories], vocab, device) > 0
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = _token_counts([ids[n:] for ids, n in histories], vocab, device).to(x.dtype)  # generated tokens only
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        x = x - frequency * counts - presence * (counts > 0)
    return x


def _token_counts(token_lists: list[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab]: how often each token occurs in each list, from one bincount over
    the lists concatenated (each offset by its row * vocab)."""
    lengths = torch.tensor([len(ids) for ids in token_lists], device=device)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    flat += torch.arange(len(token_lists), device=device).repeat_interleave(lengths) * vocab
    return torch.bincount(flat, minlength=len(token_lists) * vocab).view(-1, vocab)


def _exponential(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = gen.device if gen is not None else device
    e = torch.empty(n, device=where).exponential_(generator=gen)
    # Exp(1) can return exactly 0: p / 0 would be inf (or nan for p = 0, which argmax prefers).
    return e.clamp_min_(torch.finfo(e.dtype).tiny).to(device)
