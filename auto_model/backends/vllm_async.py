"""vLLM's asynchronous engine (``vllm.v1.engine.async_llm.AsyncLLM``): continuous batching and
token-by-token streaming, in this process's API.

What vLLM's own OpenAI server runs on: a request joins the running batch at the engine's next step
(none waits for a batch to finish), each stream yields text as its tokens are made, and a request
whose stream is closed is aborted in the engine at once. The engine's steps run in vLLM's engine
process; this backend keeps an event loop of its own in a thread, so every caller — threads,
coroutines, the server — submits to the same running batch. It is thread-safe: the SDK takes no
lock around it.

Prompts, sampling parameters, the loop cut and every check are those of :class:`VLLMBackend`. The
offline ``vllm`` backend stays the faster one for batch jobs (``generate`` on a list, the trainer,
the evaluation), which hand the engine all their requests at once.

vLLM starts its engine process with ``spawn`` here, which imports the calling script again: a
script that starts this backend at import time needs an ``if __name__ == "__main__":`` guard (the
``auto-model`` commands have one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from auto_model.backends.base import (
    Completion,
    CompletionCallback,
    GenerationRequest,
    Outcome,
    StopCutter,
    StreamEnd,
)
from auto_model.backends.vllm import VLLMBackend, scoped_environment
from auto_model.errors import EngineOutageError, GenerationError, InvalidRequestError
from auto_model.logs import drop_records, engine_log_level, tame_vllm_logging, user_configured_vllm_logging

logger = logging.getLogger(__name__)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class AsyncVLLMBackend(VLLMBackend):
    """Local generation with vLLM's asynchronous engine (continuous batching, token streaming).

    Takes the arguments of :class:`~auto_model.backends.vllm.VLLMBackend`. On a CPU the engine runs
    in vLLM's engine process (as under vLLM's own server), not in this one, and computes there
    itself rather than in a worker process of its own (see ``_cpu_engine_arguments``).
    """

    name = "vllm-async"
    thread_safe = True
    continuous_batching = True
    #: AsyncLLM always runs its engine in a process of its own; on a CPU the model runs there too
    cpu_engine_place = "in its engine process, which computes itself (no worker process)"

    def _start_engine(self) -> int:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(self.engine_args)
        variables = {}
        quiet_engine = not user_configured_vllm_logging() and "logging_config" in args
        if quiet_engine:
            # The engine process logs its errors to stderr, and its notes and warnings only at a lower
            # engine level: they are the start-up notes this process's vLLM logger drops, which cannot be
            # filtered there. (vLLM configures both processes' logging from one setting; this process's
            # is set back to the SDK's once the engine has started.)
            from vllm.config.logging import LoggingConfig

            level = engine_log_level()
            name = logging.getLevelName(logging.ERROR if level >= logging.WARNING else level)
            args["logging_config"] = LoggingConfig(log_level=cast(Any, name), configure_logging=True)
            variables = {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "PYTHONWARNINGS": "ignore::FutureWarning"}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="auto-model-vllm-async", daemon=True)
        self._thread.start()

        async def start() -> Any:
            with scoped_environment(variables):  # read by the engine process as it starts
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

        try:
            self.llm = self._submit(start()).result()
        except BaseException:
            self._stop_loop()
            raise
        finally:
            if quiet_engine:
                tame_vllm_logging()
        self.running = 0  # requests in the engine now (submitted, not finished)
        self._local = threading.local()  # per calling thread: the event that cancels its requests
        return int(self.llm.vllm_config.model_config.max_model_len)

    @contextmanager
    def cancelled_by(self, event: threading.Event) -> Iterator[None]:
        """The requests this thread sends in the block are aborted in the engine once ``event`` is set
        (a server's client has left); each one still running then fails with a :class:`GenerationError`."""
        previous = getattr(self._local, "event", None)
        self._local.event = event
        try:
            yield
        finally:
            self._local.event = previous

    def _run_loop(self) -> None:
        # vLLM asks for prompts it has rendered itself; ours are the SDK's, tokenized as the offline engine's are.
        with drop_records("vllm", "Passing raw prompts to InputProcessor is deprecated"):
            self._loop.run_forever()

    def _submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _params(self, param: Any, kind: str) -> Any:
        from vllm.sampling_params import RequestOutputKind

        param.output_kind = RequestOutputKind[kind]
        return param

    async def _outputs(self, prompt: dict[str, Any], params: Any) -> Any:
        """The engine's outputs of one request, as they come; closing the iteration aborts it."""
        self.running += 1
        try:
            async for output in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                yield output
        finally:
            self.running -= 1

    async def _final(self, prompt: dict[str, Any], params: Any, request: GenerationRequest) -> Completion:
        started, last = time.perf_counter(), None
        async for output in self._outputs(prompt, params):
            last = output
        if last is None or any(o.finish_reason == "abort" for o in last.outputs):
            raise GenerationError("vLLM aborted the request before it finished.")
        return self._completion(last, request.sampling, time.perf_counter() - started)

    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        """Each request joins the engine's running batch at once; ``on_completion`` as each finishes."""
        results: list[Outcome | None] = [None] * len(requests)
        running: dict[concurrent.futures.Future[Any], int] = {}
        for i, req in enumerate(requests):
            try:
                prompt, param = self._prepare(i, req)
            except InvalidRequestError as exc:  # this request alone is bad; the others still run
                results[i] = exc
                if on_completion is not None:
                    on_completion(i, exc)
                continue
            running[self._submit(self._final(prompt, self._params(param, "FINAL_ONLY"), req))] = i
        cancel: threading.Event | None = getattr(self._local, "event", None)
        pending = set(running)
        try:
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=None if cancel is None else 0.05, return_when=concurrent.futures.FIRST_COMPLETED
                )
                finished: list[tuple[int, concurrent.futures.Future[Any] | None]] = [(running[f], f) for f in done]
                if cancel is not None and cancel.is_set():
                    finished += [(running[future], None) for future in pending]
                    pending = set()
                for i, future in sorted(finished, key=lambda pair: pair[0]):
                    try:
                        if future is None:
                            raise GenerationError("its client left; it was aborted in the engine.")
                        results[i] = future.result()
                    except GenerationError as exc:
                        results[i] = GenerationError(f"Request {i}: {exc}")
                    except Exception as exc:
                        raise self._outage(exc) from exc
                    if on_completion is not None:
                        on_completion(i, results[i])  # type: ignore[arg-type]
        finally:
            for future in running:
                future.cancel()  # cancelled, or an error above: the others are aborted in the engine
        return results  # type: ignore[return-value]

    def stream(self, request: GenerationRequest, end: StreamEnd | None = None) -> Iterator[str]:
        """Yield text as the engine makes it; closing the stream aborts the request in the engine."""
        prompt, param = self._prepare(0, request)
        params = self._params(param, "DELTA")
        chunks: queue.Queue[Any] = queue.Queue()
        done = object()

        async def run() -> None:
            made = 0
            try:
                async for output in self._outputs(prompt, params):
                    sample = output.outputs[0]
                    made += len(sample.token_ids)
                    if sample.text:
                        chunks.put(sample.text)
                    if output.finished and end is not None:
                        reason = sample.finish_reason
                        end.finish_reason = "length" if reason == "length" else "stop"
                        end.prompt_tokens = len(output.prompt_token_ids or ())
                        end.completion_tokens = made
                    if sample.finish_reason == "abort":
                        raise GenerationError("vLLM aborted the request before it finished.")
            except BaseException as exc:  # surfaced in the caller's thread
                chunks.put(_Failure(exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                chunks.put(done)

        future = self._submit(run())
        cutter = StopCutter(request.sampling.stop)
        try:
            while (item := chunks.get()) is not done:
                if isinstance(item, _Failure):
                    if isinstance(item.error, GenerationError | asyncio.CancelledError):
                        raise GenerationError(str(item.error) or "The stream was cancelled.") from item.error
                    raise self._outage(item.error) from item.error
                out = cutter.feed(item)
                if out:
                    yield out
                if cutter.stopped:
                    if end is not None:
                        end.finish_reason = "stop"
                    return
            tail = cutter.flush()
            if tail:
                yield tail
        finally:
            future.cancel()  # a caller that stops reading aborts the request in the engine

    @staticmethod
    def _outage(exc: BaseException) -> EngineOutageError:
        return EngineOutageError(
            f"The vLLM engine failed ({type(exc).__name__}: {exc}). Restart the engine (a new AutoModel) "
            "and send the requests again."
        )

    def _stop_loop(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            llm.shutdown()
        self._stop_loop()


__all__ = ["AsyncVLLMBackend"]
