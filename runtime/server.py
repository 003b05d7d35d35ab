"""OpenAI-compatible HTTP API over the engine (Starlette app, served by uvicorn).

/v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models, /health,
/metrics (Prometheus). Bad requests get 400 with a message, a body over the byte limit 413, a
missing or wrong API key 401, a full waiting queue 503 with Retry-After; the server keeps serving
in every case. Every request is bounded before it costs much: its body in bytes (read no further
than the limit), a text prompt in characters and a token prompt in ids (the context's worth,
before tokenizing), its stop strings (sampling.MAX_STOP_STRINGS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .async_engine import AsyncEngine, EngineFailure, RequestStream
from .engine import LLMEngine, RequestOutput
from .sampling import MAX_STOP_STRINGS, SamplingParams
from .scheduler import QueueFull

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


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quantkit_requests", "Finished HTTP generation requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("quantkit_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("quantkit_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("quantkit_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("quantkit_inter_token_latency_seconds", "Between consecutive tokens of a request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("quantkit_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("quantkit_num_requests_running", "Sequences in the running set", registry=r)
        self.waiting = Gauge("quantkit_num_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_used = Gauge("quantkit_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("quantkit_kv_blocks_free", "KV cache blocks free", registry=r)
        self.preemptions = Gauge("quantkit_preemptions", "Preemptions since start", registry=r)
        self._last_token: dict[int, float] = {}

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            self.generated_tokens.inc()
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
        self.refresh_gauges(engine)

    def refresh_gauges(self, engine: LLMEngine) -> None:
        stats = engine.stats()
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_free.set(stats["kv_blocks_free"])
        self.preemptions.set(stats["preemptions"])


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- request parsing
def _field(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got a boolean")
    if not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    return value


def _text(value: str, name: str) -> str:
    """value, if it is Unicode text: JSON's \\u escapes can carry a lone surrogate, which no
    tokenizer (nor UTF-8) can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{name}' holds a lone surrogate ({value[e.start]!r} at character {e.start}), which is not text: "
                         "send UTF-8, or escape characters beyond U+FFFF as a surrogate pair") from None
    return value


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    if _field(body, "n", (int,), 1) != 1:
        raise BadRequest("'n' must be 1: one choice per request is supported")
    stop = _field(body, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    for i, s in enumerate(stop[:MAX_STOP_STRINGS + 1]):  # a longer list is refused below, unread
        if isinstance(s, str):
            _text(s, f"stop[{i}]")
    logprobs = body.get("logprobs")
    want_logprobs = bool(logprobs) if isinstance(logprobs, bool) else _field(body, "logprobs", (int,), 0) > 0
    max_tokens = _field(body, "max_completion_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), default_max_tokens)
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", (int,), 0),
            seed=_field(body, "seed", (int,), None),
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=_field(body, "stop_token_ids", (list,), []),
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
            logprobs=want_logprobs,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None


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
        raise BadRequest("the request body's JSON is nested too deeply (over ~1,000 levels): no field here needs more than 3") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _discard(stream: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            return


# ---------------------------------------------------------------------------- the app
def create_app(engine: LLMEngine, api_key: str | None = None, model_name: str | None = None,
               max_request_bytes: int | None = None) -> Starlette:
    """max_request_bytes: the largest request body accepted (default: default_max_request_bytes)."""
    max_bytes = max_request_bytes or default_max_request_bytes(engine.max_model_len)
    metrics = Metrics()
    runner = AsyncEngine(engine, on_step=lambda outs, _: metrics.on_step(engine, outs))
    served_name = model_name or engine.model_name

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())

    async def health(_: Request) -> Response:
        if not runner.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(_: Request) -> Response:
        metrics.refresh_gauges(engine)  # aborts change them between steps; plain int reads, no lock needed
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        return JSONResponse({"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "quantkit", "max_model_len": engine.max_model_len}]})

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        if not authorized(request):
            metrics.requests.labels(endpoint, "401").inc()
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
        try:
            body = await read_json(request, max_bytes)
            stream = _field(body, "stream", (bool,), False)
            # Tokenizing (and the chat template) off the event loop and outside the engine lock.
            prompt_ids = await asyncio.to_thread(chat_prompt if chat else completion_prompt, engine, body)
            asked = "max_completion_tokens" in body or "max_tokens" in body
            default = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_MAX_TOKENS
            # An unasked-for default never makes a request fail: it shrinks to the room left in the
            # context and in the KV cache.
            params = sampling_params(body, default if asked else max(1, min(default, engine.max_sequence_tokens - len(prompt_ids))))
            stream_out = await runner.add(prompt_ids, params)
        except BadRequest as e:
            metrics.requests.labels(endpoint, "400").inc()
            return error(400, str(e))
        except RequestTooLarge as e:
            metrics.requests.labels(endpoint, "413").inc()
            # A body longer than DRAIN_REFUSED_BODY_BYTES was left unread: end its connection.
            return error(413, str(e), headers={"Connection": "close"})
        except ClientDisconnect:  # left while sending its body
            metrics.requests.labels(endpoint, "499").inc()
            return error(499, "client disconnected", "client_closed_request")
        except QueueFull as e:
            metrics.requests.labels(endpoint, "503").inc()
            return error(503, f"server busy: {e}; retry later", "server_busy", headers={"Retry-After": "1"})
        except ValueError as e:  # the engine's validation: context length, cache size
            metrics.requests.labels(endpoint, "400").inc()
            return error(400, str(e))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if stream:  # sse() counts it once it ends: 200, 499 (the client left) or 500
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            pieces_of = engine.tokenizer.convert_ids_to_tokens if params.logprobs else None
            end = StreamEnd(stream_out, metrics, endpoint)
            return EventStream(sse(rid, stream_out, chat, served_name, metrics, end, include_usage, pieces_of), end)
        last = None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, stream_out))
        try:
            async for out in stream_out:
                last = out
        except EngineFailure as e:
            metrics.requests.labels(endpoint, "500").inc()
            return error(500, str(e), "server_error")
        finally:
            watcher.cancel()
            stream_out.cancel()  # no-op when finished; frees the blocks if this handler was cancelled
        if last is None or not last.finished:  # the client went away
            metrics.requests.labels(endpoint, "499").inc()
            return error(499, "client disconnected", "client_closed_request")
        metrics.requests.labels(endpoint, "200").inc()
        metrics.prompt_tokens.inc(len(last.prompt_token_ids))
        pieces = engine.tokenizer.convert_ids_to_tokens(last.token_ids) if params.logprobs else []
        return JSONResponse(full_response(rid, last, chat, served_name, params, pieces))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics_endpoint),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
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


def completion_prompt(engine: LLMEngine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the client libraries wrap a single prompt in a list
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")
    if isinstance(prompt, str):
        _text(prompt, "prompt")
    try:
        return engine.tokenize(prompt)  # refuses a prompt too long for the context before tokenizing it
    except ValueError as e:
        raise BadRequest(str(e)) from None


def chat_prompt(engine: LLMEngine, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > engine.max_model_len:  # each message takes at least one token of the template
        raise BadRequest(f"{len(messages)} messages cannot fit the model's context of {engine.max_model_len} tokens: send fewer")
    plain = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                raise BadRequest("message content parts must all be {'type': 'text', 'text': str}; images are not supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise BadRequest("each message must be an object with string 'role' and 'content'")
        plain.append({"role": _text(m["role"], f"messages[{i}].role"), "content": _text(content, f"messages[{i}].content")})
    try:  # the template only adds to the messages' text
        engine.check_prompt_size("".join(m["content"] for m in plain), "the messages' content")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not getattr(engine.tokenizer, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions")
    try:
        ids = engine.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
        raise BadRequest(f"the chat template rejected these messages: {e}") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def usage(out: RequestOutput) -> dict:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def full_response(rid: str, out: RequestOutput, chat: bool, model: str, params: SamplingParams, pieces: list[str]) -> dict:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason}
        if params.logprobs:
            choice["logprobs"] = chat_logprobs(pieces, out.logprobs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "usage": usage(out)}
    choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason,
              "logprobs": completion_logprobs(pieces, out.logprobs) if params.logprobs else None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage(out)}


def chat_logprobs(pieces: list[str], logprobs: list[float]) -> dict:
    return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []} for p, lp in zip(pieces, logprobs)]}


