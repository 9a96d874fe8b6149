"""The upstream of ``auto-model serve --upstream URL``: any OpenAI-compatible server.

Requests are forwarded with ``aiohttp``'s client (measured with ``bench/server_proxy.py``: 1.65 ms
added per request besides the alignment, against 2.3 ms with ``httpx``), one attempt each: the
client's own retries decide what happens after a 429 or a 5xx, so that a proxy does not multiply
them. Upstream failures become OpenAI-style errors:

=================================  ===========================================================
upstream                           the client gets
=================================  ===========================================================
4xx / 5xx with a JSON error body   the same status and body (``Retry-After`` kept)
401 / 403                          502: the upstream refused *this server's* key, not the client's
a body that is not JSON            502 ``upstream_error``
no answer within the timeout       504 ``timeout``
unreachable                        502 ``upstream_unreachable``
=================================  ===========================================================

The upstream key is sent in ``Authorization`` and nowhere else; any upstream text that repeats it
is redacted before it reaches a client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from auto_model.errors import InvalidRequestError

REDACTED = "[redacted]"


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible server to forward to.

    Attributes:
        base_url: its ``/v1`` root, e.g. ``http://127.0.0.1:8001/v1``.
        api_key: its key (sent as ``Authorization: Bearer``), or None.
        model: the model's name there (default: the name the served model was created with).
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"The upstream must be an http(s) URL such as http://127.0.0.1:8001/v1, got "
                                      f"{self.base_url!r}.")  # fmt: skip


class UpstreamError(Exception):
    """An upstream failure, as the OpenAI-style error a client gets."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(body.get("error", {}).get("message", ""))
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, kind: str, code: str | None = None) -> UpstreamError:
    return UpstreamError(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})


