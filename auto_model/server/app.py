"""The ASGI app of ``auto-model serve`` (FastAPI on uvicorn).

Two modes, one app:

- **in-process** (``create_app(model)``): the model's own engine answers. Concurrent requests are
  served in batches (:mod:`auto_model.server.batching`): those that arrive within ``batch_window``
  seconds of each other, or while the engine is busy, go to the engine in one call of at most
  ``max_batch`` requests. What the engine cannot do (``tools``, ``response_format``,
  ``logprobs``, ...) is refused with a 400 that names the field.
- **upstream** (``create_app(model, upstream=Upstream(url, key))``): requests are forwarded to an
  OpenAI-compatible server (:mod:`auto_model.server.upstream`). The fields of an allow-list
  (:data:`~auto_model.server.protocol.FORWARDED`: ``tools``, ``response_format``, ``logprobs``,
  ``seed``, ``n``, multi-part content with inline media, ...; ``forward_fields`` adds more) pass
  through unchanged, both ways; any other field is refused with a 400, and those that would reveal
  or bypass the alignment (``echo``, ``chat_template``, ...) cannot be added. The model's name is
  mapped (served name to upstream name and back).

Either way the alignment is assembled by the facade's public request path — its aligner's
``chat_requests`` / ``requests`` in-process, ``chat_prompts`` / ``prompts`` (base format) for an
upstream, batched over the
requests that arrive together — so a request gets the model's optimized system prompt and the
examples retrieved for its last user turn exactly as ``generate`` and ``chat`` give them.
``POST /v1/completions`` aligns each prompt as a query (in the ``base`` text format for an
upstream, whose stop strings are added to the request's).

- **Alignment headers**: ``x-auto-model-artifact`` (the prompt artifact's model id),
  ``x-auto-model-examples`` (examples injected per request) and ``x-auto-model-route``
  (``everyday`` or ``safety``; comma-separated for several prompts).
- **A client's own system message** (``client_system``): ``prepend`` (the default: the optimized
  prompt first, the client's text after it), ``replace`` (it replaces the optimized prompt) or
  ``drop`` (ignored).
- **Switching alignment per request** (``allow_alignment_override``, off by default): a request may
  carry ``"auto_model": {"optimized_prompt": bool, "optimized_icl": bool, "num_optimized_icl": int}``
  (``extra_body`` in the ``openai`` client). Refused with a 400 unless the operator allowed it.
- **Keys**: with ``api_keys``, every ``/v1`` request needs ``Authorization: Bearer KEY`` (compared
  in constant time), and ``/metrics`` too (or ``metrics_key``); ``/health`` and the playground page
  stay open. Without keys the
  server answers to loopback names only; other web pages are refused either way
  (:mod:`auto_model.server.security`).
- **Limits** (:class:`ServerLimits`): every body is read as strict JSON and checked against a typed
  model of its endpoint with limits on ``stop``, messages, content parts, prompts, ``n``, numbers
  and nesting (:mod:`auto_model.server.protocol`): a 400 naming the field, before it is queued.
  Request bodies over ``max_body_bytes`` get a 413;
  ``max_tokens`` is capped; requests beyond the engine's batch (or the upstream's
  ``max_concurrency``) wait in a queue of ``max_queue``, and a request that finds it full gets a
  429 with ``Retry-After``; one that takes longer than ``request_timeout`` gets a 504 (a stream ends
  with an error event), and a body slower than ``body_timeout`` a 408. A client that
  disconnects cancels its upstream request, or its place in the engine's queue (a streamed local
  answer stops generating).
- **Metrics**: ``GET /metrics`` in Prometheus's text format (``prometheus_client``, one registry per
  app): requests by endpoint and status, latency until the response starts, tokens, requests in
  progress, queue depth, engine batch sizes. No key, query or answer appears there.
- **Health**: ``GET /health`` is 200 once the engine is loaded (in-process) or while the upstream
  answers ``GET /models`` (asked at most every :data:`HEALTH_TTL` seconds); 503 otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.background import BackgroundTask

from auto_model.answer_check import CONTENT_FILTER
from auto_model.answer_check import check_window as check_window_size
from auto_model.backends.base import DECODING_SETTINGS, Completion, check_decoding
from auto_model.constants import is_whole
from auto_model.conversations import SYSTEM_MESSAGE_MODES
from auto_model.errors import AutoModelError, InvalidRequestError
from auto_model.options import GenerationOptions, parse_queries
from auto_model.prompting import BASE_STOP
from auto_model.rewards.base import best_index
from auto_model.server.batching import MicroBatcher
from auto_model.server.events import (
    chat_deltas,
    chat_event,
    completion_event,
    cut_choices,
    loop_mark,
    pump_events,
    text_pieces,
)
from auto_model.server.protocol import (
    MAX_N,
    BodyError,
    ServerLimits,
    check_forward_fields,
    check_forwardable,
    parse_body,
)
from auto_model.server.security import BrowserGuard, KeyPolicy, RateLimiter
from auto_model.server.upstream import (
    StreamAnswerCheck,
    StreamLoopCut,
    Upstream,
    UpstreamClient,
    UpstreamError,
    asked_of,
    choice_index,
    relay_lines,
)

#: Seconds an upstream's answer to ``/health`` is reused for.
HEALTH_TTL = 2.0
#: What happens to a client's own system message (``client_system``).
CLIENT_SYSTEM_MODES = SYSTEM_MESSAGE_MODES
#: Request fields the in-process engine honours (and ``user``, accepted and ignored).
#: the decoding settings a client may send (they win over the artifact's)
_PENALTIES = ("frequency_penalty", "presence_penalty", "repetition_penalty")
_CHAT_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stream",
                "stream_options", "seed", "n", "user", "auto_model", *_PENALTIES}  # fmt: skip
_COMPLETION_FIELDS = {"model", "prompt", "temperature", "top_p", "max_tokens", "stop", "stream", "stream_options",
                      "seed", "n", "user", "auto_model", *_PENALTIES}  # fmt: skip
_OVERRIDES = ("optimized_prompt", "optimized_icl", "num_optimized_icl", "optimized_decoding", "cut_loops")


class _Refused(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(
    model: Any,
    *,
    served_name: str | None = None,
    api_keys: Any = (),
    client_system: str = "prepend",
    num_examples: int | None = None,
    upstream: Upstream | None = None,
    allow_alignment_override: bool = False,
    limits: ServerLimits | None = None,
    best_of: int = 1,
    unchecked_keys: Any = (),
    check_window: int | None = None,
    hosts: Any = (),
    forward_fields: Any = (),
    metrics_key: str | None = None,
    key_policies: Any = (),
) -> Any:
    """The FastAPI app that serves ``model`` (an :class:`~auto_model.AutoModel`) as ``served_name``
    (default: its model name), in-process, or in front of ``upstream`` (then ``model`` holds the
    alignment only: a :class:`~auto_model.server.proxy.ProxiedModel`, which loads no engine; an
    ``AutoModel`` does too). Either way the server reads ``model.aligner``, ``model.best_of`` and
    ``model.model_name``, and in-process ``run_requests`` and ``stream_request``. ``best_of`` > 1:
    each sampled, non-streaming answer is the best of that many samples by the model's reward (its
    ``best_of``). ``unchecked_keys``: the keys whose requests may turn the answer check off;
    ``check_window``: characters of a streamed answer between checks (default: the artifact's);
    ``hosts``: the names a server without keys answers to besides the loopback ones
    (:mod:`auto_model.server.security`); ``forward_fields``: request fields an upstream gets besides
    :data:`~auto_model.server.protocol.FORWARDED`; ``metrics_key``: the key ``/metrics`` needs (with
    ``api_keys``, any of them works too; without either it is open); ``key_policies``: keys with
    what each may do (:class:`~auto_model.server.security.KeyPolicy`),
    besides ``api_keys``."""
    if client_system not in CLIENT_SYSTEM_MODES:
        raise InvalidRequestError(
            f"client_system must be one of {', '.join(CLIENT_SYSTEM_MODES)}, got {client_system!r}."
        )
    if num_examples is not None and not is_whole(num_examples, 0):
        raise InvalidRequestError(
            f"num_examples must be an integer >= 0 or None (the artifact's), got {num_examples!r}."
        )
    if isinstance(api_keys, str):
        raise InvalidRequestError("api_keys must be a list of keys, not one string.")
    if not is_whole(best_of, 1, MAX_N):
        raise InvalidRequestError(f"best_of must be an integer from 1 to {MAX_N}, got {best_of!r}.")
    if best_of > 1 and model.best_of.reward is None:
        raise InvalidRequestError(f"best_of={best_of} needs a reward model: serve with --reward-model PATH.")
    if upstream is not None and not isinstance(upstream, Upstream):
        raise InvalidRequestError(f"upstream must be an Upstream, got {type(upstream).__name__}.")
    if upstream is None and not callable(getattr(model, "run_requests", None)):
        raise InvalidRequestError(
            f"{type(model).__name__} has no engine: serve an AutoModel in-process, or pass the upstream that generates."
        )
    limits = limits or ServerLimits()
    forwarded = check_forward_fields(forward_fields)
    name = served_name or model.model_name
    upstream_model = (upstream.model if upstream else None) or model.model_name
    if isinstance(unchecked_keys, str):
        raise InvalidRequestError("unchecked_keys must be a list of keys, not one string.")
    if set(unchecked_keys) - {*api_keys, *(p.key for p in key_policies)}:
        raise InvalidRequestError("unchecked_keys must be keys of api_keys or key_policies.")
    listed = [KeyPolicy(k, f"api key {i + 1}", unchecked=k in unchecked_keys) for i, k in enumerate(api_keys) if k]
    listed += [replace(p, unchecked=p.unchecked or p.key in unchecked_keys) for p in key_policies]
    policies = {p.key.encode(): p for p in listed}
    if len(policies) != len(listed):
        raise InvalidRequestError("A key is given twice (api_keys and key_policies).")
    keys = list(policies)
    rates = RateLimiter()
    if check_window is not None:
        check_window_size(check_window)
    created = int(time.time())
    registry = CollectorRegistry()
    requests = Counter("auto_model_requests", "Requests answered, by endpoint and HTTP status.",
                       ["endpoint", "status"], registry=registry)  # fmt: skip
    latency = Histogram("auto_model_request_seconds", "Seconds until the response starts, by endpoint.",
                        ["endpoint"], registry=registry)  # fmt: skip
    tokens = Counter("auto_model_tokens", "Tokens of answered requests (streams: not counted).", ["kind"],
                     registry=registry)  # fmt: skip
    in_progress = Gauge("auto_model_requests_in_progress", "Requests being answered now.", registry=registry)
    queue_depth = Gauge("auto_model_queue_depth", "Requests waiting for or in an engine batch, or for an upstream "
                        "slot.", registry=registry)  # fmt: skip
    checks_run = Counter("auto_model_answer_checks", "Answers the answer check scored, by route.", ["route"],
                         registry=registry)  # fmt: skip
    replaced = Counter("auto_model_answers_replaced", "Answers the answer check replaced with the refusal, by route.",
                       ["route"], registry=registry)  # fmt: skip
    batch_sizes = Histogram("auto_model_batch_size", "Requests per in-process engine call.", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip
    state: dict[str, Any] = {"admitted": 0, "client": None, "preparing": 0}
    # The alignment of concurrent requests is batched (one embedding call for the queries that arrived
    # while the last batch was being aligned), on one thread of its own.
    align_thread = ThreadPoolExecutor(1, thread_name_prefix="auto-model-align")
    aligner = MicroBatcher(lambda items: _align(model, items, client_system, engine=upstream is None), window=0.0,
                           max_batch=64, executor=align_thread)  # fmt: skip
    # The engine's batches wait past their window for requests still being aligned (in-process only).
    batcher = None if upstream else MicroBatcher(
        model.run_requests, window=limits.batch_window, max_batch=limits.max_batch, on_batch=batch_sizes.observe,
        expecting=lambda: state["preparing"],
    )  # fmt: skip
    capacity = (limits.max_concurrency if upstream else limits.max_batch) + limits.max_queue
    upstream_slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal upstream_slots
        if upstream is not None:
            state["client"] = UpstreamClient(upstream, timeout=limits.request_timeout,
                                             max_connections=limits.max_concurrency)  # fmt: skip
            upstream_slots = asyncio.Semaphore(limits.max_concurrency)
        # The embedder's first use, on the alignment thread: measured, a thread other than the one that
        # first ran it embeds a lone query about 40% slower.
        await aligner.submit(("text", ["warm-up"], GenerationOptions()))
        try:
            yield
        finally:
            if batcher is not None:
                await batcher.close()
            await aligner.close()
            align_thread.shutdown(wait=False)
            if state["client"] is not None:
                await state["client"].close()

    app = FastAPI(title="auto-model", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BrowserGuard, check_host=not keys, hosts=[hosts] if isinstance(hosts, str) else hosts)

    # -- shared request handling ---------------------------------------------------------------

    def authorised(request: Request, accepted: list[bytes] = keys) -> bytes | None:
        """The request's key (None: the server has none); a 401 unless it is one of ``accepted``."""
        if not accepted:
            return None
        given = request.headers.get("authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        found = [key for key in accepted if hmac.compare_digest(token, key)]
        if not found:
            raise _Refused(401, "Missing or wrong API key: pass 'Authorization: Bearer KEY'.",
                           kind="authentication_error", code="invalid_api_key")  # fmt: skip
        return found[0]

    async def read_json(request: Request, endpoint: str) -> dict[str, Any]:
        """The body, checked against the endpoint's request model and the limits (:mod:`.protocol`)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        raw = bytearray()

        async def read() -> None:
            async for part in request.stream():
                raw.extend(part)
                if len(raw) > limits.max_body_bytes:
                    raise _too_large(limits.max_body_bytes)

        try:
            await asyncio.wait_for(read(), limits.body_timeout)  # a body sent slowly is not waited for
        except asyncio.TimeoutError:
            raise _Refused(408, f"The request body took longer than {limits.body_timeout:g} s to arrive.",
                           code="body_timeout") from None  # fmt: skip
        try:
            body = parse_body(raw, endpoint, limits)
            if upstream is not None:
                check_forwardable(body, endpoint, forwarded)
            return body
        except BodyError as exc:
            raise _Refused(400, str(exc), param=exc.param) from None

    def admit() -> None:
        if state["admitted"] >= capacity:
            raise _Refused(429, "The server is at capacity (its queue is full); retry shortly.",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        state["admitted"] += 1

    def release() -> None:
        state["admitted"] -= 1

    async def guarded(request: Request, work: Any) -> Any:
        """``work``'s result; cancelled when the client disconnects or the request times out (504)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=limits.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if watcher in done:
            raise _ClientGone
        raise _Refused(504, f"The request took longer than {limits.request_timeout:g} s.", kind="timeout",
                       code="timeout")  # fmt: skip

    def examples_for(options: GenerationOptions, routes: list[str]) -> str:
        """The examples each request gets (comma-separated, like the routes)."""
        named: list[str | None] = list(routes) or [None]
        return ",".join(str(model.aligner.examples_for(r, options)) for r in named)

    def alignment_headers(
        options: GenerationOptions,
        routes: list[str],
        decoding: dict[str, Any] | None = None,
        checks: list[str] | None = None,
        **timing: float,
    ) -> dict[str, str]:
        """The alignment's headers, and ``Server-Timing`` (milliseconds: ``align``, the routing and example
        retrieval; ``engine`` or ``upstream``, until its answer, or a stream's start)."""
        artifact = model.aligner.prompt_artifact.model_id if options.optimized_prompt else None
        headers = {
            "x-auto-model-artifact": str(artifact or "none"),
            "x-auto-model-examples": examples_for(options, routes),
        }
        if routes:
            headers["x-auto-model-route"] = ",".join(routes)
        if decoding:
            headers["x-auto-model-decoding"] = ",".join(f"{k}={v}" for k, v in sorted(decoding.items()))
        if options.best_of > 1:
            headers["x-auto-model-best-of"] = str(options.best_of)
        headers["x-auto-model-checks"] = ",".join(checks_of(options) if checks is None else checks) or "none"
        if timing:
            headers["server-timing"] = ", ".join(f"{k};dur={v * 1e3:.2f}" for k, v in timing.items())
        return headers

    def alignment(body: dict[str, Any], key: bytes | None = None) -> GenerationOptions:
        """The request's alignment settings: the server's, or the client's override where allowed
        (``check_answers`` by the keys that may skip it, the rest by those that may override, or by
        everyone with ``allow_alignment_override``)."""
        policy = policies.get(key) if key is not None else None
        override = body.get("auto_model")
        settings: dict[str, Any] = {"num_optimized_icl": num_examples, "optimized_icl": num_examples != 0}
        if override is not None:
            if not isinstance(override, dict) or set(override) - {*_OVERRIDES, "check_answers"}:
                raise _Refused(400, f"'auto_model' must be an object with some of {', '.join(_OVERRIDES)}, "
                               "check_answers.", param="auto_model")  # fmt: skip
            override = dict(override)
            if "check_answers" in override and override["check_answers"] is not True:
                if not (policy and policy.unchecked):
                    raise _Refused(403, "This key may not turn the answer check off ('auto_model.check_answers'); "
                                   "the server's operator names the keys that may (--unchecked-key, or a key "
                                   "file's skip_answer_check).",
                                   kind="permission_error", param="auto_model")  # fmt: skip
            settings["check_answers"] = override.pop("check_answers", True)
            if override and not (allow_alignment_override or (policy and policy.override)):
                raise _Refused(400, "This server does not let this client change the alignment ('auto_model'); "
                               "its operator can allow it with --allow-alignment-override, or for a key with "
                               "a key file's override_alignment.", param="auto_model")  # fmt: skip
            settings.update(override)
        return GenerationOptions(**settings)

    def checks_of(options: GenerationOptions) -> list[str]:
        """The checks a request's answers get: ``answer`` (the answer check) and ``loop`` (the loop cut)."""
        found = []
        if options.check_answers and model.aligner.answer_check is not None:
            found.append("answer")
        if options.cut_loops:
            found.append("loop")
        return found

    def checks_of_request(prepared: Any) -> list[str]:
        """The checks an engine request's answer gets."""
        return (["answer"] if prepared.check_answer else []) + (["loop"] if prepared.sampling.cut_loops else [])

    def counted(routes: list[str]) -> Any:
        """Called once a checked stream has ended: counts its check and whether it replaced the answer."""
        route = routes[0] if routes else "none"

        def count(stream: Any) -> None:
            if getattr(stream, "checks", 0):
                checks_run.labels(route).inc()
                if stream.filtered:
                    replaced.labels(route).inc()

        return count

    def count_checks(routes: list[str], completions: list[Any]) -> None:
        """Prometheus counters of the answers checked and replaced, by route."""
        for i, completion in enumerate(completions):
            route = routes[i] if i < len(routes) else routes[-1] if routes else "none"
            if getattr(completion, "answer_score", None) is not None:
                checks_run.labels(route).inc()
                if completion.finish_reason == CONTENT_FILTER:
                    replaced.labels(route).inc()

    def check_model(body: dict[str, Any]) -> None:
        if body.get("model") != name:
            raise _Refused(404, f"The model {body.get('model')!r} does not exist; this server serves {name!r}.",
                           param="model", code="model_not_found")  # fmt: skip

    def max_tokens_of(body: dict[str, Any], *fields: str) -> int | None:
        value = next((body[f] for f in fields if body.get(f) is not None), None)
        if value is None:
            return None
        return int(min(value, limits.max_tokens))  # an integer >= 1 (protocol)

    async def handle(request: Request, endpoint: str, work: Any) -> Any:
        started = time.perf_counter()
        with in_progress.track_inprogress():
            response = await respond(request, endpoint, work)
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def respond(request: Request, endpoint: str, work: Any) -> Any:
        admitted = False
        try:
            key = authorised(request)
            wait = rates.wait(policies[key]) if key is not None else 0.0
            if wait:
                raise _Refused(429, "This key has sent more requests a minute than its limit; retry shortly.",
                               kind="rate_limit_error", code="rate_limited",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
            body = await read_json(request, endpoint)
            check_model(body)
            options = alignment(body, key)
            admit()
            admitted = True
            response = await work(request, body, options)
            if isinstance(response, StreamingResponse):
                admitted = False  # the stream releases its place when it ends
            return response
        except _Refused as error:
            return error.response()
        except _ClientGone:
            return Response(status_code=499)
        except UpstreamError as exc:
            return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
        except InvalidRequestError as exc:
            return _Refused(400, str(exc)).response()
        except AutoModelError as exc:
            return _Refused(500, str(exc), kind="server_error").response()
        finally:
            if admitted:
                release()

    def usage(prompt: int, completion: int) -> dict[str, int]:
        tokens.labels("prompt").inc(prompt)
        tokens.labels("completion").inc(completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- in-process ----------------------------------------------------------------------------

    def fields_supported(body: dict[str, Any], supported: set[str]) -> None:
        for field in body:
            if field not in supported:
                raise _Refused(400, f"'{field}' is not supported by this server's in-process engine; leave it out.",
                               param=field)  # fmt: skip
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _Refused(400, "'stream_options' must be an object.", param="stream_options")
        if stream_options.get("include_usage"):
            raise _Refused(400, "'stream_options.include_usage' is not supported by this server's in-process engine; "
                           "the non-streaming response carries 'usage'.", param="stream_options")  # fmt: skip

    def sampled_best_of(body: dict[str, Any]) -> int:
        """How many samples a request's answer is chosen from: ``best_of``, except for streams and
        greedy requests (one answer each)."""
        greedy = isinstance(body.get("temperature"), (int, float)) and body["temperature"] == 0
        return 1 if body.get("stream") or greedy else best_of

    def sampling(body: dict[str, Any], options: GenerationOptions, *limit_fields: str) -> GenerationOptions:
        # The sampling values are checked where every request's are (GenerationOptions, check_decoding): a 400.
        penalties = check_decoding({k: body[k] for k in _PENALTIES if body.get(k) is not None}, "the request")
        return replace(
            options,
            best_of=sampled_best_of(body),
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            max_new_tokens=max_tokens_of(body, *limit_fields) or min(512, limits.max_tokens),
            stop=body.get("stop"),
            seed=body.get("seed"),
            extra=penalties,
        )

    def count_n(body: dict[str, Any]) -> int:
        n = body.get("n") or 1  # 1 to MAX_N (protocol)
        if n > 1 and body.get("stream"):
            raise _Refused(400, "'n' must be 1 when streaming from this server's in-process engine.", param="n")
        return int(n)

    async def aligned(kind: str, what: Any, options: GenerationOptions) -> tuple[Any, float]:
        """The request aligned (:func:`_align`), and the seconds it took, waiting included."""
        started = time.perf_counter()
        result = await aligner.submit((kind, what, options))
        return result, time.perf_counter() - started

    @contextmanager
    def preparing() -> Iterator[Any]:
        """Counts a request as on its way to the engine until ``ready()`` (or the end of the block)."""
        counted = [True]
        state["preparing"] += 1

        def ready() -> None:
            if counted[0]:
                counted[0] = False
                state["preparing"] -= 1

        try:
            yield ready
        finally:
            ready()

    async def run_batched(request: Request, prepared: list[Any], ready: Any) -> list[Any]:
        queue_depth.inc(len(prepared))
        try:
            assert batcher is not None  # in-process only
            futures = [batcher.enqueue(p) for p in prepared]
            ready()
            return list(await guarded(request, asyncio.gather(*futures)))
        finally:
            queue_depth.dec(len(prepared))

    async def local_chat(request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        fields_supported(body, _CHAT_FIELDS)
        n = count_n(body)
        messages = body["messages"]  # a non-empty list (protocol)
        options = sampling(body, options, "max_completion_tokens", "max_tokens")
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with preparing() as ready:
            prepared, align = await aligned("chat", messages, options)
            route = [prepared.route.name] if prepared.route else []
            decoding = applied_decoding([prepared])
            if body.get("stream"):
                chunks = model.stream_request(prepared, check_window)
                events = (chat_event(reply_id, now, name, *event) for event in chat_deltas(chunks, counted(route)))
                headers = alignment_headers(options, route, decoding, checks_of_request(prepared), align=align)
                return streaming(request, pump_events(events, chunks.close), headers)
            started = time.perf_counter()
            done = await run_batched(request, [prepared] * n, ready)
            engine = time.perf_counter() - started
        count_checks(route, done)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None, **loop_mark(c.looped)} for i, c in enumerate(done)]  # fmt: skip
        reply = {"id": reply_id, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                 "usage": usage(done[0].prompt_tokens, sum(c.completion_tokens for c in done))}  # fmt: skip
        headers = alignment_headers(options, route, decoding, checks_of_request(prepared), align=align, engine=engine)
        return JSONResponse(reply, headers=headers)

    async def local_completions(request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        fields_supported(body, _COMPLETION_FIELDS)
        n = count_n(body)
        prompts = prompts_of(body)
        options = sampling(body, options, "max_tokens")
        reply_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream") and len(prompts) != 1:
            raise _Refused(400, "Stream one prompt at a time from this server's in-process engine.", param="prompt")
        with preparing() as ready:
            prepared, align = await aligned("text", prompts, options)
            routes = [p.route.name for p in prepared if p.route]
            decoding = applied_decoding(prepared)
            if body.get("stream"):
                chunks = model.stream_request(prepared[0], check_window)
                events = (
                    completion_event(reply_id, now, name, *event) for event in text_pieces(chunks, counted(routes))
                )
                headers = alignment_headers(options, routes, decoding, checks_of_request(prepared[0]), align=align)
                return streaming(request, pump_events(events, chunks.close), headers)
            started = time.perf_counter()
            done = await run_batched(request, [p for p in prepared for _ in range(n)], ready)
            engine = time.perf_counter() - started
        count_checks([r for r in routes for _ in range(n)], done)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None,
                    **loop_mark(c.looped)} for i, c in enumerate(done)]  # fmt: skip
        prompt_tokens = sum(c.prompt_tokens for c in done[::n])
        reply = {"id": reply_id, "object": "text_completion", "created": now, "model": name, "choices": choices,
                 "usage": usage(prompt_tokens, sum(c.completion_tokens for c in done))}  # fmt: skip
        headers = alignment_headers(options, routes, decoding, checks_of_request(prepared[0]), align=align,
                                    engine=engine)  # fmt: skip
        return JSONResponse(reply, headers=headers)

    def applied_decoding(prepared: list[Any]) -> dict[str, Any]:
        """The decoding settings the engine applies to these requests (shared by all of them)."""
        sets = [{k: v for k, v in p.sampling.extra.items() if k in DECODING_SETTINGS} for p in prepared]
        return sets[0] if all(d == sets[0] for d in sets) else {}

    def prompts_of(body: dict[str, Any]) -> list[str]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _Refused(400, "'prompt' must be a string or a non-empty list of strings (token arrays cannot be "
                           "aligned).", param="prompt")  # fmt: skip
        return prompts

    def streaming(request: Request, events: Any, headers: dict[str, str]) -> StreamingResponse:
        """A streamed response that gives back its place, and closes its source (the engine's stream or
        the upstream's response), once: when it ends, or when its client leaves, even before it began."""
        finished = [False]

        async def finish() -> None:
            if finished[0]:
                return
            finished[0] = True
            release()
            with anyio.CancelScope(shield=True):
                await events.aclose()

        async def body() -> AsyncIterator[str]:
            deadline = time.monotonic() + limits.request_timeout  # a stream ends, however slow its source
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.__anext__(), deadline - time.monotonic())
                    except StopAsyncIteration:
                        break
                    yield event
            except asyncio.TimeoutError:
                error = {"message": f"The stream took longer than {limits.request_timeout:g} s.", "type": "timeout",
                         "param": None, "code": "timeout"}  # fmt: skip
                yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
            finally:
                await finish()

        return StreamingResponse(body(), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(finish))  # fmt: skip

    # -- upstream ------------------------------------------------------------------------------

    async def forward(request: Request, path: str, payload: dict[str, Any], options: GenerationOptions,
                      routes: list[str], align: float, queries: list[Any]) -> Any:  # fmt: skip
        """Send ``payload`` upstream (with the artifact's decoding settings for ``routes`` under the
        client's own; for ``best_of``, asking for that many choices per answer and keeping the best of
        each group by the reward); ``queries``: what each prompt asks. With ``cut_loops``, answers are
        cut where they start to loop."""
        client: UpstreamClient = state["client"]
        n = payload.get("n") or 1
        chat = path == "chat/completions"
        if options.optimized_decoding:
            for key, value in model.aligner.decoding_for(routes[0] if len(set(routes)) == 1 else None).items():
                if payload.get(key) is None:
                    payload[key] = value
        decoding = {k: payload[k] for k in DECODING_SETTINGS if payload.get(k) is not None}
        if options.best_of > 1:
            payload = {**payload, "n": n * options.best_of}
        assert upstream_slots is not None
        queue_depth.inc()
        waiting = True
        try:
            async with upstream_slots:
                queue_depth.dec()
                waiting = False
                started = time.perf_counter()
                if payload.get("stream"):
                    response, lines = await guarded(request, client.stream(path, payload))
                    took = time.perf_counter() - started
                    headers = alignment_headers(options, routes, decoding, align=align, upstream=took)
                    answers = n * (len(queries) if not chat else 1)
                    cut = StreamLoopCut(answers, chat) if options.cut_loops else None
                    check = stream_check(options, chat, n, answers, routes, queries)
                    return streaming(request, relay_lines(response, lines, name, cut, check), headers)
                data = await guarded(request, client.post(path, payload))
                took = time.perf_counter() - started
                headers = alignment_headers(options, routes, decoding, align=align, upstream=took)
        finally:
            if waiting:
                queue_depth.dec()
        if "model" in data:
            data["model"] = name
        if options.best_of > 1:
            data["choices"] = await anyio.to_thread.run_sync(best_choices, data, queries, n, options.best_of,
                                                             chat)  # fmt: skip
        if options.cut_loops:
            cut_choices(data, chat)
        if "answer" in checks_of(options):
            await anyio.to_thread.run_sync(check_choices, data, chat, routes, n, queries)
        counts = data.get("usage")
        if isinstance(counts, dict) and isinstance(counts.get("prompt_tokens"), int):
            tokens.labels("prompt").inc(counts["prompt_tokens"])
            tokens.labels("completion").inc(int(counts.get("completion_tokens") or 0))
        return JSONResponse(data, headers=headers)

    async def upstream_chat(request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        messages = body["messages"]  # a non-empty list (protocol)
        prompt, align = await aligned("chat", messages, options)
        payload = {k: v for k, v in body.items() if k != "auto_model"}
        payload.update(model=upstream_model, messages=prompt.prompt)
        cap(payload, "max_completion_tokens", "max_tokens")
        route = [prompt.route.name] if prompt.route else []
        options = replace(options, best_of=sampled_best_of(body))
        return await forward(request, "chat/completions", payload, options, route, align, [prompt.query])

    async def upstream_completions(request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        prompts = prompts_of(body)
        assembled, align = await aligned("text", prompts, options)
        payload = {k: v for k, v in body.items() if k != "auto_model"}
        texts = [a.prompt for a in assembled]
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        payload.update(model=upstream_model, prompt=texts[0] if isinstance(body["prompt"], str) else texts,
                       stop=list(dict.fromkeys([*stop, *BASE_STOP])))  # fmt: skip
        cap(payload, "max_tokens")
        routes = [a.route.name for a in assembled if a.route]
        options = replace(options, best_of=sampled_best_of(body))
        return await forward(request, "completions", payload, options, routes, align, [a.query for a in assembled])

    def best_choices(data: dict[str, Any], queries: list[Any], n: int, k: int, chat: bool) -> list[Any]:
        """The upstream's choices, ``k`` per answer (prompt-major, as OpenAI orders them), reduced to
        the best of each ``k`` by the reward (:meth:`~auto_model.rewards.best_of.BestOf.rerank`), renumbered."""
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != len(queries) * n * k:
            raise UpstreamError(502, {"error": {"message": f"The upstream answered with {len(choices or [])} choices "
                                                f"for n={n * k}.", "type": "upstream_error", "param": None,
                                                "code": None}})  # fmt: skip
        choices = sorted(choices, key=lambda c: c.get("index") or 0)
        groups = [choices[g * k : (g + 1) * k] for g in range(len(choices) // k)]

        def text(choice: dict[str, Any]) -> str:
            content = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            return content if isinstance(content, str) else ""

        sampled = [Completion(text(g[0]), "stop", 0, 0, samples=tuple(Completion(text(c), "stop", 0, 0) for c in g))
                   for g in groups]  # fmt: skip
        best = model.best_of.rerank([queries[g // n] or "" for g in range(len(groups))], sampled)
        picks = [best_index(chosen.scores) for chosen in best]
        return [{**group[pick], "index": g} for g, (group, pick) in enumerate(zip(groups, picks, strict=True))]

    def check_choices(data: dict[str, Any], chat: bool, routes: list[str], n: int, queries: list[Any]) -> None:
        """An upstream's answers checked (:meth:`~auto_model.aligner.Aligner.answer_scores`); each one the check blocks
        is replaced by its refusal, ``finish_reason`` ``content_filter``."""
        check = model.aligner.answer_check
        holders: list[tuple[dict[str, Any], dict[str, Any], str]] = []
        for choice in data.get("choices") or []:
            holder = choice.get("message") if chat and isinstance(choice, dict) else choice
            text = holder.get("content" if chat else "text") if isinstance(holder, dict) else None
            if isinstance(choice, dict) and isinstance(holder, dict) and isinstance(text, str) and text.strip():
                holders.append((choice, holder, text))
        if check is None or not holders:
            return
        asked = [asked_of(choice_index(c), n, queries, routes) for c, _, _ in holders]
        scores = model.aligner.answer_scores([text for _, _, text in holders], [query for query, _ in asked])
        for (choice, holder, text), score, (_, route) in zip(holders, scores, asked, strict=True):
            checks_run.labels(route).inc()
            if check.replaces(text, score, route):
                holder["content" if chat else "text"] = check.refusal
                choice["finish_reason"] = CONTENT_FILTER
                replaced.labels(route).inc()

    def stream_check(options: GenerationOptions, chat: bool, n: int, answers: int, routes: list[str],
                     queries: list[Any]) -> StreamAnswerCheck | None:  # fmt: skip
        """The answer check of an upstream's stream, in windows (``check_window``, or the artifact's),
        counted per answer by route; None when the request's answers are not checked."""
        check = model.aligner.answer_check
        if check is None or "answer" not in checks_of(options):
            return None
        counted: set[int] = set()

        def passes(index: int, text: str) -> bool:
            query, route = asked_of(index, n, queries, routes)
            if index not in counted:
                counted.add(index)
                checks_run.labels(route).inc()
            score = model.aligner.answer_scores([text], [query])[0]
            if check.replaces(text, score, route):
                replaced.labels(route).inc()
                return False
            return True

        window = check.window if check_window is None else check_window
        return StreamAnswerCheck(answers, chat, window, passes, check.refusal)

    def cap(payload: dict[str, Any], *fields: str) -> None:
        given = [f for f in fields if payload.get(f) is not None]
        for f in given:
            payload[f] = max_tokens_of(payload, f)
        if not given:
            payload["max_tokens"] = limits.max_tokens

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Any:
        if upstream is not None:
            # The upstream is asked at most once every HEALTH_TTL seconds, however often /health is called.
            checked, problem = state.get("health") or (float("-inf"), None)
            if time.monotonic() - checked > HEALTH_TTL:
                problem = await state["client"].ready()
                state["health"] = (time.monotonic(), problem)
            if problem:
                return JSONResponse({"status": "unavailable", "model": name, "reason": problem}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    def metrics(request: Request) -> Any:
        try:
            authorised(request, [*keys, *([metrics_key.encode()] if metrics_key else [])])
        except _Refused as error:
            return error.response()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def playground() -> Any:
        page = resources.files("auto_model.server").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__MODEL__", json.dumps(name).replace("<", "\\u003c")))

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        started = time.perf_counter()
        try:
            authorised(request)
            listed = [{"id": name, "object": "model", "created": created, "owned_by": "auto-model"}]
            response: Any = JSONResponse({"object": "list", "data": listed})
        except _Refused as error:
            response = error.response()
        requests.labels("models", str(response.status_code)).inc()
        latency.labels("models").observe(time.perf_counter() - started)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, "chat.completions", upstream_chat if upstream else local_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, "completions", upstream_completions if upstream else local_completions)

    return app


def _align(model: Any, items: list[tuple[str, Any, GenerationOptions]], client_system: str, engine: bool) -> list[Any]:
    """A batch of requests, aligned, in order. For the in-process ``engine``, ``("chat", messages,
    options)`` gets the aligner's ``chat_requests`` request and ``("text", prompts, options)`` the
    list of its ``requests``; for an upstream, the aligner's ``chat_prompts`` prompt and the list of
    its base-format ``prompts``. Items with the same options are aligned in
    one call; a batch with a bad item is aligned item by item, so that the bad one alone fails."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (kind, _, options) in enumerate(items):
        groups.setdefault((kind, repr(options)), []).append(i)
    outcomes: list[Any] = [None] * len(items)

    def aligned(indices: list[int]) -> list[Any]:
        kind, options = items[indices[0]][0], items[indices[0]][2]
        conversations = [items[i][1] for i in indices]
        if kind == "chat" and engine:
            return model.aligner.chat_requests(conversations, options, client_system)
        if kind == "chat":
            return model.aligner.chat_prompts(conversations, options, client_system)
        flat = [p for i in indices for p in items[i][1]]
        if engine:
            prompts = model.aligner.requests(flat, options)
        else:
            prompts = model.aligner.prompts(parse_queries(flat)[1], options, fmt="base")
        out, at = [], 0
        for i in indices:
            out.append(prompts[at : at + len(items[i][1])])
            at += len(items[i][1])
        return out

    for indices in groups.values():
        try:
            results = aligned(indices)
        except AutoModelError:
            results = []
            for i in indices:
                try:
                    results.append(aligned([i])[0])
                except AutoModelError as exc:
                    results.append(exc)
        for i, result in zip(indices, results, strict=True):
            outcomes[i] = result
    return outcomes


def _too_large(limit: int) -> _Refused:
    return _Refused(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")  # fmt: skip


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: ASGI's next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
