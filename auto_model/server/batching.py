"""Dynamic micro-batching: the in-process engine's requests, and the alignment of an upstream's.

Items that arrive while the worker is busy, or within ``window`` seconds of the first one of a
batch, are handled together: one call of ``run`` on at most ``max_batch`` items, in a worker
thread (for the engine: one :meth:`~auto_model.AutoModel.run_requests` call). An item whose client
has gone (its future cancelled) before its batch starts is left out of it; one already running
finishes with its batch and its result is dropped. ``run`` returns one outcome per item, a result
or an exception, and an exception reaches its own item alone. Where ``expecting`` counts items on
their way (the server's requests still being aligned), a batch waits for them past its window,
for at most :data:`EXPECTED_WAIT` seconds more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

Run = Callable[[list[Any]], list[Any]]
#: The longest a batch waits, past its window, for items that ``expecting`` says are on their way.
EXPECTED_WAIT = 0.1


class MicroBatcher:
    """Collects items into batches for ``run`` (a blocking call, run in ``executor``: by default
    asyncio's own worker threads)."""

    def __init__(self, run: Run, *, window: float, max_batch: int, on_batch: Callable[[int], None] | None = None,
                 executor: Executor | None = None, expecting: Callable[[], int] | None = None):  # fmt: skip
        self.run, self.window, self.max_batch, self.on_batch = run, window, max_batch, on_batch
        self.executor, self.expecting = executor, expecting
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, item: Any) -> asyncio.Future[Any]:
        """Queue ``item`` now; the future gets its outcome (cancel it to withdraw the item)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve(self._queue))
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put_nowait((item, future))
        return future

    async def submit(self, item: Any) -> Any:
        """``item``'s outcome (raises the item's own error)."""
        return await self.enqueue(item)

    async def _serve(self, queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            started = loop.time()
            deadline = started + self.window
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                if loop.time() >= deadline and self.expecting is not None and self.expecting() > 0:
                    # Items on their way (being prepared): wait for them a little longer.
                    deadline = min(loop.time() + 0.005, started + self.window + EXPECTED_WAIT)
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    continue  # the window is over: take the batch, unless items are on their way
            live = [(item, future) for item, future in batch if not future.done()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                items = [item for item, _ in live]
                outcomes: list[Any] = await loop.run_in_executor(self.executor, self.run, items)
            except Exception as exc:  # the call itself failed: every item of the batch fails
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