class UpstreamClient:
    """Forwards requests; one per app, opened in its event loop."""

    def __init__(self, upstream: Upstream, *, timeout: float, max_connections: int):
        import aiohttp

        self.upstream = upstream
        self._aiohttp = aiohttp
        self._root = upstream.base_url.rstrip("/") + "/"
        headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
        self._http = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout),
            connector=aiohttp.TCPConnector(limit=max_connections),
            auto_decompress=True,
        )

    def redact(self, text: str) -> str:
        key = self.upstream.api_key
        return text.replace(key, REDACTED) if key else text

    async def ready(self) -> str | None:
        """None when the upstream answers ``GET /models``, else why not."""
        aiohttp = self._aiohttp
        try:
            async with self._http.get(self._root + "models", timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self.redact(f"the upstream does not answer: {type(exc).__name__}")
        if status != 200:
            return f"the upstream answered GET /models with HTTP {status}"
        return None

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The upstream's JSON answer to a non-streaming request."""
        response = await self._send(path, payload)
        try:
            raw = await response.read()
        except (self._aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._transport(exc) from None
        finally:
            response.release()
        try:
            data = json.loads(raw)
        except ValueError:
            raise _error(502, "The upstream answered with a body that is not valid JSON.", "upstream_error") from None
        if not isinstance(data, dict):
            raise _error(502, "The upstream answered with JSON that is not an object.", "upstream_error")
        return data

    async def stream(self, path: str, payload: dict[str, Any]) -> tuple[Any, AsyncIterator[str]]:
        """The upstream's streaming response (status 200) and its lines; close the response when done."""
        response = await self._send(path, payload)

        async def lines() -> AsyncIterator[str]:
            async for line in response.content:
                yield line.decode("utf-8").rstrip("\r\n")

        return response, lines()

    async def _send(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(self._root + path, json=payload)
        except (self._aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._transport(exc) from None
        if response.status == 200:
            return response
        try:
            raw = await response.read()
        except (self._aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        finally:
            response.release()
        raise self._failure(response.status, raw, response.headers)

    def _transport(self, exc: BaseException) -> UpstreamError:
        if isinstance(exc, asyncio.TimeoutError):
            return _error(504, "The upstream did not answer in time.", "timeout", "timeout")
        return _error(502, self.redact(f"The upstream is unreachable ({type(exc).__name__})."), "upstream_error",
                      "upstream_unreachable")  # fmt: skip

    def _failure(self, status: int, raw: bytes, headers: Any) -> UpstreamError:
        if status in (401, 403):
            return _error(502, f"The upstream refused this server's key (HTTP {status}); its operator must set "
                          "--upstream-api-key.", "upstream_error", "upstream_auth")  # fmt: skip
        kept = {name: headers[name] for name in ("retry-after", "retry-after-ms") if name in headers}
        try:
            body = json.loads(self.redact(raw.decode("utf-8", "replace")))
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("message"), str) and "error" not in body:
            body = {"error": {k: body.get(k) for k in ("message", "type", "param", "code")}}  # vLLM's older shape
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            text = self.redact(raw.decode("utf-8", "replace"))[:500]
            body = {"error": {"message": f"The upstream answered HTTP {status}: {text}", "type": "upstream_error",
                              "param": None, "code": None}}  # fmt: skip
        return UpstreamError(status, body, kept)

    async def close(self) -> None:
        await self._http.close()


def choice_index(choice: dict[str, Any]) -> int:
    """A choice's ``index`` (0 when it has none)."""
    return choice["index"] if isinstance(choice.get("index"), int) else 0


class _ChoiceStream:
    """Per-choice work on an upstream's streamed chunks (the loop cut, the answer check): each choice
    of a chunk goes through :meth:`_choice`; a choice in :attr:`ended` gets nothing more, and once
    all ``n`` choices have ended, :attr:`done` is set: the caller stops reading (closing the
    upstream's response stops its generation) and ends the stream."""

    def __init__(self, n: int, chat: bool):
        self.n, self.chat = n, chat
        self.ended: set[int] = set()
        self.done = False

    def _text(self, choice: dict[str, Any]) -> Any:
        holder = choice.get("delta") if self.chat else choice
        return holder.get("content" if self.chat else "text") if isinstance(holder, dict) else None

    def _set(self, choice: dict[str, Any], text: str) -> None:
        if self.chat:
            if not isinstance(choice.get("delta"), dict):
                choice["delta"] = {}
            choice["delta"]["content"] = text
        else:
            choice["text"] = text

    def _choice(self, index: int, choice: dict[str, Any]) -> None:
        raise NotImplementedError

    def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk with each choice's text as far as it can be shown; None when nothing is left of it."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return chunk  # e.g. the usage chunk
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            index = choice_index(choice)
            if index in self.ended:
                continue
            self._choice(index, choice)
            kept.append(choice)
        self.done = len(self.ended) >= self.n
        if not kept:
            return None
        chunk["choices"] = kept
        return chunk


class StreamLoopCut(_ChoiceStream):
    """Cuts the answers of an upstream's streamed chunks where they start to loop: each choice's
    text goes through a :class:`~auto_model.loops.LoopGuard`; a choice that loops gets its last
    chunk at once (``finish_reason`` ``"stop"``, ``stop_reason`` ``"loop"``) and nothing after it."""

    def __init__(self, n: int, chat: bool):
        from auto_model.loops import LoopGuard

        super().__init__(n, chat)
        self._guard = LoopGuard
        self.guards: dict[int, Any] = {}

    def _choice(self, index: int, choice: dict[str, Any]) -> None:
        guard = self.guards.setdefault(index, self._guard())
        text = self._text(choice)
        shown = guard.feed(text) if isinstance(text, str) else ""
        if choice.get("finish_reason") is not None and not guard.looped:
            shown += guard.flush()
        if isinstance(text, str):
            self._set(choice, shown)
        if guard.looped:
            self.ended.add(index)
            choice["finish_reason"], choice["stop_reason"] = "stop", "loop"


class StreamAnswerCheck(_ChoiceStream):
    """The answer check on an upstream's streamed chunks (after :class:`StreamLoopCut`): each choice's
    text is held back until the answer so far has passed the check, which runs each time ``window``
    more characters have arrived and once when the choice finishes (as
    :class:`~auto_model.answer_check.CheckedStream` does in-process). ``passes(index, text)``: whether
    the check lets choice ``index``'s answer so far through (it scores and counts). A choice that fails
    gets the refusal (after a blank line when text was already shown) and ``finish_reason``
    ``"content_filter"``, and nothing after it. A stream that ends without a choice's
    ``finish_reason`` loses that choice's unchecked tail: it is never shown unchecked."""

    def __init__(self, n: int, chat: bool, window: int, passes: Any, refusal: str):
        super().__init__(n, chat)
        self.window = window
        self._passes, self._refusal = passes, refusal
        self.seen: dict[int, str] = {}
        self.held: dict[int, str] = {}

    @property
    def blocked(self) -> set[int]:
        """The choices the check refused."""
        return self.ended

    def due(self, chunk: dict[str, Any]) -> bool:
        """Whether this chunk makes a check run (the caller then runs :meth:`chunk` off the event loop)."""
        return any(
            isinstance(choice, dict) and self._held(choice_index(choice), choice)[1]
            for choice in chunk.get("choices") or []
        )

    def _held(self, index: int, choice: dict[str, Any]) -> tuple[str, bool]:
        """The choice's text not yet shown, with this chunk's; and whether it is checked now."""
        text = self._text(choice)
        held = self.held.get(index, "") + (text if isinstance(text, str) else "")
        return held, bool(held) and (len(held) >= self.window or choice.get("finish_reason") is not None)

    def _choice(self, index: int, choice: dict[str, Any]) -> None:
        from auto_model.answer_check import CONTENT_FILTER

        text = self._text(choice)
        seen, (held, due) = self.seen.get(index, ""), self._held(index, choice)
        shown = ""
        if due:
            if (seen + held).strip() and not self._passes(index, seen + held):
                self.ended.add(index)
                self._set(choice, f"\n\n{self._refusal}" if seen else self._refusal)
                choice["finish_reason"] = CONTENT_FILTER
                return
            self.seen[index], shown, held = seen + held, held, ""
        self.held[index] = held
        if isinstance(text, str) or shown:
            self._set(choice, shown)


def asked_of(index: int, n: int, queries: list[Any], routes: list[str]) -> tuple[Any, str]:
    """What an upstream's choice ``index`` answers and its route (``n`` choices per prompt, in prompt order)."""
    prompt = index // max(n, 1)
    query = queries[min(prompt, len(queries) - 1)] if queries else None
    return query, routes[min(prompt, len(routes) - 1)] if routes else "none"


async def relay_lines(
    response: Any,
    lines: AsyncIterator[str],
    name: str,
    cut: StreamLoopCut | None = None,
    check: StreamAnswerCheck | None = None,
) -> AsyncIterator[str]:
    """An upstream's server-sent events, with the model named as the client asked for it; with
    ``cut``, each answer ended where it starts to loop; with ``check``, each answer released in
    checked windows and ended with the refusal where a check fails (the upstream's stream is closed
    once every answer was cut or refused)."""
    try:
        async for line in lines:
            if line.startswith("data: {"):
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    pass
                else:
                    if isinstance(chunk, dict):
                        if "model" in chunk:
                            chunk["model"] = name
                        if cut is not None and (chunk := cut.chunk(chunk)) is None:
                            continue
                        if check is not None:
                            if check.due(chunk):  # a check embeds the answer: off the event loop
                                chunk = await anyio.to_thread.run_sync(check.chunk, chunk)
                            else:
                                chunk = check.chunk(chunk)
                            if chunk is None:
                                continue
                        line = f"data: {json.dumps(chunk)}"
            yield line + "\n"
            if (cut is not None and cut.done) or (check is not None and check.done):
                yield "\ndata: [DONE]\n\n"
                return
    finally:
        if response.content.at_eof():
            response.release()  # the connection goes back to the pool
        else:
            response.close()  # mid-stream (the client left): the connection closes, the upstream stops generating
