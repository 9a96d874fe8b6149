"""Upstream mode of ``auto-model serve``: each aligned request is forwarded to an OpenAI-compatible
server (:mod:`auto_model.server.upstream`), and what comes back is reranked (``best_of``), cut where
it loops, and checked (the answer check) before the client gets it.

The fields of an allow-list (:data:`~auto_model.server.protocol.FORWARDED`; ``forward_fields`` adds
more) pass through unchanged, both ways; the model's name is mapped (served name to upstream name
and back). ``/v1/completions`` prompts are aligned as queries in the ``base`` text format, whose
stop strings are added to the request's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from auto_model.answer_check import CONTENT_FILTER
from auto_model.backends.base import DECODING_SETTINGS, Completion
from auto_model.options import GenerationOptions
from auto_model.prompting import BASE_STOP
from auto_model.rewards.base import best_index
from auto_model.server.events import cut_choices
from auto_model.server.gateway import Gateway
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


class ForwardingMode:
    """The endpoints answered by ``upstream``, aligned by ``gateway``; the upstream is asked for
    ``upstream_model`` (default: the model's name)."""

    def __init__(self, gateway: Gateway, upstream: Upstream):
        self.gateway = gateway
        self.model = gateway.model
        self.upstream = upstream
        self.upstream_model = upstream.model or gateway.model.model_name
        self._client: UpstreamClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._health: tuple[float, str | None] = (float("-inf"), None)

    async def start(self) -> None:
        """Opens the connection pool (on the app's event loop)."""
        limits = self.gateway.limits
        self._client = UpstreamClient(self.upstream, timeout=limits.request_timeout,
                                      max_connections=limits.max_concurrency)  # fmt: skip
        self._slots = asyncio.Semaphore(limits.max_concurrency)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> UpstreamClient:
        assert self._client is not None, "started by the app's lifespan"
        return self._client

    async def health(self) -> str | None:
        """What is wrong with the upstream (None: it answers); asked at most once every :data:`HEALTH_TTL`
        seconds, however often ``/health`` is called."""
        checked, problem = self._health
        if time.monotonic() - checked > HEALTH_TTL:
            problem = await self.client.ready()
            self._health = (time.monotonic(), problem)
        return problem

    async def chat(self, request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        g = self.gateway
        messages = body["messages"]  # a non-empty list (protocol)
        prompt, align = await g.aligned("chat", messages, options)
        payload = {k: v for k, v in body.items() if k != "auto_model"}
        payload.update(model=self.upstream_model, messages=prompt.prompt)
        self._cap(payload, "max_completion_tokens", "max_tokens")
        route = [prompt.route.name] if prompt.route else []
        options = replace(options, best_of=g.sampled_best_of(body))
        return await self._forward(request, "chat/completions", payload, options, route, align, [prompt.query])

    async def completions(self, request: Request, body: dict[str, Any], options: GenerationOptions) -> Any:
        g = self.gateway
        prompts = g.prompts_of(body)
        assembled, align = await g.aligned("text", prompts, options)
        payload = {k: v for k, v in body.items() if k != "auto_model"}
        texts = [a.prompt for a in assembled]
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        payload.update(model=self.upstream_model, prompt=texts[0] if isinstance(body["prompt"], str) else texts,
                       stop=list(dict.fromkeys([*stop, *BASE_STOP])))  # fmt: skip
        self._cap(payload, "max_tokens")
        routes = [a.route.name for a in assembled if a.route]
        options = replace(options, best_of=g.sampled_best_of(body))
        queries = [a.query for a in assembled]
        return await self._forward(request, "completions", payload, options, routes, align, queries)

    async def _forward(self, request: Request, path: str, payload: dict[str, Any], options: GenerationOptions,
                       routes: list[str], align: float, queries: list[Any]) -> Any:  # fmt: skip
        """Send ``payload`` upstream (with the artifact's decoding settings for ``routes`` under the
        client's own; for ``best_of``, asking for that many choices per answer and keeping the best of
        each group by the reward); ``queries``: what each prompt asks. With ``cut_loops``, answers are
        cut where they start to loop."""
        g = self.gateway
        n = payload.get("n") or 1
        chat = path == "chat/completions"
        if options.optimized_decoding:
            for key, value in self.model.aligner.decoding_for(routes[0] if len(set(routes)) == 1 else None).items():
                if payload.get(key) is None:
                    payload[key] = value
        decoding = {k: payload[k] for k in DECODING_SETTINGS if payload.get(k) is not None}
        if options.best_of > 1:
            payload = {**payload, "n": n * options.best_of}
        depth = g.metrics.queue_depth
        depth.inc()
        waiting = True
        try:
            assert self._slots is not None  # started by the app's lifespan
            async with self._slots:
                depth.dec()
                waiting = False
                started = time.perf_counter()
                if payload.get("stream"):
                    response, lines = await g.guarded(request, self.client.stream(path, payload))
                    took = time.perf_counter() - started
                    headers = g.alignment_headers(options, routes, decoding, align=align, upstream=took)
                    answers = n * (len(queries) if not chat else 1)
                    cut = StreamLoopCut(answers, chat) if options.cut_loops else None
                    check = self._stream_check(options, chat, n, answers, routes, queries)
                    return g.streaming(request, relay_lines(response, lines, g.name, cut, check), headers)
                data = await g.guarded(request, self.client.post(path, payload))
                took = time.perf_counter() - started
                headers = g.alignment_headers(options, routes, decoding, align=align, upstream=took)
        finally:
            if waiting:
                depth.dec()
        if "model" in data:
            data["model"] = g.name
        if options.best_of > 1:
            data["choices"] = await anyio.to_thread.run_sync(self._best_choices, data, queries, n, options.best_of,
                                                             chat)  # fmt: skip
        if options.cut_loops:
            cut_choices(data, chat)
        if "answer" in g.checks_of(options):
            await anyio.to_thread.run_sync(self._check_choices, data, chat, routes, n, queries)
        counts = data.get("usage")
        if isinstance(counts, dict) and isinstance(counts.get("prompt_tokens"), int):
            g.metrics.count_tokens(counts["prompt_tokens"], int(counts.get("completion_tokens") or 0))
        return JSONResponse(data, headers=headers)

    def _best_choices(self, data: dict[str, Any], queries: list[Any], n: int, k: int, chat: bool) -> list[Any]:
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
        best = self.model.best_of.rerank([queries[g // n] or "" for g in range(len(groups))], sampled)
        picks = [best_index(chosen.scores) for chosen in best]
        return [{**group[pick], "index": g} for g, (group, pick) in enumerate(zip(groups, picks, strict=True))]

    def _check_choices(self, data: dict[str, Any], chat: bool, routes: list[str], n: int, queries: list[Any]) -> None:
        """An upstream's answers checked (:meth:`~auto_model.aligner.Aligner.answer_scores`); each one the check
        blocks is replaced by its refusal, ``finish_reason`` ``content_filter``."""
        metrics = self.gateway.metrics
        check = self.model.aligner.answer_check
        holders: list[tuple[dict[str, Any], dict[str, Any], str]] = []
        for choice in data.get("choices") or []:
            holder = choice.get("message") if chat and isinstance(choice, dict) else choice
            text = holder.get("content" if chat else "text") if isinstance(holder, dict) else None
            if isinstance(choice, dict) and isinstance(holder, dict) and isinstance(text, str) and text.strip():
                holders.append((choice, holder, text))
        if check is None or not holders:
            return
        asked = [asked_of(choice_index(c), n, queries, routes) for c, _, _ in holders]
        scores = self.model.aligner.answer_scores([text for _, _, text in holders], [query for query, _ in asked])
        for (choice, holder, text), score, (_, route) in zip(holders, scores, asked, strict=True):
            metrics.checks_run.labels(route).inc()
            if check.replaces(text, score, route):
                holder["content" if chat else "text"] = check.refusal
                choice["finish_reason"] = CONTENT_FILTER
                metrics.replaced.labels(route).inc()

    def _stream_check(self, options: GenerationOptions, chat: bool, n: int, answers: int, routes: list[str],
                      queries: list[Any]) -> StreamAnswerCheck | None:  # fmt: skip
        """The answer check of an upstream's stream, in windows (``check_window``, or the artifact's),
        counted per answer by route; None when the request's answers are not checked."""
        g = self.gateway
        check = self.model.aligner.answer_check
        if check is None or "answer" not in g.checks_of(options):
            return None
        counted: set[int] = set()

        def passes(index: int, text: str) -> bool:
            query, route = asked_of(index, n, queries, routes)
            if index not in counted:
                counted.add(index)
                g.metrics.checks_run.labels(route).inc()
            score = self.model.aligner.answer_scores([text], [query])[0]
            if check.replaces(text, score, route):
                g.metrics.replaced.labels(route).inc()
                return False
            return True

        window = check.window if g.check_window is None else g.check_window
        return StreamAnswerCheck(answers, chat, window, passes, check.refusal)

    def _cap(self, payload: dict[str, Any], *fields: str) -> None:
        given = [f for f in fields if payload.get(f) is not None]
        for f in given:
            payload[f] = self.gateway.max_tokens_of(payload, f)
        if not given:
            payload["max_tokens"] = self.gateway.limits.max_tokens
