"""Dynamic micro-batching for the in-process engine.

Requests that arrive while the engine is busy, or within ``window`` seconds of the first one of a
batch, go to the engine together: one :meth:`~auto_model.AutoModel.run_requests` call of at most
``max_batch`` requests. A request whose client has gone (its future cancelled) before its batch
starts is left out of it; one already in the engine finishes with its batch and its answer is
dropped. An error of one request reaches that request alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from auto_model.backends.base import Completion, GenerationRequest, Outcome

RunRequests = Callable[[Sequence[GenerationRequest]], list[Outcome]]


class MicroBatcher:
    """Collects requests into batches for ``run`` (a blocking call, run in a worker thread)."""

    def __init__(self, run: RunRequests, *, window: float, max_batch: int,
                 on_batch: Callable[[int], None] | None = None):  # fmt: skip
        self.run, self.window, self.max_batch, self.on_batch = run, window, max_batch, on_batch
        self._queue: asyncio.Queue[tuple[GenerationRequest, asyncio.Future[Completion]]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, request: GenerationRequest) -> Completion:
        """The engine's completion for ``request`` (raises the request's own error)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(self._queue))
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def _serve(self, queue: asyncio.Queue[tuple[GenerationRequest, asyncio.Future[Completion]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(request, future) for request, future in batch if not future.done()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                outcomes: list[Any] = await asyncio.to_thread(self.run, [request for request, _ in live])
            except Exception as exc:  # the engine call itself failed: every request of the batch fails
                outcomes = [exc] * len(live)
            for (_, future), outcome in zip(live, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
