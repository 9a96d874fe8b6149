"""What every request to ``auto-model serve`` goes through, whichever mode answers it
(:mod:`~auto_model.server.local` in-process, :mod:`~auto_model.server.forwarding` in front of an
upstream): its key and rate, its body read against the endpoint's typed model and limits, its
alignment settings and headers, its place in the queue, the timeout and the client's disconnect,
the alignment itself (batched over the requests that arrive together), and a streamed reply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from auto_model.answer_check import CONTENT_FILTER
from auto_model.errors import AutoModelError, InvalidRequestError
from auto_model.options import GenerationOptions, parse_queries
from auto_model.server.batching import MicroBatcher
from auto_model.server.metrics import ServerMetrics
from auto_model.server.protocol import BodyError, ServerLimits, check_forwardable, parse_body
from auto_model.server.security import KeyPolicy, RateLimiter
from auto_model.server.upstream import UpstreamError

#: The alignment settings a request may override (``"auto_model": {...}``), besides ``check_answers``.
OVERRIDES = ("optimized_prompt", "optimized_icl", "num_optimized_icl", "optimized_decoding", "cut_loops")


class Refused(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


#: A mode's handler of one endpoint: the request, its checked body and its alignment settings.
Handler = Callable[[Request, dict[str, Any], GenerationOptions], Awaitable[Any]]


@dataclass
class Gateway:
    """The request handling both modes share, over ``model`` (its ``aligner``, ``best_of`` and
    ``model_name``) served as ``name``. ``engine``: whether requests are aligned for the in-process
    engine (else as prompts for an upstream); ``forwarded``: the fields an upstream may get (None
    in-process); ``capacity``: requests admitted at once, queued ones included."""

    model: Any
    name: str
    limits: ServerLimits
    policies: dict[bytes, KeyPolicy]
    capacity: int
    engine: bool
    client_system: str = "prepend"
    num_examples: int | None = None
    allow_alignment_override: bool = False
    best_of: int = 1
    check_window: int | None = None
    forwarded: frozenset[str] | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)

    def __post_init__(self) -> None:
        self.keys = list(self.policies)
        self.rates = RateLimiter()
        self.admitted = 0
        # The alignment of concurrent requests is batched (one embedding call for the queries that arrived
        # while the last batch was being aligned), on one thread of its own.
        self._align_thread = ThreadPoolExecutor(1, thread_name_prefix="auto-model-align")
        self._alignments = MicroBatcher(lambda items: align_batch(self.model, items, self.client_system, self.engine),
                                     window=0.0, max_batch=64, executor=self._align_thread)  # fmt: skip

    async def start(self) -> None:
        # The embedder's first use, on the alignment thread: measured, a thread other than the one that
        # first ran it embeds a lone query about 40% slower.
        await self._alignments.submit(("text", ["warm-up"], GenerationOptions()))

    async def close(self) -> None:
        await self._alignments.close()
        self._align_thread.shutdown(wait=False)

    # -- who may ask, and what ---------------------------------------------------------------

    def authorised(self, request: Request, accepted: list[bytes] | None = None) -> bytes | None:
        """The request's key (None: the server has none); a 401 unless it is one of ``accepted``
        (default: the server's keys)."""
        accepted = self.keys if accepted is None else accepted
        if not accepted:
            return None
        given = request.headers.get("authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        found = [key for key in accepted if hmac.compare_digest(token, key)]
        if not found:
            raise Refused(401, "Missing or wrong API key: pass 'Authorization: Bearer KEY'.",
                          kind="authentication_error", code="invalid_api_key")  # fmt: skip
        return found[0]

    async def read_json(self, request: Request, endpoint: str) -> dict[str, Any]:
        """The body, checked against the endpoint's request model and the limits (:mod:`.protocol`)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        raw = bytearray()

        async def read() -> None:
            async for part in request.stream():
                raw.extend(part)
                if len(raw) > limit:
                    raise too_large(limit)

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)  # a body sent slowly is not waited for
        except asyncio.TimeoutError:
            raise Refused(408, f"The request body took longer than {self.limits.body_timeout:g} s to arrive.",
                          code="body_timeout") from None  # fmt: skip
        try:
            body = parse_body(raw, endpoint, self.limits)
            if self.forwarded is not None:
                check_forwardable(body, endpoint, self.forwarded)
            return body
        except BodyError as exc:
            raise Refused(400, str(exc), param=exc.param) from None

    def check_model(self, body: dict[str, Any]) -> None:
        if body.get("model") != self.name:
            raise Refused(404, f"The model {body.get('model')!r} does not exist; this server serves {self.name!r}.",
                          param="model", code="model_not_found")  # fmt: skip

    def alignment(self, body: dict[str, Any], key: bytes | None = None) -> GenerationOptions:
        """The request's alignment settings: the server's, or the client's override where allowed
        (``check_answers`` by the keys that may skip it, the rest by those that may override, or by
        everyone with ``allow_alignment_override``)."""
        policy = self.policies.get(key) if key is not None else None
        override = body.get("auto_model")
        settings: dict[str, Any] = {"num_optimized_icl": self.num_examples, "optimized_icl": self.num_examples != 0}
        if override is not None:
            if not isinstance(override, dict) or set(override) - {*OVERRIDES, "check_answers"}:
                raise Refused(400, f"'auto_model' must be an object with some of {', '.join(OVERRIDES)}, "
                              "check_answers.", param="auto_model")  # fmt: skip
            override = dict(override)
            if "check_answers" in override and override["check_answers"] is not True:
                if not (policy and policy.unchecked):
                    raise Refused(403, "This key may not turn the answer check off ('auto_model.check_answers'); "
                                  "the server's operator names the keys that may (--unchecked-key, or a key "
                                  "file's skip_answer_check).",
                                  kind="permission_error", param="auto_model")  # fmt: skip
            settings["check_answers"] = override.pop("check_answers", True)
            if override and not (self.allow_alignment_override or (policy and policy.override)):
                raise Refused(400, "This server does not let this client change the alignment ('auto_model'); "
                              "its operator can allow it with --allow-alignment-override, or for a key with "
                              "a key file's override_alignment.", param="auto_model")  # fmt: skip
            settings.update(override)
        return GenerationOptions(**settings)

    def max_tokens_of(self, body: dict[str, Any], *fields: str) -> int | None:
        value = next((body[f] for f in fields if body.get(f) is not None), None)
        if value is None:
            return None
        return int(min(value, self.limits.max_tokens))  # an integer >= 1 (protocol)

    def sampled_best_of(self, body: dict[str, Any]) -> int:
        """How many samples a request's answer is chosen from: ``best_of``, except for streams and
        greedy requests (one answer each)."""
        greedy = isinstance(body.get("temperature"), (int, float)) and body["temperature"] == 0
        return 1 if body.get("stream") or greedy else self.best_of

    @staticmethod
    def prompts_of(body: dict[str, Any]) -> list[str]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise Refused(400, "'prompt' must be a string or a non-empty list of strings (token arrays cannot be "
                          "aligned).", param="prompt")  # fmt: skip
        return prompts

    # -- one request, start to end -------------------------------------------------------------

    async def handle(self, request: Request, endpoint: str, work: Handler) -> Any:
        """``work``'s response to the request, counted by endpoint and status."""
        started = time.perf_counter()
        with self.metrics.in_progress.track_inprogress():
            response = await self._respond(request, endpoint, work)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _respond(self, request: Request, endpoint: str, work: Handler) -> Any:
        admitted = False
        try:
            key = self.authorised(request)
            wait = self.rates.wait(self.policies[key]) if key is not None else 0.0
            if wait:
                raise Refused(429, "This key has sent more requests a minute than its limit; retry shortly.",
                              kind="rate_limit_error", code="rate_limited",
                              headers={"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
            body = await self.read_json(request, endpoint)
            self.check_model(body)
            options = self.alignment(body, key)
            self._admit()
            admitted = True
            response = await work(request, body, options)
            if isinstance(response, StreamingResponse):
                admitted = False  # the stream releases its place when it ends
            return response
        except Refused as error:
            return error.response()
        except ClientGone:
            return Response(status_code=499)
        except UpstreamError as exc:
            return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)
        except InvalidRequestError as exc:
            return Refused(400, str(exc)).response()
        except AutoModelError as exc:
            return Refused(500, str(exc), kind="server_error").response()
        finally:
            if admitted:
                self._release()

    def _admit(self) -> None:
        if self.admitted >= self.capacity:
            raise Refused(429, "The server is at capacity (its queue is full); retry shortly.",
                          kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
        self.admitted += 1

    def _release(self) -> None:
        self.admitted -= 1

    async def guarded(self, request: Request, work: Any) -> Any:
        """``work``'s result; cancelled when the client disconnects or the request times out (504)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=self.limits.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if watcher in done:
            raise ClientGone
        raise Refused(504, f"The request took longer than {self.limits.request_timeout:g} s.", kind="timeout",
                      code="timeout")  # fmt: skip

    async def aligned(self, kind: str, what: Any, options: GenerationOptions) -> tuple[Any, float]:
        """The request aligned (:func:`align_batch`), and the seconds it took, waiting included."""
        started = time.perf_counter()
        result = await self._alignments.submit((kind, what, options))
        return result, time.perf_counter() - started

    def streaming(self, request: Request, events: Any, headers: dict[str, str]) -> StreamingResponse:
        """A streamed response that gives back its place, and closes its source (the engine's stream or
        the upstream's response), once: when it ends, or when its client leaves, even before it began."""
        finished = [False]
        timeout = self.limits.request_timeout

        async def finish() -> None:
            if finished[0]:
                return
            finished[0] = True
            self._release()
            with anyio.CancelScope(shield=True):
                await events.aclose()

        async def body() -> AsyncIterator[str]:
            deadline = time.monotonic() + timeout  # a stream ends, however slow its source
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.__anext__(), deadline - time.monotonic())
                    except StopAsyncIteration:
                        break
                    yield event
            except asyncio.TimeoutError:
                error = {"message": f"The stream took longer than {timeout:g} s.", "type": "timeout",
                         "param": None, "code": "timeout"}  # fmt: skip
                yield f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"
            finally:
                await finish()

        return StreamingResponse(body(), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(finish))  # fmt: skip

    # -- what the reply says about its alignment -------------------------------------------------

    def checks_of(self, options: GenerationOptions) -> list[str]:
        """The checks a request's answers get: ``answer`` (the answer check) and ``loop`` (the loop cut)."""
        found = []
        if options.check_answers and self.model.aligner.answer_check is not None:
            found.append("answer")
        if options.cut_loops:
            found.append("loop")
        return found

    def alignment_headers(
        self,
        options: GenerationOptions,
        routes: list[str],
        decoding: dict[str, Any] | None = None,
        checks: list[str] | None = None,
        **timing: float,
    ) -> dict[str, str]:
        """The alignment's headers, and ``Server-Timing`` (milliseconds: ``align``, the routing and example
        retrieval; ``engine`` or ``upstream``, until its answer, or a stream's start)."""
        aligner = self.model.aligner
        artifact = aligner.prompt_artifact.model_id if options.optimized_prompt else None
        named: list[str | None] = list(routes) or [None]
        headers = {
            "x-auto-model-artifact": str(artifact or "none"),
            "x-auto-model-examples": ",".join(str(aligner.examples_for(r, options)) for r in named),
        }
        if routes:
            headers["x-auto-model-route"] = ",".join(routes)
        if decoding:
            headers["x-auto-model-decoding"] = ",".join(f"{k}={v}" for k, v in sorted(decoding.items()))
        if options.best_of > 1:
            headers["x-auto-model-best-of"] = str(options.best_of)
        headers["x-auto-model-checks"] = ",".join(self.checks_of(options) if checks is None else checks) or "none"
        if timing:
            headers["server-timing"] = ", ".join(f"{k};dur={v * 1e3:.2f}" for k, v in timing.items())
        return headers

    def counted(self, routes: list[str]) -> Callable[[Any], None]:
        """Called once a checked stream has ended: counts its check and whether it replaced the answer."""
        route = routes[0] if routes else "none"

        def count(stream: Any) -> None:
            if getattr(stream, "checks", 0):
                self.metrics.checks_run.labels(route).inc()
                if stream.filtered:
                    self.metrics.replaced.labels(route).inc()

        return count

    def count_checks(self, routes: list[str], completions: list[Any]) -> None:
        """Prometheus counters of the answers checked and replaced, by route."""
        for i, completion in enumerate(completions):
            route = routes[i] if i < len(routes) else routes[-1] if routes else "none"
            if getattr(completion, "answer_score", None) is not None:
                self.metrics.checks_run.labels(route).inc()
                if completion.finish_reason == CONTENT_FILTER:
                    self.metrics.replaced.labels(route).inc()

    def usage(self, prompt: int, completion: int) -> dict[str, int]:
        self.metrics.count_tokens(prompt, completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def align_batch(model: Any, items: list[tuple[str, Any, GenerationOptions]], client_system: str,
                engine: bool) -> list[Any]:  # fmt: skip
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


def too_large(limit: int) -> Refused:
    return Refused(413, f"The request body is larger than this server's limit of {limit} bytes.",
                   code="request_too_large")  # fmt: skip


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: ASGI's next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
