"""In-process mode of ``auto-model serve``: the model's own engine answers.

On an engine that batches continuously (``vllm-async``, the one ``auto-model serve`` starts for vLLM),
each request goes to the engine as it comes and joins its running batch at the next step; its
stream yields text as the engine makes it, and a client that leaves mid-stream has its request
aborted in the engine. Other engines are served in batches (:mod:`auto_model.server.batching`):
requests that arrive within ``batch_window`` seconds of each other, or while the engine is busy, go
to the engine in one call of at most ``max_batch`` requests; a batch waits past its window for
requests still being aligned. What the engine cannot do (``tools``, ``response_format``, ``logprobs``, ...) is refused
with a 400 that names the field.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from auto_model.backends.base import DECODING_SETTINGS, check_decoding
from auto_model.options import GenerationOptions
from auto_model.server.batching import MicroBatcher
from auto_model.server.events import (
    chat_deltas,
    chat_event,
    completion_event,
    loop_mark,
    pump_events,
    text_pieces,
    usage_event,
)
from auto_model.server.gateway import Gateway, Refused

#: The decoding settings a client may send (they win over the artifact's).
PENALTIES = ("frequency_penalty", "presence_penalty", "repetition_penalty")
#: Request fields the in-process engine honours (and ``user``, accepted and ignored).
CHAT_FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stream",
               "stream_options", "seed", "n", "user", "auto_model", *PENALTIES}  # fmt: skip
COMPLETION_FIELDS = {"model", "prompt", "temperature", "top_p", "max_tokens", "stop", "stream", "stream_options",
                     "seed", "n", "user", "auto_model", *PENALTIES}  # fmt: skip


class LocalMode:
    """The endpoints answered by ``gateway.model``'s engine (its ``run_requests`` and ``stream_request``)."""

    def __init__(self, gateway: Gateway):
        self.gateway = g = gateway
        self.model = g.model
        self.preparing_now = 0
        #: an engine that batches continuously gets each request as it comes, from a thread of its own;
        #: any other gets the micro-batcher's batches, one at a time
        self.continuous = bool(g.model.engine.continuous_batching)
        self.threads = ThreadPoolExecutor(max_workers=max(1, g.limits.max_queue), thread_name_prefix="auto-model-serve")
        self.batcher = MicroBatcher(
            self._run_batch, window=g.limits.batch_window, max_batch=g.limits.max_batch,
            on_batch=g.metrics.batch_sizes.observe, expecting=lambda: self.preparing_now,
        )  # fmt: skip

    async def start(self) -> None:
        """Nothing to open: the engine loaded before the app was made."""

    async def close(self) -> None:
        await self.batcher.close()
        self.threads.shutdown(wait=False, cancel_futures=True)

    async def health(self) -> str | None:
        return None  # the engine loaded before the app was made

    async def chat(self, request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        g = self.gateway
        arrived = time.perf_counter()
        _fields_supported(body, CHAT_FIELDS)
        n = _count_n(body)
        messages = body["messages"]  # a non-empty list (protocol)
        options = self._with_sampling(body, options, "max_completion_tokens", "max_tokens")
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with self._preparing() as ready:
            prepared, align = await g.aligned("chat", messages, options)
            route = [prepared.route.name] if prepared.route else []
            decoding = _applied_decoding([prepared])
            checks = _checks_of_request(prepared)
            if body.get("stream"):
                chunks = self.model.stream_request(prepared, g.check_window)
                headers = g.alignment_headers(options, route, decoding, checks, align=align)
                return self._streamed(request, chunks, True, (reply_id, now, arrived), body, route, headers)
            started = time.perf_counter()
            done = await self._run_batched(request, [prepared] * n, ready)
            engine = time.perf_counter() - started
        g.count_checks(route, done)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": None, **loop_mark(c.looped)} for i, c in enumerate(done)]  # fmt: skip
        reply = {"id": reply_id, "object": "chat.completion", "created": now, "model": g.name, "choices": choices,
                 "usage": g.usage(done[0].prompt_tokens, sum(c.completion_tokens for c in done))}  # fmt: skip
        headers = g.alignment_headers(options, route, decoding, checks, align=align, engine=engine)
        return JSONResponse(reply, headers=headers)

    async def completions(self, request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        g = self.gateway
        arrived = time.perf_counter()
        _fields_supported(body, COMPLETION_FIELDS)
        n = _count_n(body)
        prompts = g.prompts_of(body)
        options = self._with_sampling(body, options, "max_tokens")
        reply_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream") and len(prompts) != 1:
            raise Refused(400, "Stream one prompt at a time from this server's in-process engine.", param="prompt")
        with self._preparing() as ready:
            prepared, align = await g.aligned("text", prompts, options)
            routes = [p.route.name for p in prepared if p.route]
            decoding = _applied_decoding(prepared)
            checks = _checks_of_request(prepared[0])
            if body.get("stream"):
                chunks = self.model.stream_request(prepared[0], g.check_window)
                headers = g.alignment_headers(options, routes, decoding, checks, align=align)
                return self._streamed(request, chunks, False, (reply_id, now, arrived), body, routes, headers)
            started = time.perf_counter()
            done = await self._run_batched(request, [p for p in prepared for _ in range(n)], ready)
            engine = time.perf_counter() - started
        g.count_checks([r for r in routes for _ in range(n)], done)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None,
                    **loop_mark(c.looped)} for i, c in enumerate(done)]  # fmt: skip
        prompt_tokens = sum(c.prompt_tokens for c in done[::n])
        reply = {"id": reply_id, "object": "text_completion", "created": now, "model": g.name, "choices": choices,
                 "usage": g.usage(prompt_tokens, sum(c.completion_tokens for c in done))}  # fmt: skip
        headers = g.alignment_headers(options, routes, decoding, checks, align=align, engine=engine)
        return JSONResponse(reply, headers=headers)

    def _streamed(self, request: Request, chunks: Any, chat: bool, reply: tuple[str, int, float], body: dict[str, Any],
                  routes: list[str], headers: dict[str, str]) -> Any:  # fmt: skip
        """The streamed response of an engine stream: its chunks timed as they go (``reply``: the reply's
        id, its creation time and when the request arrived), then its usage."""
        g = self.gateway
        reply_id, now, arrived = reply
        timed = TimedChunks(chunks, arrived, g.metrics)
        if chat:
            events = (chat_event(reply_id, now, g.name, *e) for e in chat_deltas(timed, g.counted(routes)))
        else:
            events = (completion_event(reply_id, now, g.name, *e) for e in text_pieces(timed, g.counted(routes)))
        wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        return g.streaming(request, pump_events(self._with_usage(events, chunks, chat, reply, wanted), chunks.close),
                           headers)  # fmt: skip

    def _with_usage(self, events: Iterator[str], chunks: Any, chat: bool, reply: tuple[str, int, float],
                    wanted: bool) -> Iterator[str]:  # fmt: skip
        """A stream's events, its tokens counted once it ends (the engine's count, in ``/metrics``),
        and a last event with its ``usage`` where the client asked (``stream_options.include_usage``)."""
        yield from events
        end = chunks.end
        if end is not None and end.prompt_tokens is not None and end.completion_tokens is not None:
            usage = self.gateway.usage(end.prompt_tokens, end.completion_tokens)
            if wanted:
                yield usage_event(reply[0], reply[1], self.gateway.name, chat, usage)

    def _with_sampling(self, body: dict[str, Any], options: GenerationOptions, *limit_fields: str) -> GenerationOptions:
        # The sampling values are checked where every request's are (GenerationOptions, check_decoding): a 400.
        g = self.gateway
        penalties = check_decoding({k: body[k] for k in PENALTIES if body.get(k) is not None}, "the request")
        return replace(
            options,
            best_of=g.sampled_best_of(body),
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            max_new_tokens=g.max_tokens_of(body, *limit_fields) or min(512, g.limits.max_tokens),
            stop=body.get("stop"),
            seed=body.get("seed"),
            extra=penalties,
        )

    @contextmanager
    def _preparing(self) -> Iterator[Any]:
        """Counts a request as on its way to the engine until ``ready()`` (or the end of the block)."""
        counted = [True]
        self.preparing_now += 1

        def ready() -> None:
            if counted[0]:
                counted[0] = False
                self.preparing_now -= 1

        try:
            yield ready
        finally:
            ready()

    async def _run_batched(self, request: Request, prepared: list[Any], ready: Any) -> list[Any]:
        depth = self.gateway.metrics.queue_depth
        depth.inc(len(prepared))
        try:
            queued = time.perf_counter()
            if self.continuous:  # the engine batches: the request's answers join its running batch now
                loop = asyncio.get_running_loop()
                ready()
                cancel = threading.Event()
                done = loop.run_in_executor(self.threads, self._run_now, prepared, queued, cancel)
                try:
                    return list(await self.gateway.guarded(request, done))
                finally:
                    cancel.set()  # the client left or the time is up: the engine drops what is left
            futures = [self.batcher.enqueue((p, queued)) for p in prepared]
            ready()
            return list(await self.gateway.guarded(request, asyncio.gather(*futures)))
        finally:
            depth.dec(len(prepared))

    def _run_batch(self, items: list[tuple[Any, float]]) -> list[Any]:
        """One micro-batch in one engine call (each item: an engine request and when it was queued)."""
        started = time.perf_counter()
        for _, queued in items:
            self.gateway.metrics.queue_wait.observe(started - queued)
        return self.model.run_requests([request for request, _ in items])

    def _run_now(self, prepared: list[Any], queued: float, cancel: threading.Event) -> list[Any]:
        """The answers of one request (its ``n`` of them), each a result; the first error is raised.
        Once ``cancel`` is set, the engine aborts them."""
        self.gateway.metrics.queue_wait.observe(time.perf_counter() - queued)
        with self.model.engine.cancelled_by(cancel):
            outcomes = self.model.run_requests(prepared)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes


