"""One engine over a backend: choosing and starting it, one batch at a time, one streaming pump, and
the reward that picks the best of several sampled answers.

:func:`choose_backend` resolves which backend serves a model and checks the model's name (fast:
nothing loads); :func:`start_backend` starts it (slow: weights, a server connection, replicas).
:class:`Engine` runs requests on it: local engines take one batch at a time (threads and
coroutines take :class:`Turns` on it, first come first served), and :meth:`Engine.chunks` is the one
streaming pump, a worker thread that has the engine's turn while the engine generates, never while
the caller holds a chunk, and lets the requests that wait go first between two chunks.
:func:`answer_chunks` and :func:`clean_outcome` turn what an engine wrote into the answer the SDK
returns (markers stripped, loops cut).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Generator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from auto_model.backends import get_backend_class, has_gpu, resolve_backend_name
from auto_model.backends.base import (
    DECODING_SETTINGS,
    Backend,
    Completion,
    CompletionCallback,
    GenerationRequest,
    Outcome,
    StreamEnd,
)
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError
from auto_model.loops import CutStream, cut_loop
from auto_model.prompting import START, strip_markers
from auto_model.resolve import resolve_model
from auto_model.results import Candidate, GenerationResult
from auto_model.rewards.best_of import BestOf

logger = logging.getLogger(__name__)


def base_urls(base_url: str | Sequence[str] | None) -> list[str]:
    """The server URLs of ``base_url``: one, several (a list, or comma-separated), or none."""
    if base_url is None:
        return []
    parts = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    if not all(isinstance(u, str) for u in parts):
        raise InvalidRequestError(f"base_url must be a URL or a list of URLs, got {base_url!r}.")
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise InvalidRequestError(f"base_url holds no URL: {base_url!r}.")
    return urls


@dataclass(frozen=True)
class BackendChoice:
    """Which backend serves a model, checked before anything loads (:func:`choose_backend`)."""

    name: str
    cls: type[Backend]
    source: Any  # the resolved local model (None for a served one)
    urls: tuple[str, ...]


def choose_backend(
    model_name: str,
    backend: str = "auto",
    base_url: str | Sequence[str] | None = None,
    open_ai_model: bool = False,
    replicas: int = 1,
) -> BackendChoice:
    """The backend for ``model_name`` (``backend="auto"`` picks by the name and ``base_url``); a
    local model's name (and ``replicas``) is checked here, so a wrong one fails in about a second."""
    if not is_whole(replicas, 1):
        raise InvalidRequestError(f"replicas must be an integer >= 1, got {replicas!r}.")
    urls = base_urls(base_url)
    name = resolve_backend_name(backend, model_name, open_ai_model=open_ai_model, base_url=urls[0] if urls else None)
    cls = get_backend_class(name)
    return BackendChoice(name, cls, None if cls.remote else resolve_model(model_name), tuple(urls))


