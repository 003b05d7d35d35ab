"""OpenAI-compatible HTTP API over the engine (Starlette app, served by uvicorn).

/v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models, /tokenize and
/detokenize (vLLM's shapes), /version, /health, /metrics (Prometheus). Request bodies are checked
against runtime/protocol.py: a field is honoured or the request gets 400 naming it. A model name
the server does not serve gets 404, a body over the byte limit 413, a missing or wrong API key 401,
a full waiting queue 503 with Retry-After; the server keeps serving in every case. Every request
is bounded before it costs much: its body in bytes (read no further than the limit), a text
prompt in characters and a token prompt in ids (the context's worth, before tokenizing), its
stop strings (sampling.MAX_STOP_STRINGS), its choices (n x prompts, at most the waiting queue).

Logprob tokens are text with their true bytes (runtime/token_text.py). n > 1 fans out into n
engine requests of the same prompt. Logger "quantkit.serve" gets a startup banner, a line per
finished request and, while there is work, a throughput line every stats_log_interval seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quantkit import __version__
from quantkit.artifact import MANIFEST_NAME, read_manifest
from quantkit.kernels.attention import attention_kernels
from quantkit.kernels.linear import int4_kernels

from .async_engine import AsyncEngine, EngineFailure, RequestStream
from .engine import LLMEngine, RequestOutput
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, InvalidRequest, SamplingFields, TokenizeRequest, parse
from .scheduler import QueueFull
from .token_text import TokenText

log = logging.getLogger("quantkit.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DEFAULT_CHAT_MAX_TOKENS = 256  # chat has no default limit there; a bounded one protects the cache
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
MiB = 1024**2
# The default body limit: room for a max-context prompt as JSON. A token is ~4 characters of
# English, ~1 of CJK; a character takes up to 6 bytes as a \u escape (12 for a surrogate pair);
# token-id prompts need ~7 bytes an id. 32 bytes a token covers all of these; never below 1 MiB.
REQUEST_BYTES_PER_CONTEXT_TOKEN = 32
MIN_DEFAULT_MAX_REQUEST_BYTES = 1 * MiB


def default_max_request_bytes(max_model_len: int) -> int:
    return max(MIN_DEFAULT_MAX_REQUEST_BYTES, REQUEST_BYTES_PER_CONTEXT_TOKEN * max_model_len)


# A refused body is still read to its end, up to this many bytes, each chunk thrown away as it
# arrives: closing on a client that is still sending resets the connection, and the reset drops
# the 413 answer unread. A longer body is cut off (its client may see only the reset).
DRAIN_REFUSED_BODY_BYTES = 64 * MiB


class BadRequest(ValueError):
    pass


class RequestTooLarge(ValueError):
    pass


class ModelNotFound(ValueError):
    """A `model` this server does not serve: 404, as vLLM answers."""


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """What the HTTP side sees (requests by status, latencies); the engine's own counts are read
    from engine.stats() at each scrape (EngineCollector). Every metric carries model_name."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self._requests = Counter("quantkit_requests", "Finished HTTP requests by endpoint and status", [*labels, "endpoint", "status"], registry=r)
        self.ttft = Histogram("quantkit_time_to_first_token_seconds", "Arrival to first token", labels, buckets=LATENCY_BUCKETS,
                              registry=r).labels(model_name)
        self.itl = Histogram("quantkit_inter_token_latency_seconds", "Between consecutive tokens of a request", labels,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("quantkit_e2e_request_latency_seconds", "Arrival to last token", labels, buckets=LATENCY_BUCKETS,
                             registry=r).labels(model_name)
        r.register(EngineCollector(engine, model_name))
        self._last_token: dict[int, float] = {}

    def count(self, endpoint: str, status: int | str) -> None:
        self._requests.labels(self.model_name, endpoint, str(status)).inc()

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            previous = self._last_token.get(out.request_id)
            if previous is None:
                self.ttft.observe(now - out.arrival_time)
            else:
                self.itl.observe(now - previous)
            self._last_token[out.request_id] = now
            if out.finished:
                self.e2e.observe(now - out.arrival_time)
                self._last_token.pop(out.request_id, None)
        for rid in [r for r in self._last_token if r not in engine.sequences]:
            del self._last_token[rid]  # aborted or failed requests never send a finished output


def kv_cache_usage(stats: dict) -> float:
    """The fraction of KV blocks in use, 0..1 (vLLM's kv_cache_usage_perc is this ratio too)."""
    return stats["kv_blocks_used"] / stats["kv_blocks_total"] if stats["kv_blocks_total"] else 0.0


class EngineCollector:
    """The engine's gauges and cumulative counts, read at scrape time (plain int reads between
    steps: no lock needed, and aborts change them between steps too)."""

    GAUGES = (("num_requests_running", "running", "Sequences in the running set"),
              ("num_requests_waiting", "waiting", "Sequences waiting for admission"),
              ("kv_blocks_used", "kv_blocks_used", "KV cache blocks in use"),
              ("kv_blocks_free", "kv_blocks_free", "KV cache blocks free"))
    COUNTERS = (("num_preemptions", "preemptions", "Sequences preempted (their KV recomputed later)"),
                ("prompt_tokens", "prompt_tokens_computed", "Prompt tokens computed (prefix-cache hits excluded, recomputation after "
                 "a preemption included)"),
                ("generation_tokens", "generation_tokens", "Tokens generated"),
                ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"))

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.stats()
        for name, key, doc in self.GAUGES:
            yield self._family(GaugeMetricFamily, name, doc, stats[key])
        yield self._family(GaugeMetricFamily, "kv_cache_usage_perc", "KV cache usage as a fraction of its blocks (1 = full)", kv_cache_usage(stats))
        for name, key, doc in self.COUNTERS:
            yield self._family(CounterMetricFamily, name, doc, stats[key])

    def _family(self, kind, name: str, doc: str, value: float):
        family = kind(f"quantkit_{name}", doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


class ThroughputLog:
    """One line every `interval` seconds while there is work: prompt and generation tokens/s over
    the interval, running and waiting requests, KV usage, the prefix-cache hit rate since start."""

    def __init__(self, engine: LLMEngine, interval: float):
        self.engine, self.interval = engine, interval
        self._stats, self._at = engine.stats(), time.monotonic()

    def line(self) -> str | None:
        stats, now = self.engine.stats(), time.monotonic()
        prompt = stats["prompt_tokens_computed"] - self._stats["prompt_tokens_computed"]
        generated = stats["generation_tokens"] - self._stats["generation_tokens"]
        seconds = max(now - self._at, 1e-9)
        self._stats, self._at = stats, now
        if not (prompt or generated or stats["running"] or stats["waiting"]):
            return None
        queries = stats["prefix_cache_queries"]
        hit_rate = stats["prefix_cache_hits"] / queries if queries else 0.0
        return (f"throughput: prompt {prompt / seconds:.1f} tokens/s, generation {generated / seconds:.1f} tokens/s; "
                f"running {stats['running']}, waiting {stats['waiting']}; KV cache {100 * kv_cache_usage(stats):.1f}% used; "
                f"prefix cache hit rate {100 * hit_rate:.1f}%")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            line = self.line()
            if line:
                log.info(line)


# ---------------------------------------------------------------------------- startup banner
def kernel_paths(engine: LLMEngine) -> dict[str, str]:
    """What computes this model on this machine, as kernels/ decided it (its backend)."""
    runner = engine.runner
    int4 = int4_kernels(runner.model, runner.backend, runner.dtype) if engine.quantized else "none (dense weights)"
    head = "int8 copy for decode, dense for larger calls" if runner.int8_head else "dense"
    return {"int4": int4, "attention": attention_kernels(runner.backend, runner.dtype, runner.config.head_dim), "output head": head}


def weights_identity(engine: LLMEngine) -> str:
    """An artifact's weights as one sha256 over its manifest's shard names and digests (verified on
    load; evaluations recorded later change the manifest, not this), else what the model is."""
    path = Path(engine.config.model)
    if not (path / MANIFEST_NAME).is_file():
        return "dense checkpoint" if not engine.quantized else "AWQ checkpoint (no quantkit manifest)"
    files = read_manifest(path)["files"]
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items()) if name.endswith(".safetensors")).encode())
    return f"quantkit artifact, weights sha256 {digest.hexdigest()[:16]}"


