"""What ``auto-model serve`` accepts: its limits, and the typed check every request body passes first.

A body is read as strict JSON (``NaN`` and ``Infinity`` are not numbers JSON allows), refused past
:attr:`ServerLimits.max_depth` levels of nesting, then validated against a pydantic model of the
endpoint's request (:class:`ChatRequest`, :class:`CompletionRequest`) with the server's limits:
count and length of ``stop``, messages, content parts and prompts; ``n`` and ``best_of``; token
limits; finite numbers; a ``seed`` the engines take. Every violation is a :class:`BodyError`
naming the field (the server's OpenAI-style 400), raised before the request is queued, so a bad
request fails alone. Fields the models do not name are left to the endpoint (the in-process
engine refuses them; an upstream gets them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from auto_model.backends.base import DECODING_SETTINGS, SEED_RANGE
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError

#: most answers one request may ask for (``n``, ``best_of``)
MAX_N = 16


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts.

    Attributes:
        max_body_bytes: largest request body (413 beyond).
        max_tokens: cap on a request's ``max_tokens``; a request without one gets the cap from an upstream,
            at most 512 tokens in-process.
        max_queue: requests that may wait for the engine or the upstream (429 beyond).
        max_concurrency: requests in flight to the upstream at once (upstream mode).
        request_timeout: seconds a request may take before it gets a 504.
        batch_window: seconds the in-process engine waits for more requests to batch with the first.
        max_batch: most requests in one in-process engine call.
        max_stop: most ``stop`` strings in a request.
        max_stop_chars: longest ``stop`` string (characters).
        max_messages: most messages in a conversation.
        max_parts: most content parts in one message.
        max_prompts: most prompts in one ``/v1/completions`` request.
        max_depth: deepest nesting of a request body's JSON (objects and lists).
        body_timeout: seconds a request body may take to arrive (408 beyond).
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 4096
    max_queue: int = 256
    max_concurrency: int = 64
    request_timeout: float = 600.0
    batch_window: float = 0.01
    max_batch: int = 16
    max_stop: int = 8
    max_stop_chars: int = 200
    max_messages: int = 256
    max_parts: int = 64
    max_prompts: int = 64
    max_depth: int = 32
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_concurrency", "max_batch", "max_stop", "max_stop_chars",
                     "max_messages", "max_parts", "max_prompts", "max_depth"):  # fmt: skip
            value = getattr(self, name)
            if not is_whole(value, 1):
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}.")
        if not is_whole(self.max_queue, 0):
            raise InvalidRequestError(f"max_queue must be an integer >= 0, got {self.max_queue!r}.")
        for name in ("request_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidRequestError(f"{name} must be a number of seconds > 0, got {value!r}.")
        if not isinstance(self.batch_window, (int, float)) or not 0 <= self.batch_window <= 10:
            raise InvalidRequestError(f"batch_window must be 0 to 10 seconds, got {self.batch_window!r}.")


class BodyError(ValueError):
    """A request body the server refuses (a 400); ``param``: the field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- the request models --------------------------------------------------------------------------

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)] | StrictInt  # a finite JSON number
Count = Annotated[StrictInt, Field(ge=1, le=MAX_N)]
Tokens = Annotated[StrictInt, Field(ge=1)]
Seed = Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


def _limits(info: ValidationInfo) -> ServerLimits:
    return (info.context or {}).get("limits") or ServerLimits()


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    temperature: Annotated[Finite, Field(ge=0)] | None = None
    top_p: Annotated[Finite, Field(ge=0, le=1)] | None = None
    frequency_penalty: Finite | None = None
    presence_penalty: Finite | None = None
    repetition_penalty: Finite | None = None
    max_tokens: Tokens | None = None
    n: Count | None = None
    best_of: Count | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    user: StrictStr | None = None
    auto_model: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > limits.max_stop:
            raise ValueError(f"may hold at most {limits.max_stop} strings, got {len(stops)}")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_chars:
            raise ValueError(f"strings may have at most {limits.max_stop_chars} characters, got {longest}")
        return value