def start_backend(
    choice: BackendChoice,
    model_name: str,
    *,
    num_gpus: int = 1,
    cuda_visible_devices: str | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    timeout: float = 600,
    prompt_format: str = "auto",
    api_key: str | None = None,
    replicas: int = 1,
    ray_address: str | None = None,
    **engine_kwargs: Any,
) -> Backend:
    """Start the chosen backend: a served model (one URL, or one replica per URL), or a local engine
    (one, or ``replicas`` of it on Ray)."""
    urls = list(choice.urls)
    if choice.cls.remote:
        local = {
            "num_gpus": (num_gpus, 1),
            "cuda_visible_devices": (cuda_visible_devices, None),
            "dtype": (dtype, "auto"),
            "gpu_memory_utilization": (gpu_memory_utilization, 0.9),
            "max_model_len": (max_model_len, None),
        }
        ignored = {k: v for k, (v, default) in local.items() if v != default}
        if ignored:
            logger.debug("%s is served remotely: local engine arguments %s are ignored", model_name, ignored)
        if replicas > 1 and len(urls) != replicas:
            raise InvalidRequestError(
                f"replicas={replicas} of a served model need {replicas} base URLs, one per server "
                f"(got {len(urls)}); pass base_url=[url1, url2, ...]."
            )
        if ray_address is not None:
            raise InvalidRequestError("ray_address is for local engines; a served model's replicas are its URLs.")
        remote_options = {"api_key": api_key, "timeout": timeout, "prompt_format": prompt_format, **engine_kwargs}
        if len(urls) > 1:
            from auto_model.backends.replicas import server_replicas

            return server_replicas(model_name, urls, **remote_options)
        return choice.cls(model_name, base_url=urls[0] if urls else None, **remote_options)
    if timeout != 600:
        logger.debug("timeout=%s is unused by the local %s engine", timeout, choice.name)
    if urls or api_key is not None:
        raise InvalidRequestError(
            f"base_url/api_key are for the openai backend, but backend={choice.name!r}; "
            "use backend='openai' (or 'auto') to talk to a server."
        )
    local_options = {
        "dtype": dtype,
        "num_gpus": num_gpus,
        "cuda_visible_devices": cuda_visible_devices,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "prompt_format": prompt_format,
        **engine_kwargs,
    }
    if replicas > 1 or ray_address is not None:
        from auto_model.backends.replicas import ray_replicas

        cpus = local_options.pop("cpus_per_replica", 1)
        gpus = num_gpus if has_gpu() else 0
        return ray_replicas(choice.name, model_name, replicas, ray_address=ray_address, cpus_per_replica=cpus,
                            gpus_per_replica=gpus, **local_options)  # fmt: skip
    return choice.cls(choice.source, **local_options)


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class Turns:
    """A lock taken in the order it was asked for, whose holder may let those waiting go first.

    A local engine runs one batch at a time; a stream generates a chunk at a time. Between two chunks
    the stream :meth:`passes <pass_turn>`: the batches and streams that asked before it then run (one
    turn each), and it goes on after them. So a long stream never holds the engine for its whole
    answer, and two streams take turns chunk by chunk."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._holder: int | None = None  # the thread that has the turn

    def __enter__(self) -> Turns:
        with self._changed:
            self._wait_turn()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            if self._holder == threading.get_ident():  # (not where a pass_turn was interrupted)
                self._holder = None
                self._changed.notify_all()

    @property
    def waiting(self) -> int:
        """How many are waiting for a turn."""
        return len(self._queue)

    def pass_turn(self) -> None:
        """Let everyone waiting now go first, then take the turn back (at once when no one waits).
        Call it only while holding the turn."""
        with self._changed:
            if self._queue:
                self._holder = None
                self._changed.notify_all()
                self._wait_turn()

    def _wait_turn(self) -> None:  # with self._changed held
        me = object()
        self._queue.append(me)
        try:
            while self._holder is not None or self._queue[0] is not me:
                self._changed.wait()
        except BaseException:  # interrupted while waiting: leave the queue, let the next one in
            self._queue.remove(me)
            self._changed.notify_all()
            raise
        self._queue.popleft()
        self._holder = threading.get_ident()
        self._changed.notify_all()


class Engine:
    """A started backend, the :class:`Turns` its batches and streams take (none for a thread-safe
    backend), and the reward that picks the best of several sampled answers (:attr:`best_of`)."""

    def __init__(self, backend: Backend, best_of: BestOf | None = None, name: str | None = None):
        """``best_of``: the reward that picks the best of several samples (default: none);
        ``name``: the backend's name as chosen (:attr:`BackendChoice.name`; default the backend's own)."""
        self.backend = backend
        self.name = name or backend.name
        self.best_of = best_of or BestOf()
        self._turns: Turns | None = None if backend.thread_safe else Turns()

    @property
    def continuous_batching(self) -> bool:
        """Whether each request joins the running batch as it comes (vLLM's asynchronous engine): the
        caller sends requests one by one, side by side, instead of gathering batches."""
        return bool(self.backend.continuous_batching)

    @property
    def running(self) -> int | None:
        """Requests in the engine now, where the engine counts them (None elsewhere)."""
        count = getattr(self.backend, "running", None)
        return count if isinstance(count, int) else None

    def cancelled_by(self, event: threading.Event) -> Any:
        """A block whose requests (sent from this thread) the engine aborts once ``event`` is set, where
        it can abort them (vLLM's asynchronous engine); elsewhere they run to the end."""
        cancellable = getattr(self.backend, "cancelled_by", None)
        return cancellable(event) if callable(cancellable) else nullcontext()

    def run(self, requests: list[GenerationRequest], callback: CompletionCallback | None = None) -> list[Outcome]:
        """The engine's outcome of each request (one batch; ``callback`` as each one finishes)."""
        with self._turns or nullcontext():
            return self.backend.generate(requests, on_completion=callback)

    def answers(
        self,
        requests: Sequence[GenerationRequest],
        check: Callable[[list[GenerationRequest], list[Outcome]], list[Outcome]],
        on_completion: CompletionCallback | None = None,
    ) -> list[Outcome]:
        """Run prepared requests in one batch; each one's answer as the SDK returns it: cleaned
        (:func:`clean_outcome`), the best of several samples by :attr:`best_of` (every sample of the
        batch scored in one call) and passed through ``check`` (the answer check:
        ``check(requests, outcomes)`` gives the outcomes to return). ``on_completion(index, outcome)``
        as each finishes; for a batch with samples, once the batch is scored."""
        requests = list(requests)
        sampled = any(r.sampling.n > 1 for r in requests)
        self.best_of.check(max((r.sampling.n for r in requests), default=1))
        cuts = [r.sampling.cut_loops for r in requests]
        finished: dict[int, Outcome] = {}  # answers cleaned and checked as they came

        def callback(i: int, outcome: Outcome) -> None:
            finished[i] = check([requests[i]], [clean_outcome(outcome, cuts[i])])[0]
            on_completion(i, finished[i])  # type: ignore[misc]

        raw = self.run(requests, None if on_completion is None or sampled else callback)
        outcomes = [clean_outcome(c, cut) for c, cut in zip(raw, cuts, strict=True)]
        if sampled:
            outcomes = self.best_of.rerank([r.query or "" for r in requests], outcomes)
        rest = [i for i in range(len(requests)) if i not in finished]
        for i, outcome in zip(rest, check([requests[i] for i in rest], [outcomes[i] for i in rest]), strict=True):
            outcomes[i] = finished[i] = outcome
        if sampled and on_completion is not None:
            for i, outcome in enumerate(outcomes):
                on_completion(i, outcome)
        return [finished[i] for i in range(len(requests))]

    def stream(self, request: GenerationRequest) -> CutStream:
        """One request's answer in text chunks (:meth:`chunks`) as the SDK streams it: without the
        leading white space and ``<START>`` marker, ended where it starts to loop with the request's
        ``cut_loops``; closing it stops the generation. Once it is over, its ``end`` (a
        :class:`~auto_model.backends.base.StreamEnd`) says how the engine ended the answer."""
        end = StreamEnd()
        return CutStream(answer_chunks(self.chunks(request, end)), request.sampling.cut_loops, end=end)

    def result(self, completion: Completion, request: GenerationRequest) -> GenerationResult:
        """A finished request's :class:`~auto_model.results.GenerationResult`."""
        route = request.route
        scores = completion.scores or [None] * len(completion.samples)
        return GenerationResult(
            completion.text,
            completion.finish_reason,
            completion.prompt_tokens,
            completion.completion_tokens,
            self.name,
            self.backend.model_id,
            completion.latency_s,
            route.name if route else None,
            route.score if route else None,
            tuple(Candidate(s.text, v, s.finish_reason) for s, v in zip(completion.samples, scores, strict=True)),
            completion.looped,
            {k: v for k, v in request.sampling.extra.items() if k in DECODING_SETTINGS},
            completion.answer_score,
        )

    def chunks(self, request: GenerationRequest, end: StreamEnd | None = None) -> Generator[str, None, None]:
        """The engine's stream, produced by a worker thread that has the engine's turn while the
        engine generates, never while the caller holds a chunk: a caller that stops reading does not
        keep other requests waiting, and one that closes the stream stops the generation. Between two
        chunks, the requests waiting for the engine go first (:meth:`Turns.pass_turn`; the engine's
        stream makes no text while it waits), so a long answer shares the engine with the others.
        ``end`` is filled in by the engine as the stream ends. (An engine that batches continuously
        is thread-safe: it takes no turns, and its streams run side by side.)"""
        chunks: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                with self._turns or nullcontext():
                    engine = self.backend.stream(request, end)
                    try:
                        for chunk in engine:
                            chunks.put(chunk)
                            if stop.is_set():
                                break
                            if self._turns is not None:
                                self._turns.pass_turn()
                    finally:
                        close = getattr(engine, "close", None)
                        if callable(close):
                            close()  # the engine's own clean-up: it stops generating
            except BaseException as exc:  # surfaced in the caller's thread
                chunks.put(_Failure(exc))
            finally:
                chunks.put(done)

        worker = threading.Thread(target=produce, name="auto-model-stream", daemon=True)
        worker.start()
        try:
            while (item := chunks.get()) is not done:
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()

    def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica of a replicated backend: what it answered and whether it is still there (empty
        for a single engine)."""
        stats = getattr(self.backend, "stats", None)
        return stats() if callable(stats) else []

    def close(self) -> None:
        """Release the engine."""
        self.backend.close()


def answer_chunks(chunks: Generator[str, None, None]) -> Generator[str, None, None]:
    """``chunks`` without the answer's leading white space and ``<START>`` marker (as
    :func:`~auto_model.prompting.strip_markers` does); closing it closes ``chunks``."""
    head, marker_checked, started = "", False, False
    try:
        for chunk in chunks:
            if started:
                yield chunk
                continue
            head = (head + chunk).lstrip()
            if not marker_checked:
                if len(head) < len(START) and START.startswith(head):
                    continue  # could still become the marker
                if head.startswith(START):
                    head = head[len(START) :].lstrip()
                marker_checked = True
            if head:
                started = True
                yield head
        if not started and head:
            yield head
    finally:
        chunks.close()


def clean_outcome(outcome: Outcome, cut_loops: bool) -> Outcome:
    """An engine's completion as the SDK returns it: the ICL markers stripped and, with
    ``cut_loops``, each answer cut where it starts to loop (:func:`~auto_model.loops.cut_loop`)."""
    if isinstance(outcome, BaseException):
        return outcome

    def clean(completion: Completion) -> Completion:
        text = strip_markers(completion.text)
        if cut_loops:
            cut, looped = cut_loop(text)
            if looped:
                return replace(completion, text=cut, finish_reason="stop", looped=True)
        return replace(completion, text=text)

    return replace(clean(outcome), samples=tuple(clean(s) for s in outcome.samples))


__all__ = [
    "BackendChoice",
    "Engine",
    "Turns",
    "answer_chunks",
    "base_urls",
    "choose_backend",
    "clean_outcome",
    "start_backend",
]