def startup_banner(engine: LLMEngine, served_names: Sequence[str], max_request_bytes: int) -> list[str]:
    runner, blocks, block_size = engine.runner, engine.runner.num_blocks, engine.runner.block_size
    kernels = kernel_paths(engine)
    cfg = engine.config
    return [
        f"quantkit {__version__} serving {engine.model_name} as {', '.join(served_names)}: {weights_identity(engine)}",
        f"dtype {cfg.dtype}, device {runner.backend.device} ({torch.get_num_threads()} threads); kernels: int4 {kernels['int4']}; "
        f"attention {kernels['attention']}; output head {kernels['output head']}",
        f"KV cache: {blocks} blocks x {block_size} tokens = {blocks * block_size} tokens ({blocks * runner.block_bytes / MiB:.0f} MiB); "
        f"max model len {engine.max_model_len}; max_num_seqs {cfg.max_num_seqs}, max_num_batched_tokens {cfg.max_num_batched_tokens}, "
        f"max_waiting {cfg.max_waiting}; prefix caching {'on' if cfg.enable_prefix_caching else 'off'}",
        f"requests: bodies up to {max_request_bytes} bytes, text prompts up to {engine.max_prompt_chars} characters",
    ]


# ---------------------------------------------------------------------------- request reading
def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status, headers=headers)


