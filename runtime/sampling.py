"""Sampling: per-request parameters and one batched sampler whose randomness is per row.

Every random row draws its noise from its own `torch.Generator`, so a request's tokens depend
only on its logits, its parameters and its generator, never on which other requests share the
batch: with the same logits, a seeded request gives the same text alone or under load, and
across preemptions. The logits themselves are batch-invariant in float32 only (in bfloat16 the
kernels are chosen by the batch's row count; README, "How the runtime works").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

# Seeds for unseeded requests. Its own instance, so nothing else that touches `random` shifts them;
# an engine that wants reproducible unseeded runs passes its own `random.Random(seed)`.
_SEED_SOURCE = random.Random()


# Dividing logits by a temperature this small overflows fp32 to inf (softmax of inf is NaN), and
# the distribution is already a point mass on the argmax: such requests are greedy (as in vLLM).
GREEDY_BELOW_TEMPERATURE = 1e-5


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
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, ">= -1 (0 or -1 = off)", lambda v: v >= -1)
        _check_int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, "or None", lambda v: True)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not to an API


def _check_int(name: str, v: object, allowed: str, ok) -> None:
    if not _is_int(v) or not ok(v):
        raise ValueError(f"{name} must be an int {allowed}, got {v!r}")


def _check_number(name: str, v: object, allowed: str, ok) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be a finite number {allowed}, got {v!r}")


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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and their logprobs [B] for logits [B, V].

    temperature 0 -> argmax. Otherwise logits / temperature, top-k, top-p, then the exponential
    race argmax(p_i / E_i) with E_i ~ Exp(1) drawn from the row's generator: it picks i with
    probability p_i, and the draw uses V numbers from that generator only (a row without a
    generator falls back to torch's global one). Greedy rows draw nothing.

    The logprob is under the raw model distribution, log_softmax(logits), before temperature and
    filtering (vLLM's default): it measures the model, not the sampling settings.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"logits {tuple(logits.shape)} need one params and one generator per row, got {len(params)} and {len(generators)}")
    logits = logits.float()
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
    logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def _exponential(n: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = gen.device if gen is not None else device
    e = torch.empty(n, device=where).exponential_(generator=gen)
    # Exp(1) can return exactly 0: p / 0 would be inf (or nan for p = 0, which argmax prefers).
    return e.clamp_min_(torch.finfo(e.dtype).tiny).to(device)
