"""The ASGI app of ``auto-model serve`` (FastAPI on uvicorn).

This part serves a model in-process: ``GET /health``, ``GET /v1/models`` and
``POST /v1/chat/completions``, streaming (server-sent events) or not. Every request goes through
:meth:`auto_model.AutoModel.chat`, the facade's public request path, so it gets the model's
optimized system prompt and the examples retrieved for its last user turn exactly as ``generate``
does. Responses follow OpenAI's schemas (``usage`` included), so the official ``openai`` client
reads them unchanged; errors are OpenAI-style ``{"error": {...}}`` bodies.

- **Alignment headers**: ``x-auto-model-artifact`` (the prompt artifact's model id),
  ``x-auto-model-route`` (``everyday`` or ``safety``, non-streaming responses) and
  ``x-auto-model-examples`` (how many examples were injected).
- **A client's own system message** (``client_system``): ``drop`` (the default: the optimized
  prompt stays, the client's system text is ignored) or ``replace`` (it replaces the optimized
  prompt, as a ``system`` message does in :meth:`AutoModel.chat`).
- **Keys**: with ``api_keys``, every ``/v1`` request needs ``Authorization: Bearer KEY`` (compared in
  constant time); ``/health`` and ``/metrics`` stay open.
- **Metrics**: ``GET /metrics`` in Prometheus's text format (with ``prometheus_client``, one registry
  per app): requests by endpoint and status, their latency (until the response starts), prompt and
  completion tokens, and the requests in progress. No key, query or answer appears there.
- **What the engine cannot do** (``tools``, ``response_format``, ``logprobs``, ``n`` > 1, ...) is
  refused with a 400 that names the field. A streamed answer ends with ``finish_reason`` ``stop``
  and no ``usage`` (the engine's stream does not report them); the non-streaming one has both.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from auto_model.errors import AutoModelError, InvalidRequestError

#: What happens to a client's own system message.
CLIENT_SYSTEM_MODES = ("drop", "replace")
#: Request fields the in-process engine honours, and fields it accepts and ignores.
_SUPPORTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stream",
              "stream_options", "seed", "n"}  # fmt: skip
_IGNORED = {"user"}


class _Refused(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], name: str, default: Any, kind: type = float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _Refused(400, f"'{name}' must be a number, got {value!r}.", param=name)
    return kind(value)


def create_app(
    model: Any,
    *,
    served_name: str | None = None,
    api_keys: Sequence[str] = (),
    client_system: str = "drop",
    num_examples: int = 3,
    max_tokens_cap: int = 4096,
) -> Any:
    """The FastAPI app that serves ``model`` (an :class:`~auto_model.AutoModel`) as ``served_name``
    (default: its model name)."""
    if client_system not in CLIENT_SYSTEM_MODES:
        raise InvalidRequestError(
            f"client_system must be one of {', '.join(CLIENT_SYSTEM_MODES)}, got {client_system!r}."
        )
    if max_tokens_cap < 1:
        raise InvalidRequestError(f"max_tokens_cap must be >= 1, got {max_tokens_cap}.")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise InvalidRequestError(f"num_examples must be an integer >= 0, got {num_examples!r}.")
    name = served_name or model.model_name
    keys = [k.encode() for k in api_keys if k]
    created = int(time.time())
    app = FastAPI(title="auto-model", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    requests = Counter("auto_model_requests", "Requests answered, by endpoint and HTTP status.",
                       ["endpoint", "status"], registry=registry)  # fmt: skip
    latency = Histogram("auto_model_request_seconds", "Seconds until the response starts, by endpoint.",
                        ["endpoint"], registry=registry)  # fmt: skip
    tokens = Counter("auto_model_tokens", "Tokens of answered requests (streams: not counted).", ["kind"],
                     registry=registry)  # fmt: skip
    in_progress = Gauge("auto_model_requests_in_progress", "Requests being answered now.", registry=registry)

    def refused(error: _Refused) -> Any:
        return JSONResponse(error.body(), status_code=error.status)

    def observed(endpoint: str, started: float, response: Any) -> Any:
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def authorised(request: Request) -> None:
        if not keys:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        if not any(hmac.compare_digest(token, key) for key in keys):
            raise _Refused(401, "Missing or wrong API key: pass 'Authorization: Bearer KEY'.",
                           kind="authentication_error", code="invalid_api_key")  # fmt: skip

    def alignment_headers(route: str | None) -> dict[str, str]:
        headers = {"x-auto-model-artifact": str(model.prompt_artifact.model_id or "default"),
                   "x-auto-model-examples": str(num_examples)}  # fmt: skip
        if route:
            headers["x-auto-model-route"] = route
        return headers

    def parse(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
        if not isinstance(body, dict):
            raise _Refused(400, "The request body must be a JSON object.")
        for field in body:
            if field not in _SUPPORTED and field not in _IGNORED:
                raise _Refused(400, f"'{field}' is not supported by this server's in-process engine; leave it out.",
                               param=field)  # fmt: skip
        if body.get("model") != name:
            raise _Refused(404, f"The model {body.get('model')!r} does not exist; this server serves {name!r}.",
                           param="model", code="model_not_found")  # fmt: skip
        if _number(body, "n", 1, int) != 1:
            raise _Refused(400, "'n' must be 1 on this server's in-process engine.", param="n")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "'messages' must be a non-empty list.", param="messages")
        for i, m in enumerate(messages):
            if isinstance(m, dict) and not isinstance(m.get("content"), str):
                raise _Refused(400, f"messages[{i}].content must be a string on this server's in-process engine.",
                               param="messages")  # fmt: skip
        if client_system == "drop":
            messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": limit}, "max_tokens", 512, int)
        if max_tokens < 1:
            raise _Refused(400, "'max_tokens' must be >= 1.", param="max_tokens")
        # The sampling values are checked where every request's are (GenerationOptions, inside chat): a 400.
        options = {
            "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
            "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
            "max_new_tokens": min(max_tokens, max_tokens_cap),
            "stop": body.get("stop"),
            "num_optimized_icl": num_examples,
        }
        if body.get("seed") is not None:
            options["seed"] = body["seed"]
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _Refused(400, "'stream_options' must be an object.", param="stream_options")
        if stream_options.get("include_usage"):
            raise _Refused(400, "'stream_options.include_usage' is not supported yet; the non-streaming response "
                           "carries 'usage'.", param="stream_options")  # fmt: skip
        return messages, options, bool(body.get("stream"))

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    def metrics() -> Any:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        started = time.perf_counter()
        try:
            authorised(request)
        except _Refused as error:
            return observed("models", started, refused(error))
        listed = [{"id": name, "object": "model", "created": created, "owned_by": "auto-model"}]
        return observed("models", started, JSONResponse({"object": "list", "data": listed}))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        with in_progress.track_inprogress():
            return observed("chat.completions", started, await answer(request))

    async def answer(request: Request) -> Any:
        try:
            authorised(request)
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise _Refused(400, "The request body is not valid JSON.") from None
            messages, options, stream = parse(body)
            reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if stream:
                chunks = await run_in_threadpool(lambda: model.chat(messages, stream=True, **options))
                return StreamingResponse(
                    _events(chunks, reply_id, now, name),
                    media_type="text/event-stream",
                    headers=alignment_headers(None),
                )
            result = await run_in_threadpool(lambda: model.chat(messages, return_details=True, **options))
        except _Refused as error:
            return refused(error)
        except InvalidRequestError as exc:
            return refused(_Refused(400, str(exc)))
        except AutoModelError as exc:
            return refused(_Refused(500, str(exc), kind="server_error"))
        reply = {
            "id": reply_id,
            "object": "chat.completion",
            "created": now,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],  # fmt: skip
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },  # fmt: skip
        }
        tokens.labels("prompt").inc(result.prompt_tokens)
        tokens.labels("completion").inc(result.completion_tokens)
        return JSONResponse(reply, headers=alignment_headers(result.route))

    return app


def _events(chunks: Iterator[str], reply_id: str, created: int, name: str) -> Iterator[str]:
    """The server-sent events of a streamed chat completion (chunk objects, then ``[DONE]``)."""

    def event(delta: dict[str, Any], finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        chunk = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [choice],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""}, None)
    try:
        for text in chunks:
            if text:
                yield event({"content": text}, None)
    except AutoModelError as exc:
        error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
        return
    yield event({}, "stop")
    yield "data: [DONE]\n\n"
