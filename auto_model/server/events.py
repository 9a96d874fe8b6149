"""The pieces of an OpenAI-style reply the server streams or returns: server-sent events of chat and
completion chunks (:func:`chat_event`, :func:`completion_event`) built from an engine's stream
(:func:`chat_deltas`, :func:`text_pieces`), how an answer ended (:func:`finish_reason_of`,
:func:`loop_mark`), an upstream's answers cut where they loop (:func:`cut_choices`), and the one
pump that consumes a blocking stream in a thread of its own (:func:`pump_events`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from auto_model.answer_check import CONTENT_FILTER
from auto_model.errors import InvalidRequestError
from auto_model.loops import cut_loop


def cut_choices(data: dict[str, Any], chat: bool) -> None:
    """An upstream's answers cut where they start to loop (:func:`~auto_model.loops.cut_loop`)."""
    for choice in data.get("choices") or []:
        holder = choice.get("message") if chat and isinstance(choice, dict) else choice
        text = holder.get("content" if chat else "text") if isinstance(holder, dict) else None
        if isinstance(text, str):
            cut, looped = cut_loop(text)
            if looped:
                holder["content" if chat else "text"] = cut  # type: ignore[index]
                choice.update(finish_reason="stop", **loop_mark(True))


def loop_mark(looped: bool) -> dict[str, str]:
    """A choice's mark that its answer was cut where it started to repeat itself (vLLM's servers name
    what ended an answer ``stop_reason``; ``finish_reason`` stays ``"stop"``)."""
    return {"stop_reason": "loop"} if looped else {}


def finish_reason_of(chunks: Any) -> str:
    """How a streamed answer ended: ``content_filter`` when the answer check replaced its rest,
    ``stop`` when it was cut where it looped, else what the engine says (its stream's ``end``:
    ``length`` at ``max_tokens``), ``stop`` where it says nothing."""
    if getattr(chunks, "filtered", False):
        return CONTENT_FILTER
    end = getattr(chunks, "end", None)
    if getattr(chunks, "looped", False) or end is None or end.finish_reason is None:
        return "stop"
    return str(end.finish_reason)


def usage_event(reply_id: str, created: int, name: str, chat: bool, usage: dict[str, int]) -> str:
    """The last event of a stream whose client asked for ``stream_options.include_usage``: no
    choices, the usage of the whole answer (as OpenAI's API and vLLM's server send it)."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    chunk = {"id": reply_id, "object": kind, "created": created, "model": name, "choices": [], "usage": usage}
    return f"data: {json.dumps(chunk)}\n\n"


def chat_deltas(chunks: Any, ended: Any = None) -> Iterator[tuple[dict[str, Any], str | None, dict[str, str]]]:
    yield {"role": "assistant", "content": ""}, None, {}
    for text in chunks:
        if text:
            yield {"content": text}, None, {}
    if ended is not None:
        ended(chunks)
    yield {}, finish_reason_of(chunks), loop_mark(chunks.looped)


def text_pieces(chunks: Any, ended: Any = None) -> Iterator[tuple[str, str | None, dict[str, str]]]:
    for text in chunks:
        if text:
            yield text, None, {}
    if ended is not None:
        ended(chunks)
    yield "", finish_reason_of(chunks), loop_mark(chunks.looped)


def chat_event(
    reply_id: str, created: int, name: str, delta: dict[str, Any], finish: str | None, extra: dict[str, str]
) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
    chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n"


def completion_event(
    reply_id: str, created: int, name: str, text: str, finish: str | None, extra: dict[str, str]
) -> str:
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, **extra}
    chunk = {"id": reply_id, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n"


async def pump_events(events: Iterator[str], close: Any) -> AsyncIterator[str]:
    """A blocking event iterator (over an engine's stream) consumed by a thread of its own. When the
    consumer stops (the client disconnected), the thread stops at the next chunk and calls ``close``
    (the engine stream's), which stops the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server stopped)
            stop.set()

    def pump() -> None:
        try:
            for event in events:
                if stop.is_set():
                    break
                put(event)
        except BaseException as exc:  # reaches the client as an error event
            put(exc)
        finally:
            close()
            put(done)

    threading.Thread(target=pump, name="auto-model-serve-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                kind = "invalid_request_error" if isinstance(item, InvalidRequestError) else "server_error"
                error = {"error": {"message": str(item), "type": kind, "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                return
            yield item
        yield "data: [DONE]\n\n"
    finally:
        stop.set()


__all__ = [
    "chat_deltas",
    "chat_event",
    "completion_event",
    "cut_choices",
    "finish_reason_of",
    "loop_mark",
    "pump_events",
    "text_pieces",
]