class TimedChunks:
    """An engine stream's chunks, each one's time observed as it is taken (the time to the first from
    ``arrived``, then the time between two); its other attributes are the stream's (``looped``,
    ``filtered``, ``end``)."""

    def __init__(self, chunks: Any, arrived: float, metrics: Any):
        self._chunks, self._metrics = chunks, metrics
        self._arrived = arrived
        self._last: float | None = None

    def __iter__(self) -> TimedChunks:
        return self

    def __next__(self) -> str:
        chunk = next(self._chunks)
        now = time.perf_counter()
        if self._last is None:
            self._metrics.first_token.observe(now - self._arrived)
        else:
            self._metrics.between_tokens.observe(now - self._last)
        self._last = now
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chunks, name)


def _fields_supported(body: dict[str, Any], supported: set[str]) -> None:
    for field in body:
        if field not in supported:
            raise Refused(400, f"'{field}' is not supported by this server's in-process engine; leave it out.",
                          param=field)  # fmt: skip
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise Refused(400, "'stream_options' must be an object.", param="stream_options")


def _count_n(body: dict[str, Any]) -> int:
    n = body.get("n") or 1  # 1 to MAX_N (protocol)
    if n > 1 and body.get("stream"):
        raise Refused(400, "'n' must be 1 when streaming from this server's in-process engine.", param="n")
    return int(n)


def _checks_of_request(prepared: Any) -> list[str]:
    """The checks an engine request's answer gets."""
    return (["answer"] if prepared.check_answer else []) + (["loop"] if prepared.sampling.cut_loops else [])


def _applied_decoding(prepared: list[Any]) -> dict[str, Any]:
    """The decoding settings the engine applies to these requests (shared by all of them)."""
    sets = [{k: v for k, v in p.sampling.extra.items() if k in DECODING_SETTINGS} for p in prepared]
    return sets[0] if all(d == sets[0] for d in sets) else {}
