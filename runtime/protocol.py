"""The request bodies the server accepts, as pydantic models: each field is honoured, or the request
is refused with 400 naming it.

Unknown fields are refused (extra="forbid"), never ignored. Fields OpenAI defines for what this
server does not do (tools, response_format, ...) are declared NotSupported: accepted only with the
value that asks for nothing, which is what client libraries send when the feature is unused.
Types are strict, as JSON's are: true is not 1 and "10" is not a number. Value ranges have one
owner, SamplingParams (sampling.py), which each request becomes; only the fields that exist in
the API alone (n, the completions' logprobs count) are bounded here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .sampling import MAX_TOP_LOGPROBS, SEED_RANGE, SamplingParams, short_repr

MAX_N = 128  # OpenAI's bound on n; each choice is one engine request (max_waiting bounds them too)
MAX_LISTED_ERRORS = 3
# Request fields that are SamplingParams fields of the same name and meaning.
PASSED_AS_IS = ("temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                "repetition_penalty")


class InvalidRequest(ValueError):
    """A body that does not fit the schema; `param` names the (first) field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def NotSupported(feature: str, *asks_nothing: object) -> Any:  # noqa: N802 - used as a type
    """A field for `feature`, which this server lacks: absent, null or one of `asks_nothing` only."""
    allowed = " or ".join(repr(v) for v in asks_nothing)
    fix = f"leave the field out (or send {allowed})" if allowed else "leave the field out"

    def check(value: Any) -> Any:
        if value is not None and not any(type(value) is type(v) and value == v for v in asks_nothing):
            raise PydanticCustomError("not_supported", "{feature} is not supported by this server: {fix}", {"feature": feature, "fix": fix})
        return value

    return Annotated[Any, AfterValidator(check)]


class Strict(BaseModel):
    """Unknown fields refused, JSON types taken as they are."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool | None = None


class SamplingFields(Strict):
    """What both generation endpoints share: the model, the sampling fields and streaming."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: nothing to do here
    # vLLM's extensions
    top_k: int | None = None  # 0 or -1 = off
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = None

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "'stream_options' applies to streams only: send it with \"stream\": true")
        return self

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, choice: int = 0, logprobs: bool = False, top_logprobs: int = 0,
                        prompt_logprobs: bool = False) -> SamplingParams:
        """The engine's parameters for choice `choice` of a prompt (ValueError names a bad value).

        With a seed, choice i draws from seed + i (wrapped into the 64-bit range: a seed is read
        modulo 2**64), so n choices differ and each is what a request with that seed and n=1 gets.
        """
        given = {name: getattr(self, name) for name in PASSED_AS_IS if getattr(self, name) is not None}  # else SamplingParams' default
        seed = self.seed
        if seed is not None and choice:
            seed = seed + choice if seed + choice <= SEED_RANGE[1] else seed + choice - 2**64
        return SamplingParams(max_tokens=max_tokens, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs,
                              prompt_logprobs=prompt_logprobs, logit_bias=self._token_bias(), **given)

    def _token_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\d{1,10}", key):
                raise ValueError(f"logit_bias keys must be token ids (\"50256\"), got {key[:50]!r}")
            bias[int(key)] = value
        return bias


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool | None = None  # the prompt before the completion (and, with logprobs, its tokens' logprobs)
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None  # k: the chosen token's and k alternatives
    best_of: int | None = None
    suffix: NotSupported("suffix (insertion)", "") = None

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise PydanticCustomError("not_supported", "'best_of' ({best_of}) differs from n ({n}): returning the best of several samples "
                                      "is not supported by this server; leave best_of out", {"best_of": self.best_of, "n": self.choices_per_prompt})
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One or several prompts: a string, a list of token ids, or a list of either."""
        p = self.prompt
        return [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)

    def params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        asked = self.logprobs is not None
        return self.sampling_params(max_tokens, choice, logprobs=asked, top_logprobs=self.logprobs or 0,
                                    prompt_logprobs=asked and bool(self.echo))


def _text_parts_only(kind: str) -> str:
    if kind != "text":
        raise PydanticCustomError("not_supported", "content parts of type '{kind}' are not supported by this server: send "
                                  "parts of type 'text', or the content as a string", {"kind": kind})
    return kind


class TextPart(Strict):
    type: Annotated[str, AfterValidator(_text_parts_only)]
    text: str


class Message(Strict):
    role: str
    content: str | list[TextPart]
    tool_calls: NotSupported("tool calling", []) = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..MAX_TOP_LOGPROBS alternatives per token, with logprobs
    tools: NotSupported("tool calling", []) = None
    tool_choice: NotSupported("tool calling", "none") = None
    parallel_tool_calls: NotSupported("tool calling") = None
    functions: NotSupported("function calling", []) = None
    function_call: NotSupported("function calling", "none") = None
    response_format: NotSupported("structured output (response_format)", {"type": "text"}) = None
    audio: NotSupported("audio output") = None
    modalities: NotSupported("output modalities other than text", ["text"]) = None
    prediction: NotSupported("predicted outputs") = None
    web_search_options: NotSupported("web search") = None
    reasoning_effort: NotSupported("reasoning effort") = None
    store: NotSupported("stored completions", False) = None
    metadata: NotSupported("stored completions' metadata", {}) = None
    service_tier: NotSupported("service tiers", "auto", "default") = None

    def params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        return self.sampling_params(max_tokens, choice, logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0)

    @property
    def plain_messages(self) -> list[dict[str, str]]:
        """What the chat template reads: role and text content."""
        return [{"role": m.role, "content": m.text} for m in self.messages]


class TokenizeRequest(Strict):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template adds them)
    add_generation_prompt: bool | None = None  # messages only; default true

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "send either 'prompt' (a string) or 'messages', not both or neither")
        return self

    @property
    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text} for m in self.messages or []]


class DetokenizeRequest(Strict):
    """POST /detokenize: token ids back to text."""

    model: str | None = None
    tokens: list[int]


def parse(model: type[Strict], body: dict) -> Any:
    """The body validated as `model`, or InvalidRequest naming the fields at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise describe(e) from None


