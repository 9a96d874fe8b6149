"""The OpenAI engine: the OpenAI API or any OpenAI-compatible server (vLLM, llama.cpp, hosted providers).

Chat models get ``chat.completions`` with the SDK's messages (system prompt, example turns, query);
base models on compatible servers get ``completions`` with the SDK's base-format text. A batch is
sent with up to ``max_concurrency`` requests in flight and returned in input order. Answers are
requested with the client's own ``post`` (its retries, timeouts and errors) and read from the JSON
directly: the typed ``create`` spends about twice the CPU per request on validating its arguments
and building response models, which a burst of concurrent requests pays one after another (the
interpreter lock). Streams use ``create``. Retries (408,
409, 429, 5xx, timeouts and dropped connections, with exponential backoff and ``Retry-After``) are
the ``openai`` client's own, with ``max_retries``; a 200 whose body cannot be read (truncated JSON)
is retried here with the same budget. What still fails becomes a typed error in that request's
slot; the other requests of the batch are unaffected.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from auto_model.backends.base import (
    Backend,
    Completion,
    CompletionCallback,
    FinishReason,
    GenerationRequest,
    Outcome,
    PromptTarget,
    SamplingParams,
    StopCutter,
    StreamEnd,
    check_one_sample,
    choose_prompt_style,
    cut_at_stop,
)
from auto_model.constants import is_whole
from auto_model.errors import (
    AuthenticationError,
    EngineConnectionError,
    EngineHTTPError,
    EngineTimeoutError,
    GenerationError,
    InvalidRequestError,
    MalformedResponseError,
    MissingDependencyError,
)

logger = logging.getLogger(__name__)

#: The OpenAI API accepts at most this many stop sequences; the rest are applied locally.
MAX_STOP_SEQUENCES = 4
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise MissingDependencyError("openai", "openai", purpose="for the openai backend") from exc
    return openai


#: the decoding settings OpenAI's own API takes (other servers take repetition_penalty too)
_OPENAI_DECODING = frozenset({"frequency_penalty", "presence_penalty"})


def _is_loopback(url: str | None) -> bool:
    return bool(url) and (urlparse(url).hostname or "") in _LOOPBACK


def server_target(model_name: str, base_url: str | None, prompt_format: str = "auto") -> PromptTarget:
    """How prompts are assembled for ``model_name`` served at ``base_url`` (None: the OpenAI API):
    chat messages, unless ``prompt_format`` is ``"base"`` (or ``"auto"`` picks it for a packaged base
    model); the decoding settings it takes."""
    from auto_model.resolve import find_packaged

    packaged = find_packaged(model_name)
    style = choose_prompt_style(prompt_format, True, packaged.chat if packaged else None, model_name)
    # OpenAI's API takes its own two penalties; compatible servers (vLLM, SGLang, TGI) also repetition_penalty.
    official = (urlparse(base_url).hostname or "").endswith("openai.com") if base_url else True
    decoding = _OPENAI_DECODING if official else _OPENAI_DECODING | {"repetition_penalty"}
    return PromptTarget(OpenAIBackend.name, style, OpenAIBackend.supports_chat, decoding)


class OpenAIBackend(Backend):
    """Generation through the official ``openai`` client.

    Args:
        model_name: the model as the server names it (``gpt-4o-mini``, or a vLLM ``--served-model-name``).
        base_url: the server, e.g. ``http://127.0.0.1:8000/v1`` (default: ``OPENAI_BASE_URL``, else OpenAI).
        api_key: the key (default: ``OPENAI_API_KEY``). A server on this machine (127.0.0.1,
            localhost) needs none; any other server without a key is an error naming ``OPENAI_API_KEY``.
        timeout: seconds to wait for each attempt of a request.
        max_retries: retries per request on 408/409/429/5xx, timeouts, dropped connections and
            unreadable responses, with exponential backoff (the client honours ``Retry-After``).
        max_concurrency: requests in flight at once (across concurrent ``generate`` calls too).
        prompt_format: ``"chat"`` (``chat.completions``), ``"base"`` (``completions``, for base models
            on compatible servers) or ``"auto"`` (chat, unless the model is a known base model).
        **client_kwargs: passed to ``openai.OpenAI`` unchanged (``organization``, ``default_headers``, ...).
    """

    name = "openai"
    remote = True
    thread_safe = True
    supports_chat = True
    supports_json_schema = True  # as ``response_format``: OpenAI, vLLM and most compatible servers

    def __init__(
        self,
        model_name: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600,
        max_retries: int = 2,
        max_concurrency: int = 16,
        prompt_format: str = "auto",
        **client_kwargs: Any,
    ):
        openai = _import_openai()
        self._openai = openai
        if not isinstance(model_name, str) or not model_name.strip():
            raise InvalidRequestError("model_name must be the model's name on the server, e.g. 'gpt-4o-mini'.")
        if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidRequestError(f"timeout must be a number of seconds > 0, got {timeout!r}.")
        if not is_whole(max_retries, 0):
            raise InvalidRequestError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        if (
            not isinstance(max_concurrency, numbers.Integral)
            or isinstance(max_concurrency, bool)
            or max_concurrency < 1
        ):
            raise InvalidRequestError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}.")
        self.model_id = model_name.strip()
        self.base_url: str | None = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if key is None:
            if not _is_loopback(self.base_url):
                where = self.base_url or "the OpenAI API"
                raise AuthenticationError(
                    f"No API key for {where}: set OPENAI_API_KEY or pass api_key=... "
                    "(a server on 127.0.0.1 or localhost needs none)."
                )
            key = "EMPTY"  # local servers started without --api-key accept any value
        self.timeout: float = float(timeout)
        self.max_retries: int = int(max_retries)
        self.max_concurrency: int = int(max_concurrency)
        self._pool: ThreadPoolExecutor | None = None  # started on the first batch, kept for the next
        self._pool_lock: threading.Lock = threading.Lock()
        self.client: Any = openai.OpenAI(
            api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries, **client_kwargs
        )
        target = server_target(self.model_id, self.base_url, prompt_format)
        self.prompt_style, self.tokenizer, self.decoding_settings = target.prompt_style, None, target.decoding_settings

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model_id={self.model_id!r}, base_url={self.base_url!r})"

    # -- one request --------------------------------------------------------------------------

    def _arguments(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        sampling = request.sampling
        check_one_sample(sampling.extra)
        args: dict[str, Any] = {
            "model": self.model_id,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.stop:
            args["stop"] = list(sampling.stop[:MAX_STOP_SEQUENCES])
        if sampling.seed is not None:
            args["seed"] = sampling.seed
        if sampling.n > 1:
            args["n"] = sampling.n
        if sampling.json_schema is not None:
            args["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": sampling.json_schema},
            }
        extra = dict(sampling.extra)
        if "max_completion_tokens" in extra:  # newer OpenAI models take this name instead
            args.pop("max_tokens")
        args.update(extra)
        if isinstance(request.prompt, str):
            return "completions", {**args, "prompt": request.prompt}
        return "chat", {**args, "messages": request.prompt}

    def _call(self, kind: str, args: dict[str, Any]) -> Any:
        """The response: parsed JSON (a dict), or for ``stream=True`` the client's event stream."""
        openai = self._openai
        try:
            if args.get("stream"):
                endpoint = self.client.chat.completions if kind == "chat" else self.client.completions
                # The typed method takes only its own parameters; the rest (a server's extensions,
                # response_format on the completions endpoint) goes into the body unchanged.
                known = inspect.signature(endpoint.create).parameters
                extra = {k: v for k, v in args.items() if k not in known}
                return endpoint.create(**{k: v for k, v in args.items() if k in known}, extra_body=extra or None)
            path = "/chat/completions" if kind == "chat" else "/completions"
            return self.client.post(path, body=args, cast_to=object)
        except openai.AuthenticationError as exc:
            raise AuthenticationError(
                f"{_capital(self._where())} rejected the API key (HTTP 401); check OPENAI_API_KEY or api_key.",
                status_code=401,
            ) from exc
        except openai.APITimeoutError as exc:
            raise EngineTimeoutError(
                f"{_capital(self._where())} did not answer within timeout={self.timeout:g}s "
                f"(after {self.max_retries} retries); raise timeout or max_retries."
            ) from exc
        except openai.APIConnectionError as exc:
            raise EngineConnectionError(
                f"Could not reach {self._where()} (after {self.max_retries} retries): {exc}. Is the server running?"
            ) from exc
        except openai.APIStatusError as exc:
            retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            note = f" after {self.max_retries} retries" if retried else ""
            raise EngineHTTPError(
                f"{_capital(self._where())} answered HTTP {exc.status_code}{note}: {_short(exc.message)}",
                status_code=exc.status_code,
            ) from exc
        except ValueError as exc:  # a 200 whose body is not valid JSON (json.JSONDecodeError)
            raise MalformedResponseError(
                f"{_capital(self._where())} sent a response that is not valid JSON: {exc}"
            ) from exc

    def _where(self) -> str:  # in the middle of a sentence; _capital() starts one
        return f"the server at {self.base_url}" if self.base_url else "the OpenAI API"

    def _one(self, request: GenerationRequest) -> Completion:
        kind, args = self._arguments(request)
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            try:
                response = self._call(kind, args)
                return self._completion(response, kind, request.sampling, time.perf_counter() - t0)
            except MalformedResponseError:
                if attempt == self.max_retries:
                    raise
                logger.debug("Unreadable response; retrying (%d/%d)", attempt + 1, self.max_retries)
                time.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    def _completion(self, response: Any, kind: str, sampling: SamplingParams, latency: float) -> Completion:
        try:
            choices = sorted(response["choices"], key=lambda c: c.get("index") or 0)[: sampling.n]
            if len(choices) < sampling.n:
                raise IndexError(f"{len(choices)} choices for n={sampling.n}")
            usage = response.get("usage") or {}
            read = []
            for choice in choices:
                text = (choice["message"].get("content") if kind == "chat" else choice.get("text")) or ""
                if not isinstance(text, str) or not isinstance(usage, dict):
                    raise TypeError("unexpected field types")
                read.append((text, choice.get("finish_reason")))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise MalformedResponseError(
                f"{_capital(self._where())} sent a response without choices[0] "
                f"({type(response).__name__}): {_short(str(response))}"
            ) from exc
        prompt_tokens = usage.get("prompt_tokens") or 0
        completion_tokens = usage.get("completion_tokens") or 0
        samples: list[Completion] = []
        for text, reason in read:
            text, cut = cut_at_stop(text, sampling.stop)
            finish: FinishReason = (
                "length"
                if reason == "length" and not cut
                else "content_filter"
                if reason == "content_filter"
                else "stop"
            )
            # A server reports one token total for all n answers: the first sample carries it.
            samples.append(Completion(text, finish, prompt_tokens, completion_tokens if not samples else 0, latency))
        if len(samples) == 1:
            return samples[0]
        return replace(samples[0], samples=tuple(samples))

    # -- batches and streams ------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)
        lock = threading.Lock()

        def run(i: int) -> None:
            try:
                outcome: Outcome = self._one(requests[i])
            except (GenerationError, InvalidRequestError) as exc:
                outcome = exc
            except Exception as exc:  # anything else from the client: typed, never lost
                outcome = GenerationError(f"Request {i} failed: {type(exc).__name__}: {exc}")
                outcome.__cause__ = exc
            results[i] = outcome
            if on_completion is not None:
                with lock:  # callbacks run one at a time, in completion order
                    on_completion(i, outcome)

        if len(requests) == 1:
            run(0)
        else:
            list(self._executor().map(run, range(len(requests))))
        return results  # type: ignore[return-value]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="auto-model-openai"
                )
            return self._pool

    def stream(self, request: GenerationRequest, end: StreamEnd | None = None) -> Iterator[str]:
        kind, args = self._arguments(request)
        stream = self._call(kind, {**args, "stream": True})
        cutter = StopCutter(request.sampling.stop)
        try:
            for chunk in stream:
                usage = getattr(chunk, "usage", None)
                if end is not None and usage is not None:  # sent by servers that count a stream's tokens
                    end.prompt_tokens = getattr(usage, "prompt_tokens", None)
                    end.completion_tokens = getattr(usage, "completion_tokens", None)
                if not getattr(chunk, "choices", None):
                    continue
                choice = chunk.choices[0]
                if end is not None and getattr(choice, "finish_reason", None) in ("stop", "length"):
                    end.finish_reason = choice.finish_reason
                piece = (choice.delta.content if kind == "chat" else choice.text) or ""
                out = cutter.feed(piece)
                if out:
                    yield out
                if cutter.stopped:
                    break
        except GenerationError:
            raise
        except Exception as exc:  # the connection or the event stream broke mid-answer
            raise EngineConnectionError(
                f"The stream from {self._where()} broke off: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()
        tail = cutter.flush()
        if tail:
            yield tail
        if end is not None and cutter.stopped:
            end.finish_reason = "stop"  # ended at one of the request's stop strings

    def close(self) -> None:
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True)
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def _short(text: Any, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