def completion_logprobs(pieces: list[str], logprobs: list[float]) -> dict:
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}


class StreamEnd:
    """Aborts a stream's request (a no-op once finished) and counts its status, once, however the
    stream ends: 200, 500, or 499 when the client left first."""

    def __init__(self, outputs: RequestStream, metrics: Metrics, endpoint: str):
        self.outputs, self.metrics, self.endpoint = outputs, metrics, endpoint
        self.status = "499"
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.outputs.cancel()  # frees the blocks of a request whose client went away
            self.metrics.requests.labels(self.endpoint, self.status).inc()


class EventStream(StreamingResponse):
    """Server-sent events whose request ends with the response: Starlette cancels the body's
    generator when the client leaves, or never starts it when the client left before the first
    event; either way StreamEnd runs here, now rather than when the generator is collected."""

    def __init__(self, events: AsyncIterator[str], end: StreamEnd):
        super().__init__(events, media_type="text/event-stream")
        self.end = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.end()


async def sse(rid: str, outputs: RequestStream, chat: bool, model: str, metrics: Metrics, end: StreamEnd,
              include_usage: bool = False, pieces_of: Callable[[list[int]], list[str]] | None = None) -> AsyncIterator[str]:
    """The request as OpenAI's server-sent events; with logprobs asked for (pieces_of given), each
    chunk carries the logprobs of the tokens generated since the previous chunk. Each chunk sends
    the text the engine marks stable (out.stable_len): nothing here rescans the text."""
    created, sent, counted, last, tokens_sent = int(time.time()), 0, False, None, 0

    def chunk(delta_text: str, finish: str | None, role: bool = False, out: RequestOutput | None = None) -> str:
        logprobs = None
        if out is not None and pieces_of is not None:
            new_ids, new_lps = out.token_ids[tokens_sent:], out.logprobs[tokens_sent:]
            logprobs = (chat_logprobs if chat else completion_logprobs)(pieces_of(new_ids), new_lps)
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if pieces_of is not None:
                choice["logprobs"] = logprobs
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
        else:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": logprobs}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk("", None, role=True)
        async for out in outputs:
            last = out
            if not counted:
                metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                counted = True
            upto = out.stable_len  # all of the text once finished
            if upto > sent or out.finished:
                yield chunk(out.text[sent:upto], out.finish_reason if out.finished else None, out=out)
                sent, tokens_sent = max(sent, upto), len(out.token_ids)
        if include_usage and last is not None:  # OpenAI's stream_options: a last chunk with no choices
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model,
                    "choices": [], "usage": usage(last)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        end.status = "200"  # [DONE] was sent: Starlette asked for more
    except EngineFailure as e:
        end.status = "500"
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 500}})}\n\n"
    finally:
        end()