def refusal(e: Exception) -> JSONResponse:
    """The answer to a request refused before (or while) it was queued."""
    if isinstance(e, InvalidRequest):
        return error(400, str(e), param=e.param)
    if isinstance(e, RequestTooLarge):  # a body longer than DRAIN_REFUSED_BODY_BYTES was left unread: end its connection
        return error(413, str(e), headers={"Connection": "close"})
    if isinstance(e, ModelNotFound):
        return error(404, str(e), "NotFoundError")
    if isinstance(e, ClientDisconnect):  # left while sending its body
        return error(499, "client disconnected", "client_closed_request")
    if isinstance(e, QueueFull):
        return error(503, f"server busy: {e}; retry later", "server_busy", headers={"Retry-After": "1"})
    return error(400, str(e))  # BadRequest, and the engine's validation: context length, cache size, sampling values


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(value: object) -> tuple[str, str, int] | None:
    """(where, the character, its offset) of the first string holding a lone surrogate: JSON's \\u
    escapes can carry one, and no tokenizer (nor UTF-8) can encode it."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:  # a loop, not recursion: the body may be nested ~1,000 deep
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return path or "the body", v[e.start], e.start
        elif isinstance(v, dict):
            stack.extend(reversed([("", k) for k in v] + [(f"{path}.{k}" if path else k, x) for k, x in v.items()]))
        elif isinstance(v, list):
            stack.extend(reversed([(f"{path}[{i}]", x) for i, x in enumerate(v)]))
    return None


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, kept no further than max_bytes (RequestTooLarge): a chunked body
    declares no length, so the bytes are counted as they arrive."""
    too_large = RequestTooLarge(f"the request body is larger than this server's limit of {max_bytes} bytes: send a shorter "
                                "prompt, or start the server with a larger --max-request-bytes")
    stream = request.stream()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        if int(declared) <= DRAIN_REFUSED_BODY_BYTES:
            await _discard(stream, DRAIN_REFUSED_BODY_BYTES)
        raise too_large
    data = bytearray()
    async for chunk in stream:
        data += chunk
        if len(data) > max_bytes:
            await _discard(stream, DRAIN_REFUSED_BODY_BYTES - len(data))
            raise too_large
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body's JSON is nested too deeply (over ~1,000 levels): no field here needs more than 5") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    found = lone_surrogate(body) if _SURROGATE_ESCAPE.search(data) else None
    if found:
        where, char, at = found
        raise InvalidRequest(f"'{where}' holds a lone surrogate ({char!r} at character {at}), which is not text: "
                             "send UTF-8, or escape characters beyond U+FFFF as a surrogate pair", where)
    return body


async def _discard(stream: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            return


# ---------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # what echo sends back: the prompt as given, or its ids decoded


def completion_prompts(engine: LLMEngine, req: CompletionRequest) -> list[Prompt]:
    prompts = []
    for prompt in req.prompts:
        ids = engine.tokenize(prompt)  # refuses a prompt too long for the context before tokenizing it
        echo = (prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)) if req.echo else None
        prompts.append(Prompt(ids, echo))
    return prompts