class ContentPart(BaseModel):
    """One part of a message's content (``{"type": "text", "text": ...}``, or another kind an upstream takes)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _parts_within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if isinstance(value, list) and len(value) > limits.max_parts:
            raise ValueError(f"may hold at most {limits.max_parts} parts, got {len(value)}")
        return value


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Tokens | None = None

    @field_validator("messages")
    @classmethod
    def _messages_within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if len(value) > limits.max_messages:
            raise ValueError(f"may hold at most {limits.max_messages} messages, got {len(value)}")
        return value


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

    @field_validator("prompt")
    @classmethod
    def _prompts_within_limits(cls, value: Any, info: ValidationInfo) -> Any:
        limits = _limits(info)
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > limits.max_prompts:
            raise ValueError(f"may hold at most {limits.max_prompts} prompts, got {len(value)}")
        return value


#: the request model of each endpoint
REQUESTS: dict[str, type[_Request]] = {"chat.completions": ChatRequest, "completions": CompletionRequest}

# -- what an upstream is sent ---------------------------------------------------------------------

_SAMPLING = {"model", "temperature", "top_p", "max_tokens", "stop", "stream", "stream_options", "seed", "n", "user",
             "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "auto_model",
             # vLLM's sampling and output-format extras
             "top_k", "min_p", "min_tokens", "stop_token_ids", "ignore_eos", "length_penalty",
             "include_stop_str_in_output", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
             "guided_grammar", *DECODING_SETTINGS}  # fmt: skip
#: the fields each endpoint forwards to an upstream (``auto-model serve --forward-field`` adds more)
FORWARDED: dict[str, frozenset[str]] = {
    "chat.completions": frozenset(_SAMPLING | {
        "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "logprobs", "top_logprobs", "functions", "function_call"}),
    "completions": frozenset(_SAMPLING | {"prompt", "logprobs", "best_of", "suffix"}),
}  # fmt: skip
#: fields never forwarded, whatever the operator adds: they would return the injected prompt
#: (``echo``, ``prompt_logprobs``, ``return_token_ids``, ...), render the conversation without the
#: server's system turn (``chat_template``, ...), or bill the operator's account for more than an answer
NEVER_FORWARDED = frozenset({
    "echo", "prompt_logprobs", "return_token_ids", "return_tokens_as_token_ids", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "add_special_tokens",
    "prompt_embeds", "documents", "mm_processor_kwargs", "service_tier", "store", "metadata",
})  # fmt: skip


def check_forward_fields(fields: Any) -> frozenset[str]:
    """The extra fields an operator lets through to an upstream, checked: names, none of
    :data:`NEVER_FORWARDED`."""
    if isinstance(fields, str) or not all(isinstance(f, str) and f.isidentifier() for f in fields):
        raise InvalidRequestError(f"forward_fields must be a list of field names, got {fields!r}.")
    barred = sorted(set(fields) & NEVER_FORWARDED)
    if barred:
        raise InvalidRequestError(f"{', '.join(barred)} cannot be forwarded: it would reveal or bypass the alignment.")
    return frozenset(fields)


def check_forwardable(body: dict[str, Any], endpoint: str, extra: frozenset[str] = frozenset()) -> None:
    """Refuse (a :class:`BodyError`) a body for an upstream with a field that is not forwarded, or a
    media part given by URL (the upstream would fetch an address the client chose)."""
    for name in body:
        if name not in FORWARDED[endpoint] and name not in extra:
            why = ("it would reveal or bypass the alignment" if name in NEVER_FORWARDED else
                   "the server's operator can allow it with --forward-field")  # fmt: skip
            raise BodyError(f"'{name}' is not forwarded to the upstream: {why}.", param=name)
    for i, message in enumerate(body.get("messages") or []):  # checked by ChatRequest: dicts, parts dicts
        parts = message.get("content") if isinstance(message.get("content"), list) else []
        urls = [v.get("url") for part in parts for v in part.values() if isinstance(v, dict)]
        if any(isinstance(url, str) and not url.startswith("data:") for url in urls):
            raise BodyError(f"'messages.{i}.content': media is forwarded inline only (a data: URL), not fetched "
                            "from an address.", param="messages")  # fmt: skip


# -- reading a body ------------------------------------------------------------------------------


def _not_a_number(constant: str) -> Any:
    raise BodyError(f"The request body is not valid JSON: {constant} is not a number JSON allows.")


def _depth(value: Any, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise BodyError(f"The request body nests more than {limit} levels deep.")
        stack.extend((child, depth + 1) for child in children)


def parse_body(raw: bytes | bytearray, endpoint: str, limits: ServerLimits) -> dict[str, Any]:
    """The request body of ``endpoint`` (a key of :data:`REQUESTS`) as a dict, checked against its
    model and ``limits``; a :class:`BodyError` naming the field otherwise."""
    try:
        body = json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise BodyError(f"The request body nests more than {limits.max_depth} levels deep.") from None
    except ValueError as exc:
        if isinstance(exc, BodyError):
            raise
        raise BodyError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object.")
    _depth(body, limits.max_depth)
    try:
        REQUESTS[endpoint].model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        raise _body_error(exc) from None
    return body


#: what a field whose value fits none of its types must be
_SHAPES = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, or token ids",
    "content": "a string or a list of content parts",
}


def _body_error(exc: ValidationError) -> BodyError:
    """The first violation, named by its field's path (``messages.0.content``)."""
    first = exc.errors(include_url=False)[0]
    path = [str(part) for part in first["loc"]]
    fields = [part for part in path if part.isdigit() or (part.isidentifier() and part not in _TYPE_TAGS)]
    if len(fields) < len(path):  # a value that fits none of a union's types
        phrase = f"must be {_SHAPES.get(fields[-1], 'a finite number') if fields else 'valid'}"
    else:
        phrase = str(first["msg"]).removeprefix("Value error, ")
        for pydantic_says, we_say in _PHRASES:
            phrase = phrase.replace(pydantic_says, we_say)
    where = ".".join(fields)
    return BodyError(f"'{where}' {phrase}.", param=fields[0] if fields else None)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_PHRASES = (
    ("Input should be a valid dictionary", "must be an object"),
    ("Input should be a valid list", "must be a list"),
    ("Input should be a valid string", "must be a string"),
    ("Input should be a valid integer", "must be an integer"),
    ("Input should be a valid boolean", "must be true or false"),
    ("Input should be", "must be"),
    ("Field required", "is required"),
    ("List should have at least 1 item after validation, not 0", "must not be empty"),
)
