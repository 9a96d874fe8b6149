"""The ASGI app of ``auto-model serve`` (FastAPI on uvicorn): its routes, over the request handling
both modes share (:mod:`~auto_model.server.gateway`) and the mode that answers.

Two modes, one app:

- **in-process** (``create_app(model)``, :mod:`~auto_model.server.local`): the model's own engine
  answers. Concurrent requests are served in batches (:mod:`auto_model.server.batching`): those
  that arrive within ``batch_window`` seconds of each other, or while the engine is busy, go to the
  engine in one call of at most ``max_batch`` requests. What the engine cannot do (``tools``,
  ``response_format``, ``logprobs``, ...) is refused with a 400 that names the field.
- **upstream** (``create_app(model, upstream=Upstream(url, key))``, :mod:`~auto_model.server.forwarding`):
  requests are forwarded to an OpenAI-compatible server (:mod:`auto_model.server.upstream`). The
  fields of an allow-list (:data:`~auto_model.server.protocol.FORWARDED`: ``tools``,
  ``response_format``, ``logprobs``, ``seed``, ``n``, multi-part content with inline media, ...;
  ``forward_fields`` adds more) pass through unchanged, both ways; any other field is refused with
  a 400, and those that would reveal or bypass the alignment (``echo``, ``chat_template``, ...)
  cannot be added. The model's name is mapped (served name to upstream name and back).

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

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from auto_model.answer_check import check_window as check_window_size
from auto_model.constants import is_whole
from auto_model.conversations import SYSTEM_MESSAGE_MODES
from auto_model.errors import InvalidRequestError
from auto_model.server.forwarding import HEALTH_TTL, ForwardingMode
from auto_model.server.gateway import Gateway, Refused
from auto_model.server.local import LocalMode
from auto_model.server.protocol import MAX_N, ServerLimits, check_forward_fields
from auto_model.server.security import BrowserGuard, KeyPolicy
from auto_model.server.upstream import Upstream

#: What happens to a client's own system message (``client_system``).
CLIENT_SYSTEM_MODES = SYSTEM_MESSAGE_MODES

__all__ = ["CLIENT_SYSTEM_MODES", "HEALTH_TTL", "ServerLimits", "create_app"]


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
    if isinstance(unchecked_keys, str):
        raise InvalidRequestError("unchecked_keys must be a list of keys, not one string.")
    if set(unchecked_keys) - {*api_keys, *(p.key for p in key_policies)}:
        raise InvalidRequestError("unchecked_keys must be keys of api_keys or key_policies.")
    listed = [KeyPolicy(k, f"api key {i + 1}", unchecked=k in unchecked_keys) for i, k in enumerate(api_keys) if k]
    listed += [replace(p, unchecked=p.unchecked or p.key in unchecked_keys) for p in key_policies]
    policies = {p.key.encode(): p for p in listed}
    if len(policies) != len(listed):
        raise InvalidRequestError("A key is given twice (api_keys and key_policies).")
    if check_window is not None:
        check_window_size(check_window)
    name = served_name or model.model_name
    gateway = Gateway(
        model,
        name,
        limits,
        policies,
        capacity=(limits.max_concurrency if upstream else limits.max_batch) + limits.max_queue,
        engine=upstream is None,
        client_system=client_system,
        num_examples=num_examples,
        allow_alignment_override=allow_alignment_override,
        best_of=best_of,
        check_window=check_window,
        forwarded=forwarded if upstream is not None else None,
    )
    mode: LocalMode | ForwardingMode = ForwardingMode(gateway, upstream) if upstream else LocalMode(gateway)
    return _app(gateway, mode, hosts, metrics_key)


def _app(gateway: Gateway, mode: LocalMode | ForwardingMode, hosts: Any, metrics_key: str | None) -> FastAPI:
    """The routes, over ``gateway`` and the mode that answers."""
    name, metrics, created = gateway.name, gateway.metrics, int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await mode.start()
        await gateway.start()
        try:
            yield
        finally:
            await mode.close()
            await gateway.close()

    app = FastAPI(title="auto-model", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BrowserGuard, check_host=not gateway.keys, hosts=[hosts] if isinstance(hosts, str) else hosts)

    @app.get("/health")
    async def health() -> Any:
        problem = await mode.health()
        if problem:
            return JSONResponse({"status": "unavailable", "model": name, "reason": problem}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    def metrics_page(request: Request) -> Any:
        try:
            gateway.authorised(request, [*gateway.keys, *([metrics_key.encode()] if metrics_key else [])])
        except Refused as error:
            return error.response()
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def playground() -> Any:
        page = resources.files("auto_model.server").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__MODEL__", json.dumps(name).replace("<", "\\u003c")))

    @app.get("/v1/models")
    def models(request: Request) -> Any:
        started = time.perf_counter()
        try:
            gateway.authorised(request)
            listed = [{"id": name, "object": "model", "created": created, "owned_by": "auto-model"}]
            response: Any = JSONResponse({"object": "list", "data": listed})
        except Refused as error:
            response = error.response()
        metrics.requests.labels("models", str(response.status_code)).inc()
        metrics.latency.labels("models").observe(time.perf_counter() - started)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await gateway.handle(request, "chat.completions", mode.chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await gateway.handle(request, "completions", mode.completions)

    return app