def chat_prompt_ids(engine: LLMEngine, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
    """The messages through the tokenizer's chat template (the template writes its own special tokens)."""
    if len(messages) > engine.max_model_len:  # each message takes at least one token of the template
        raise BadRequest(f"{len(messages)} messages cannot fit the model's context of {engine.max_model_len} tokens: send fewer")
    engine.check_prompt_size("".join(m["content"] for m in messages), "the messages' content")  # the template only adds to it
    if not getattr(engine.tokenizer, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions")
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
        raise BadRequest(f"the chat template rejected these messages: {e}") from None
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def chat_prompts(engine: LLMEngine, req: ChatCompletionRequest) -> list[Prompt]:
    return [Prompt(engine.tokenize(chat_prompt_ids(engine, req.plain_messages)))]  # tokenize() checks the length


# ---------------------------------------------------------------------------- responses
def completion_logprobs(text_of, token_ids: Sequence[int], logprobs: Sequence[float | None],
                        alternatives: Sequence[dict[int, float] | None] | None, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs for these tokens, and the text offset after them. Each position's
    top_logprobs holds its alternatives and the token itself (as vLLM's do); one without a logprob
    (a prompt's first token) has None."""
    tokens, tops, offsets = [], [], []
    for i, (token, logprob) in enumerate(zip(token_ids, logprobs)):
        text = text_of(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for alternative, value in ((alternatives[i] or {}) if alternatives else {}).items():
            top.setdefault(text_of(alternative), value)
        top.setdefault(text, logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(token_text: TokenText, token_ids: Sequence[int], logprobs: Sequence[float], alternatives: Sequence[dict[int, float]]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(a, v) for a, v in (alternatives[i].items() if alternatives else ())]}
                        for i, (token, logprob) in enumerate(zip(token_ids, logprobs))]}


def _joined(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


@dataclass
class ChoiceProgress:
    """What a choice has sent so far: characters of its text, tokens of its logprobs, the text offset."""

    chars: int = 0
    tokens: int = 0
    offset: int = 0
    started: bool = False


class Choices:
    """One request's engine outputs as OpenAI choices: choice i is sample i % n of prompt i // n."""

    def __init__(self, req: SamplingFields, prompts: list[Prompt], request_ids: list[int], token_text: TokenText, chat: bool):
        self.req, self.prompts, self.token_text, self.chat = req, prompts, token_text, chat
        self.n = req.choices_per_prompt
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.last: dict[int, RequestOutput] = {}
        self.progress = [ChoiceProgress() for _ in request_ids]
        self.wants_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.echo = not chat and bool(req.echo)

    def record(self, out: RequestOutput) -> int:
        self.last[out.request_id] = out
        return self.index[out.request_id]

    @property
    def complete(self) -> bool:
        return len(self.last) == len(self.index) and all(out.finished for out in self.last.values())

    def usage(self) -> dict:
        prompt = sum(len(p.token_ids) for p in self.prompts)  # each prompt once, however many choices it has
        completion = sum(len(out.token_ids) for out in self.last.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def delta(self, out: RequestOutput, upto: int) -> tuple[str, dict | None]:
        """The text and logprobs of `out` not yet sent, up to character `upto` of its text (and,
        for the first delta of an echoing choice, the prompt before it)."""
        i = self.index[out.request_id]
        progress, prompt = self.progress[i], self.prompts[i // self.n]
        text, logprobs = out.text[progress.chars : upto], None
        new = slice(progress.tokens, len(out.token_ids))
        if self.chat:
            if self.wants_logprobs:
                logprobs = chat_logprobs(self.token_text, out.token_ids[new], out.logprobs[new], out.top_logprobs[new])
        else:
            head = None
            if self.echo and not progress.started:
                text = prompt.text + text
                if self.wants_logprobs:
                    head, progress.offset = completion_logprobs(self.token_text.text, prompt.token_ids, out.prompt_logprobs,
                                                                out.prompt_top_logprobs, progress.offset)
            if self.wants_logprobs:
                logprobs, progress.offset = completion_logprobs(self.token_text.text, out.token_ids[new], out.logprobs[new],
                                                                out.top_logprobs[new], progress.offset)
                logprobs = _joined(head, logprobs) if head else logprobs
        progress.started, progress.chars, progress.tokens = True, max(progress.chars, upto), len(out.token_ids)
        return text, logprobs

    def full(self, rid: str, model: str) -> dict:
        choices = []
        for out in sorted(self.last.values(), key=lambda o: self.index[o.request_id]):
            text, logprobs = self.delta(out, len(out.text))
            choice = {"index": self.index[out.request_id], "finish_reason": out.finish_reason}
            if self.chat:
                choice.update(message={"role": "assistant", "content": text}, logprobs=logprobs)
            else:
                choice.update(text=text, logprobs=logprobs)
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, "usage": self.usage()}


class RequestEnd:
    """Ends an admitted request once, however it ends: aborts what still runs (a no-op once
    finished), counts its status (200, 500, or 499 when the client left first) and logs its line."""

    def __init__(self, rid: str, outputs: RequestStream, choices: Choices, metrics: Metrics, endpoint: str):
        self.rid, self.outputs, self.choices, self.metrics, self.endpoint = rid, outputs, choices, metrics, endpoint
        self.status = "499"
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        self.outputs.cancel()  # frees the blocks of a request whose client went away
        self.metrics.count(self.endpoint, self.status)
        outs = list(self.choices.last.values())
        firsts = [o.first_token_time for o in outs if o.first_token_time is not None]
        arrival = min((o.arrival_time for o in outs), default=None)
        ttft = f"{1000 * (min(firsts) - arrival):.1f} ms" if firsts else "-"
        total = f"{1000 * (time.perf_counter() - arrival):.1f} ms" if arrival is not None else "-"
        usage = self.choices.usage()
        log.info(f"request {self.rid} {self.status}: {len(self.choices.index)} choice(s), prompt {usage['prompt_tokens']} tokens, "
                 f"output {usage['completion_tokens']} tokens, TTFT {ttft}, total {total}")


class EventStream(StreamingResponse):
    """Server-sent events whose request ends with the response: Starlette cancels the body's
    generator when the client leaves, or never starts it when the client left before the first
    event; either way RequestEnd runs here, now rather than when the generator is collected."""

    def __init__(self, events: AsyncIterator[str], end: RequestEnd):
        super().__init__(events, media_type="text/event-stream")
        self.end = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.end()


async def sse(rid: str, outputs: RequestStream, choices: Choices, model: str, end: RequestEnd) -> AsyncIterator[str]:
    """The request as OpenAI's server-sent events, the choices' chunks interleaved as their tokens
    come, each with its index. Each chunk sends the text the engine marks stable (out.stable_len):
    nothing here rescans the text; with logprobs, it carries those of the tokens since the last."""
    created, chat = int(time.time()), choices.chat
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice_list: list[dict], **extra) -> str:
        return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model, 'choices': choice_list, **extra})}\n\n"

    try:
        if chat:
            for i in range(len(choices.index)):
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        async for out in outputs:
            i = choices.record(out)
            upto = out.stable_len  # all of the text once finished
            if upto > choices.progress[i].chars or out.finished:
                text, logprobs = choices.delta(out, upto)
                finish = out.finish_reason if out.finished else None
                if chat:
                    choice = {"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
                yield event([choice])
        if not choices.complete:
            return  # cancelled: the client left
        if choices.req.include_usage:  # OpenAI's stream_options: a last chunk with no choices
            yield event([], usage=choices.usage())
        yield "data: [DONE]\n\n"
        end.status = "200"  # [DONE] was sent: Starlette asked for more
    except EngineFailure as e:
        end.status = "500"
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 500}})}\n\n"
    finally:
        end()


