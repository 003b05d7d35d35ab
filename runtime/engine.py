"""The engine: requests in, tokens out. step() = schedule -> run -> postprocess.

`LLMEngine` is what the server, `quantkit bench` and `quantkit eval` drive; `LLM` wraps it for
offline batch jobs: LLM(path).generate(prompts, SamplingParams(...)). `LLMEngine.score` computes
log-likelihoods (lm-eval's) in the same KV cache, between steps (runtime/scoring.py).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import torch

from quantkit.sources import load_tokenizer

from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, RowLogprobs, RunnerLimits, StepInput
from .sampling import SamplingParams, make_generator, sample
from .scheduler import QueueFull, ScheduledBatch, Scheduler, SchedulerConfig
from .scoring import Score, ScoreRequest, ScoringBusy, blocks_needed, lay_out, plan_batches
from .sequence import Sequence
from .weights import load_weights



@dataclass
class EngineConfig:
    model: str  # artifact directory, model directory, hub id or "smollm2-135m"
    dtype: str = "bfloat16"  # bfloat16: the fast CPU path; float32: exact comparisons
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of K/V cache (sets the number of blocks); None: the device's default (ModelRunner)
    num_blocks: int | None = None  # overrides kv_cache_memory (tests)
    gpu_memory_utilization: float = 0.9  # CUDA without kv_cache_memory: the share of the GPU's memory the engine may hold, KV cache included
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying captured CUDA graphs
    activations: str = "bf16"  # "int8": W4A8 for batched CPU steps (a serving choice; kernels/backend.py says what ran)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    seed: int = 0  # seeds the generators of requests that bring no seed
    device: str = "auto"  # "cpu", "cuda", or "auto": cuda where torch sees a GPU (kernels/backend.py picks the kernels)
    int8_head: bool | None = None  # decode reads an int8 copy of the output head (half the bytes of bf16); None: where lossless


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated text so far (cut before a stop string)
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    logprobs: list[float] = field(default_factory=list)  # per output token, with logprobs
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token with top_logprobs > 0: most likely first
    # With prompt_logprobs, aligned with prompt_token_ids (the first token has no prefix: None);
    # the alternatives only with top_logprobs > 0 too.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    # How much of `text` no later output changes: a stream holds back the rest (a partial UTF-8
    # character, the start of a possible stop string). All of it once finished.
    stable_len: int = 0
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if config.dtype not in _DTYPES:
            raise ValueError(f"dtype {config.dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        self.config = config
        weights = load_weights(config.model)
        self.tokenizer = load_tokenizer(weights.path)
        self.runner = ModelRunner(weights, _DTYPES[config.dtype], config.block_size, config.kv_cache_memory, config.num_blocks,
                                  int8_head=config.int8_head, device=config.device, limits=RunnerLimits(
                                      max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                      max_model_len=config.max_model_len, gpu_memory_utilization=config.gpu_memory_utilization,
                                      enforce_eager=config.enforce_eager, activations=config.activations))
        self.quantized = weights.quantized
        self.model_name = str(config.model)
        self.max_model_len = min(config.max_model_len or self.runner.max_model_len, self.runner.max_model_len)
        self.eos_token_ids = _eos_token_ids(weights.path, weights.config, self.tokenizer)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting=config.max_waiting,
            block_size=config.block_size,
            num_blocks=self.runner.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            chunked_prefill=config.chunked_prefill,
        ))
        self.sequences: dict[int, Sequence] = {}
        self._meta: dict[int, dict] = {}  # per request: arrival, first token time
        # No token spans more characters than the longest vocabulary entry (byte-level entries
        # have a character per byte; added tokens are listed too): a longer text cannot fit.
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        self._rng = random.Random(config.seed)
        self._next_id = 0

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt + output) one sequence can reach here: the model's context or,
        if smaller, the whole KV cache."""
        return min(self.max_model_len, self.scheduler.config.num_blocks * self.scheduler.config.block_size)

    @property
    def max_prompt_chars(self) -> int:
        """The longest text prompt that can fit the context: longer ones are refused untokenized."""
        return self.max_model_len * self.max_token_chars

    # ------------------------------------------------------------------ requests
    def check_prompt_size(self, prompt: str | list, what: str = "the prompt") -> None:
        """Refuse a prompt that cannot fit the context, before the tokenizer spends time and memory on it."""
        if isinstance(prompt, str) and len(prompt) > self.max_prompt_chars:
            raise ValueError(
                f"{what} has {len(prompt)} characters: it cannot fit the model's context of {self.max_model_len} tokens "
                f"(at most {self.max_token_chars} characters a token, so {self.max_prompt_chars} characters): shorten it")
        if isinstance(prompt, list) and len(prompt) > self.max_model_len:
            raise ValueError(f"{what} has {len(prompt)} token ids, more than the model's context of {self.max_model_len} tokens: shorten it")

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; text gets the tokenizer's special tokens (BOS for Llama 2/3, Mistral)."""
        self.check_prompt_size(prompt)
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        vocab = self.runner.config.vocab_size
        bad = next((t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        return token_ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError (bad request) or QueueFull."""
        params = params or SamplingParams()
        vocab = self.runner.config.vocab_size
        bad = next((t for t in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty: send at least one token")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        request_id, self._next_id = self._next_id, self._next_id + 1
        seq = Sequence(token_ids, params, seq_id=request_id)
        seq.generator = None if params.greedy else make_generator(params.seed, self._rng, self.runner.backend.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)  # may raise QueueFull or ValueError (longer than the whole cache)
        self.sequences[request_id] = seq
        self._meta[request_id] = {"arrival": time.perf_counter(), "first_token": None}
        return request_id

    def abort(self, request_id: int) -> bool:
        found = self.scheduler.abort(request_id)
        self.sequences.pop(request_id, None)
        self._meta.pop(request_id, None)
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        result = self._run(batch)
        return self._postprocess(batch, result)

    def _run(self, batch: ScheduledBatch) -> StepResult:
        step = StepInput(
            token_ids=[s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n] for s, n in zip(batch.seqs, batch.num_new_tokens)],
            starts=[s.num_computed_tokens for s in batch.seqs],
            block_tables=[list(s.block_table) for s in batch.seqs],
            sample=list(batch.samples),
        )
        result = StepResult()
        scoring, rows, targets = _prompt_logprob_rows(batch)
        if scoring:
            top_k = max(s.params.top_logprobs for s, _ in scoring)
            logits, scored = self.runner.run_and_score(step, torch.tensor(rows), torch.tensor(targets), top_k)
            result.prompt_logprobs = _split_prompt_logprobs(scoring, scored)
        else:
            logits = self.runner.run(step)
        seqs = batch.sampling_seqs
        if not seqs:
            return result
        out = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], [(s.token_ids, s.num_prompt_tokens) for s in seqs])
        ids = [s.seq_id for s in seqs]
        result.tokens, result.logprobs = dict(zip(ids, out.tokens.tolist())), dict(zip(ids, out.logprobs.tolist()))
        if out.top_ids is not None:
            result.top_logprobs = {s.seq_id: _top_dict(top_ids, top_values, s.params.top_logprobs)
                                   for s, top_ids, top_values in zip(seqs, out.top_ids.tolist(), out.top_logprobs.tolist()) if s.params.top_logprobs}
        return result

    def _postprocess(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        now = time.perf_counter()
        for seq, (logprobs, top_logprobs) in result.prompt_logprobs.items():
            seq.add_prompt_logprobs(logprobs, top_logprobs)
        outputs = []
        for seq in self.scheduler.update(batch, result.tokens, result.logprobs, result.top_logprobs):
            meta = self._meta[seq.seq_id]
            meta["first_token"] = meta["first_token"] or now
            reason = self._finish_reason(seq)
            if reason:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq))
            if reason:
                self.sequences.pop(seq.seq_id, None)
                self._meta.pop(seq.seq_id, None)
        return outputs

    def _finish_reason(self, seq: Sequence) -> str | None:
        p, token = seq.params, seq.last_token
        hit_stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        if not hit_stop_token:  # a stop token's own text is never shown
            seq.detokenizer.add([token])  # decodes a few tokens, not the whole output
        if seq.stops.update(seq.detokenizer.full_text) or hit_stop_token:  # reads only the new text
            return "stop"
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        meta = self._meta[seq.seq_id]
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=seq.stops.text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs else [],
            top_logprobs=list(seq.output_top_logprobs),
            # complete before the first output and never changed after (a preemption does not redo
            # them): shared, not copied every step
            prompt_logprobs=seq.prompt_logprobs,
            prompt_top_logprobs=seq.prompt_top_logprobs,
            stable_len=len(seq.stops.text) if seq.is_finished else seq.stops.stable_len,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=meta["arrival"],
            first_token_time=meta["first_token"],
        )

    # ------------------------------------------------------------------ scoring
    def score(self, requests: list[ScoreRequest]) -> list[Score]:
        """log p(continuation | context) of each request and whether every continuation token was
        the argmax, in request order (lm-eval's log-likelihoods; runtime/scoring.py plans it).

        Runs synchronously: call it between steps, from the thread that steps the engine. Its K/V
        lives in blocks lent by the scheduler's block manager and given back after each batch, so
        sequences running meanwhile keep their blocks and their outputs; prefix-cache blocks are
        only taken from the free list, as a new sequence would take them. A batch is bounded by
        max_num_batched_tokens and by the blocks free now (a single request larger than the token
        budget runs alone). Raises ValueError for a request that cannot be scored here (empty,
        out-of-vocabulary, longer than the context or the whole cache), ScoringBusy when one fits
        the cache but not what running sequences leave free; nothing is computed then.
        """
        bm = self.scheduler.block_manager
        block_size = bm.block_size
        for i, req in enumerate(requests):
            self._check_score_request(i, req)
        need = max((blocks_needed([r], block_size) for r in requests), default=0)
        if need > bm.num_free_blocks:
            raise ScoringBusy(f"a score request needs {need} KV blocks but running sequences leave {bm.num_free_blocks} of "
                              f"{bm.num_blocks} free: score when fewer requests are running, or raise kv_cache_memory")
        budget = self.score_budget
        results: list[Score | None] = [None] * len(requests)
        for batch in plan_batches(requests, block_size, budget):
            blocks = bm.allocate_blocks(sum(blocks_needed([requests[i] for i in g], block_size) for g in batch))
            try:
                passes = lay_out(requests, batch, blocks, block_size)
                if passes.shared is not None:
                    self.runner.fill_cache(passes.shared)
                logprobs, greedy = self.runner.token_logprobs(passes.own, torch.tensor(passes.rows), torch.tensor(passes.targets))
                logprobs, greedy = logprobs.cpu(), greedy.cpu()  # one transfer, not one per request
            finally:
                bm.release_blocks(blocks)
            start = 0
            for i, n in zip((i for g in batch for i in g), passes.counts):
                results[i] = Score(float(logprobs[start : start + n].sum()), bool(greedy[start : start + n].all()))
                start += n
        return results  # type: ignore[return-value]

    def _check_score_request(self, i: int, req: ScoreRequest) -> None:
        if not req.context or not req.continuation:
            raise ValueError(f"score request {i} has an empty {'context' if not req.context else 'continuation'}: the first "
                             "continuation token needs a token before it (lm-eval puts BOS or EOS there) and an empty "
                             "continuation has nothing to score")
        vocab = self.runner.config.vocab_size
        tokens = (*req.context, *req.continuation)
        bad = next((t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"score request {i}: token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(tokens) - 1 > self.max_model_len:
            raise ValueError(f"score request {i} has {len(tokens)} tokens (context + continuation), more than the model's context "
                             f"of {self.max_model_len} tokens (+ 1, the last token is only predicted): truncate its context")
        bm = self.scheduler.block_manager
        if (need := blocks_needed([req], bm.block_size)) > bm.num_blocks:
            raise ValueError(f"score request {i} needs {need} KV blocks of {bm.block_size} tokens but the whole cache holds "
                             f"{bm.num_blocks}: raise kv_cache_memory or shorten the request")

    @property
    def score_budget(self) -> int:
        """Tokens of K/V one score() batch may hold now: max_num_batched_tokens, fewer when fewer blocks are free."""
        bm = self.scheduler.block_manager
        return min(self.config.max_num_batched_tokens, bm.num_free_blocks * bm.block_size)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, float]:
        """Gauges now, then cumulative counters (prefix cache in tokens, as vLLM counts it)."""
        s = self.scheduler
        return {
            "running": s.num_running,
            "waiting": s.num_waiting,
            "kv_blocks_used": s.num_used_blocks,
            "kv_blocks_free": s.num_free_blocks,
            "kv_blocks_total": s.config.num_blocks,
            "preemptions": s.num_preemptions,
            "prefix_cache_queries": s.num_prefix_cache_queries,
            "prefix_cache_hits": s.num_prefix_cache_hits,
            "prompt_tokens_computed": s.num_prompt_tokens_computed,
            "generation_tokens": s.num_generation_tokens,
        }


@dataclass
class StepResult:
    """What a step computed, by sequence id: sampled tokens, their logprobs and alternatives; by
    sequence, the prompt logprobs (and alternatives, or None) of the prompt tokens its rows scored."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, float] = field(default_factory=dict)
    top_logprobs: dict[int, dict[int, float]] = field(default_factory=dict)
    prompt_logprobs: dict[Sequence, tuple[list[float], list[dict[int, float]] | None]] = field(default_factory=dict)


def _prompt_logprob_rows(batch: ScheduledBatch) -> tuple[list[tuple[Sequence, int]], list[int], list[int]]:
    """The step's rows that score owed prompt tokens: the row of position p scores token p + 1.

    Returns (sequence, how many rows) in batch order, the flattened rows and their target tokens.
    Positions already scored before a preemption are recomputed but not scored again.
    """
    scoring, rows, targets, offset = [], [], [], 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if seq.owes_prompt_logprobs:
            start = seq.num_computed_tokens
            first, end = max(start, len(seq.prompt_logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)
            if first < end:
                scoring.append((seq, end - first))
                rows.extend(range(offset + first - start, offset + end - start))
                targets.extend(seq.token_ids[first + 1 : end + 1])
        offset += n
    return scoring, rows, targets


def _split_prompt_logprobs(scoring: list[tuple[Sequence, int]], scored: RowLogprobs) -> dict[Sequence, tuple[list[float], list[dict[int, float]] | None]]:
    logprobs = scored.logprobs.tolist()
    top_ids, top_values = (scored.top_ids.tolist(), scored.top_logprobs.tolist()) if scored.top_ids is not None else (None, None)
    out, at = {}, 0
    for seq, n in scoring:
        k = seq.params.top_logprobs
        tops = [_top_dict(top_ids[i], top_values[i], k) for i in range(at, at + n)] if k else None
        out[seq] = (logprobs[at : at + n], tops)
        at += n
    return out


def _top_dict(ids: list[int], logprobs: list[float], k: int) -> dict[int, float]:
    """The first k alternatives as token id -> logprob, most likely first."""
    return dict(zip(ids[:k], logprobs[:k]))


def _eos_token_ids(model_dir, config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [config.get("eos_token_id")]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class LLM:
    """Offline batch generation: every prompt is queued at once and the engine runs to completion."""

    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        pending = list(zip(prompts, params_list))[::-1]
        order: list[int] = []
        done: dict[int, RequestOutput] = {}
        try:
            while pending or self.engine.has_unfinished():
                while pending:  # queue as many as the engine accepts, then step to make room
                    try:
                        order.append(self.engine.add_request(*pending[-1]))
                    except QueueFull:
                        break
                    pending.pop()
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in order:  # a bad prompt (or Ctrl-C) must not leave the others running
                self.engine.abort(rid)
            raise
        return [done[i] for i in order]