# ---------------------------------------------------------------------------- error messages
def _is_union_member(part: object) -> bool:
    """pydantic names the member of a union it tried in the error's location ('str', 'list[int]')."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def _path(loc: tuple) -> str:
    """('messages', 0, 'content') -> "messages[0].content"; union members left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_member(part):
            out += f".{part}" if out else part
    return out


def _depth(error: dict) -> int:
    return sum(not _is_union_member(part) for part in error["loc"])


def _short(value: object) -> str:
    return short_repr(value, limit=100)


def _message(error: dict) -> str:
    path, kind = _path(error["loc"]), error["type"]
    if kind == "extra_forbidden":
        return f"'{path}' is not a field this server knows: unknown fields are refused rather than ignored"
    if kind == "missing":
        return f"'{path}' is required"
    if not path:  # a check across fields: its message names them
        return error["msg"]
    if kind in ("not_supported", "stream_options"):
        return f"'{path}': {error['msg']}"
    return f"'{path}': {error['msg']}, got {_short(error['input'])}"


def describe(e: ValidationError) -> InvalidRequest:
    """One message for a validation error. A value that is none of a union's types gets one line
    listing them; otherwise the errors of the union member that got deepest into the value."""
    errors = e.errors(include_url=False)
    by_field: dict[object, list[dict]] = {}
    for error in errors:
        by_field.setdefault(error["loc"][:1], []).append(error)
    messages = []
    for field_errors in by_field.values():
        by_member: dict[object, list[dict]] = {}
        for error in field_errors:
            by_member.setdefault(next((part for part in error["loc"] if _is_union_member(part)), None), []).append(error)
        if len(by_member) > 1 and all(_is_union_member(err["loc"][-1]) for err in field_errors):
            first = field_errors[0]
            messages.append(f"'{_path(first['loc'])}' must be one of {', '.join(map(str, by_member))}; got {_short(first['input'])}")
            continue
        best = min(by_member.values(), key=lambda errs: (-max(map(_depth, errs)), len(errs)))
        messages.extend(map(_message, best))
    param = _path(errors[0]["loc"]) or None
    shown = messages[:MAX_LISTED_ERRORS]
    more = f" (and {len(messages) - len(shown)} more)" if len(messages) > len(shown) else ""
    return InvalidRequest("; ".join(shown) + more, param)