# ---------------------------------------------------------------------------- the app
def create_app(engine: LLMEngine, api_key: str | None = None, model_name: str | Sequence[str] | None = None,
               max_request_bytes: int | None = None, stats_log_interval: float | None = None) -> Starlette:
    """model_name: the name, or names, requests may give as `model` (default: the engine's model);
    the first is the one responses and metrics report (as vLLM's served_model_name). max_request_bytes: the largest request body
    accepted (default: default_max_request_bytes). stats_log_interval: seconds between throughput
    lines on the log while there is work (None or 0: none)."""
    max_bytes = max_request_bytes or default_max_request_bytes(engine.max_model_len)
    names = [model_name] if isinstance(model_name, str) else list(model_name or [engine.model_name])
    served_name = names[0]
    metrics = Metrics(engine, served_name)
    runner = AsyncEngine(engine, on_step=lambda outs, _: metrics.on_step(engine, outs))
    token_text = TokenText(engine.tokenizer)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())

    def unauthorized() -> JSONResponse:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            raise ModelNotFound(f"The model `{name}` does not exist.")

    async def health(_: Request) -> Response:
        if not runner.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def version(_: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "quantkit", "root": engine.model_name,
             "max_model_len": engine.max_model_len} for name in names]})

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        if not authorized(request):
            metrics.count(endpoint, 401)
            return unauthorized()
        try:
            req = parse(ChatCompletionRequest if chat else CompletionRequest, await read_json(request, max_bytes))
            check_model(req.model)
            # Tokenizing (and the chat template) off the event loop and outside the engine lock.
            prompts = await asyncio.to_thread(chat_prompts if chat else completion_prompts, engine, req)
            n = req.choices_per_prompt
            if len(prompts) * n > engine.scheduler.config.max_waiting:
                raise BadRequest(f"{len(prompts)} prompt(s) x n={n} choices is more than this server queues at once "
                                 f"(max_waiting={engine.scheduler.config.max_waiting}): send fewer")
            asked = req.asked_max_tokens
            default = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_MAX_TOKENS
            requests = []
            for prompt in prompts:
                # An unasked-for default never makes a request fail: it shrinks to the room left in
                # the context and in the KV cache.
                max_tokens = asked if asked is not None else max(1, min(default, engine.max_sequence_tokens - len(prompt.token_ids)))
                requests.extend((prompt.token_ids, req.params(max_tokens, choice)) for choice in range(n))
            stream_out = await runner.add(requests)
        except (ValueError, ClientDisconnect, QueueFull) as e:
            response = refusal(e)
            metrics.count(endpoint, response.status_code)
            return response
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices = Choices(req, prompts, stream_out.request_ids, token_text, chat)
        end = RequestEnd(rid, stream_out, choices, metrics, endpoint)
        if req.stream:  # sse() sets the status once it ends: 200, 499 (the client left) or 500
            return EventStream(sse(rid, stream_out, choices, served_name, end), end)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, stream_out))
        try:
            async for out in stream_out:
                choices.record(out)
            if choices.complete:
                end.status = "200"
        except EngineFailure as e:
            end.status = "500"
            return error(500, str(e), "server_error")
        finally:
            watcher.cancel()
            end()  # frees the blocks if this handler was cancelled
        if end.status != "200":  # the client went away
            return error(499, "client disconnected", "client_closed_request")
        return JSONResponse(choices.full(rid, served_name))

    async def tokenize(request: Request) -> Response:
        def run(req: TokenizeRequest) -> list[int]:
            if req.prompt is not None:
                engine.check_prompt_size(req.prompt)
                return engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
            return chat_prompt_ids(engine, req.plain_messages, req.add_generation_prompt is not False, bool(req.add_special_tokens))

        async def answer(body: dict) -> dict:
            req = parse(TokenizeRequest, body)
            check_model(req.model)
            ids = await asyncio.to_thread(run, req)
            return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

        return await _tool(request, "tokenize", answer)

    async def detokenize(request: Request) -> Response:
        async def answer(body: dict) -> dict:
            req = parse(DetokenizeRequest, body)
            check_model(req.model)
            ids = engine.tokenize(req.tokens)  # checks the ids: in the vocabulary, at most a context's worth
            return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, ids)}

        return await _tool(request, "detokenize", answer)

    async def _tool(request: Request, endpoint: str, answer) -> Response:
        if not authorized(request):
            metrics.count(endpoint, 401)
            return unauthorized()
        try:
            result = await answer(await read_json(request, max_bytes))
        except (ValueError, ClientDisconnect) as e:
            response = refusal(e)
            metrics.count(endpoint, response.status_code)
            return response
        metrics.count(endpoint, 200)
        return JSONResponse(result)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        for line in startup_banner(engine, names, max_bytes):
            log.info(line)
        runner.start()
        ticker = asyncio.create_task(ThroughputLog(engine, stats_log_interval).run()) if stats_log_interval else None
        try:
            yield
        finally:
            if ticker:
                ticker.cancel()
            runner.stop()

    started = int(time.time())
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics_endpoint),
            Route("/version", version),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine, app.state.async_engine, app.state.metrics = engine, runner, metrics
    return app


async def _cancel_on_disconnect(request: Request, stream: RequestStream) -> None:
    """Starlette does not cancel a plain handler when its client leaves: watch for it and abort."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return
