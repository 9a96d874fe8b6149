"""Everything a request gets before it reaches an engine: the :class:`Aligner`.

An aligner holds a model's prompt artifact (its prompt per route, routing, decoding settings and
answer check), the example pool and its retriever, and the router over them. It turns queries or
conversations plus :class:`~auto_model.options.GenerationOptions` into engine requests: each
request's route, its system prompt and examples, the prompt assembled in the format the engine
takes (:func:`~auto_model.prompting.assemble`, the one prompt builder), its sampling with the
artifact's decoding settings, and whether its answer is checked. After generation it checks the
answers (:meth:`Aligner.check`). It reads from the engine only what formatting needs: the prompt
style, the tokenizer and the decoding settings the engine has.

:class:`~auto_model.model.AutoModel` is an aligner and an :class:`~auto_model.engine.Engine`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from auto_model import constants
from auto_model.answer_check import AnswerCheck, CheckedStream, check_completions
from auto_model.artifacts import PromptArtifact, prompt_for_model, with_decoding
from auto_model.backends.base import Backend, GenerationRequest, Outcome, PromptTarget
from auto_model.conversations import SYSTEM_MESSAGE_MODES, earlier_user_turns, parse_conversation
from auto_model.errors import InvalidRequestError
from auto_model.loops import CutStream
from auto_model.options import GenerationOptions, parse_queries
from auto_model.prompting import PROMPT_FORMATS, AssembledPrompt, Message, assemble
from auto_model.retrieval import ICLExample, ICLRetriever, load_icl_pool
from auto_model.router import RoutedRetriever
from auto_model.routing import EVERYDAY, ROUTES, Route, RoutingSettings, conversation_text

logger = logging.getLogger(__name__)


def _check_options(options: Any) -> GenerationOptions:
    if not isinstance(options, GenerationOptions):
        raise InvalidRequestError(f"options must be a GenerationOptions, got {type(options).__name__}.")
    return options


class Aligner:
    """A model's alignment: its artifact, its pool and retriever, its router, and the requests they make.

    Args:
        artifact: the prompt artifact requests are aligned with.
        pool: the example pool (the packaged one, which the artifact edits, or your own).
        backend: the engine the requests are for (its prompt style, tokenizer and decoding settings),
            or a :class:`~auto_model.backends.base.PromptTarget` saying the same of an engine this
            process does not run (a served model); None until it has started (set :attr:`backend`).
        own_pool: ``pool`` is your own: it is used as it is, not edited by the artifact.
        embedding_model: the sentence-transformers model of retrieval and routing.
    """

    def __init__(
        self,
        artifact: PromptArtifact,
        pool: Sequence[ICLExample],
        backend: Backend | PromptTarget | None = None,
        *,
        own_pool: bool = False,
        embedding_model: str,
    ):
        #: the engine the requests are for; may be set once it has started (the artifact and the pool
        #: are checked first, so that a bad file fails before a slow engine load)
        self.backend: Any = backend
        self.embedding_model = embedding_model
        self._base_pool = list(pool)
        self._own_pool = own_pool
        self._artifact = artifact
        self.icl_pool: list[ICLExample] = self._edited_pool(artifact)
        self._retriever: ICLRetriever | None = None
        self._router: RoutedRetriever | None = None
        self._answer_check: tuple[PromptArtifact | None, AnswerCheck | None] = (None, None)
        self._lock = threading.Lock()  # concurrent first calls build one retriever
        self._left_out: set[str] = set()  # artifact decoding settings this engine lacks, logged once

    @classmethod
    def for_model(
        cls,
        model_name: str,
        prompt_path: str | os.PathLike[str] | None = None,
        icl_path: str | os.PathLike[str] | None = None,
        embedding_model: str | None = None,
        backend: Backend | PromptTarget | None = None,
    ) -> Aligner:
        """The aligner of ``model_name``: its packaged artifact (or ``prompt_path``), the packaged pool
        with the artifact's edits (or your own ``icl_path``, used as it is) and the embedder of
        retrieval and routing (default all-MiniLM-L6-v2). Files are read and checked here, before
        any engine loads."""
        return cls(
            prompt_for_model(model_name, prompt_path),
            load_icl_pool(icl_path),
            backend,
            own_pool=icl_path is not None,
            embedding_model=embedding_model or constants.default_embedding_model(),
        )

    # -- what is injected --------------------------------------------------------------------

    @property
    def retriever(self) -> ICLRetriever:
        """The ICL retriever over the pool (built on first use, once, also under concurrent calls)."""
        if self._retriever is None:
            with self._lock:
                if self._retriever is None:
                    self._retriever = ICLRetriever(self.icl_pool, self.embedding_model)
        return self._retriever

    @retriever.setter
    def retriever(self, retriever: ICLRetriever) -> None:
        if not isinstance(retriever, ICLRetriever):
            raise InvalidRequestError(f"retriever must be an ICLRetriever, got {type(retriever).__name__}.")
        with self._lock:
            self._retriever = retriever
            self._router = None
            self.icl_pool = self._base_pool = list(retriever.pool)

    @property
    def prompt_artifact(self) -> PromptArtifact:
        return self._artifact

    @prompt_artifact.setter
    def prompt_artifact(self, artifact: PromptArtifact) -> None:
        if not isinstance(artifact, PromptArtifact):
            raise InvalidRequestError(f"prompt_artifact must be a PromptArtifact, got {type(artifact).__name__}.")
        with self._lock:
            edited = self._edited_pool(artifact)
            if edited != self.icl_pool:  # the artifact's pool differs: its examples are retrieved from now on
                self.icl_pool, self._retriever = edited, None
            self._artifact = artifact
            self._router = None

    def _edited_pool(self, artifact: PromptArtifact) -> list[ICLExample]:
        """The pool requests retrieve from: the packaged pool with the artifact's edits, or your own."""
        return list(self._base_pool) if self._own_pool else artifact.edit_pool(self._base_pool)

    @property
    def router(self) -> RoutedRetriever:
        """Routes requests and retrieves their examples, over :attr:`retriever`, with the routing
        settings of the prompt artifact."""
        retriever = self.retriever
        with self._lock:
            if self._router is None or self._router.retriever is not retriever:
                settings = self.prompt_artifact.routing
                self._router = RoutedRetriever(retriever, RoutingSettings.from_dict(settings) if settings else None)
            return self._router

    @property
    def prompt_format(self) -> str:
        """The assembly format the engine takes: ``"base"``, ``"chat"`` or ``"messages"``."""
        if self.backend.prompt_style != "chat":
            return "base"
        return "messages" if self.backend.supports_chat else "chat"

    def system_prompt(
        self, user_specified_system_prompt: str | None = None, optimized_prompt: bool = True
    ) -> str | None:
        """The system prompt a request gets: the user's if given, else the optimized one if enabled."""
        if user_specified_system_prompt is not None:
            if not isinstance(user_specified_system_prompt, str):
                raise InvalidRequestError("user_specified_system_prompt must be a string or None.")
            if optimized_prompt:
                logger.debug("A user-specified system prompt replaces the optimized prompt")
            return user_specified_system_prompt
        return self.prompt_artifact.system_prompt if optimized_prompt else None

    def examples_for(self, route: str | None, options: GenerationOptions | None = None) -> int:
        """How many examples a request down ``route`` gets with these options: none without
        ``optimized_icl``, else ``num_optimized_icl``, else the artifact's number for the route."""
        options = options or GenerationOptions()
        if not options.optimized_icl:
            return 0
        if options.num_optimized_icl is not None:
            return options.num_optimized_icl
        return self.prompt_artifact.examples_for(route)

    def decoding_for(self, route: str | None = None) -> dict[str, Any]:
        """The artifact's decoding settings for ``route`` that the engine applies."""
        return with_decoding({}, self.prompt_artifact.decoding_for(route), self.backend.decoding_settings)[0]

    # -- prompts and requests ----------------------------------------------------------------

    def prompts(
        self,
        queries: list[str],
        options: GenerationOptions,
        conversations: list[list[Message]] | None = None,
        *,
        fmt: Any = None,
        systems: Sequence[str | None] | None = None,
        suffixes: Sequence[str | None] | None = None,
    ) -> list[AssembledPrompt]:
        """The prompts of ``queries`` (or of ``conversations``, whose last user turns they are): each
        query's route and examples, in one batch. ``systems``: a conversation's own system text, which
        replaces the optimized prompt; ``suffixes``: text put after the system prompt."""
        if fmt is not None and fmt not in PROMPT_FORMATS:
            raise InvalidRequestError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}.")
        options.check_pool(len(self.icl_pool))  # before anything is embedded
        k = {route: self.examples_for(route, options) for route in ROUTES}
        systems = systems or [None] * len(queries)
        suffixes = suffixes or [None] * len(queries)
        own_prompt = [s is not None or options.user_specified_system_prompt is not None for s in systems]
        routed_prompt = options.optimized_prompt and not all(own_prompt) and bool(self.prompt_artifact.routes)
        earlier = None if conversations is None else [earlier_user_turns(c) for c in conversations]
        if any(k.values()) or routed_prompt:  # the route picks the examples, or the prompt
            routes, examples = self.router.search(queries, k, options.route, earlier=earlier)
        else:
            routes, examples = [Route(options.route or EVERYDAY) for _ in queries], [[] for _ in queries]
        fmt = fmt or self.prompt_format  # servers take messages; local engines get them rendered with the template
        turns: list[Any] = queries if conversations is None else conversations
        tokenizer = self.backend.tokenizer
        prompts = []
        for i, (query, turn, ex, route, own, suffix) in enumerate(
            zip(queries, turns, examples, routes, systems, suffixes, strict=True)
        ):
            if own is not None:
                system: str | None = own
            elif options.user_specified_system_prompt is not None or not options.optimized_prompt:
                system = self.system_prompt(options.user_specified_system_prompt, options.optimized_prompt)
            else:
                system = self.prompt_artifact.prompt_for(route.name)
            if suffix:
                system = f"{system.rstrip()}\n\n{suffix}" if system and system.strip() else suffix
            prompt = assemble(system, ex, turn, format=fmt, tokenizer=tokenizer)
            # What the answer check (and a reranker) reads the answer beside: every user turn.
            prompts.append(replace(prompt, route=route, query=conversation_text(query, earlier[i] if earlier else ())))
        return prompts

    def chat_prompts(
        self, conversations: Sequence[Any], options: GenerationOptions, system_messages: str = "replace"
    ) -> list[AssembledPrompt]:
        """The prompts of conversations (each validated; ``system_messages``: what a system message
        does, one of :data:`~auto_model.conversations.SYSTEM_MESSAGE_MODES`), routed in one batch."""
        if system_messages not in SYSTEM_MESSAGE_MODES:
            raise InvalidRequestError(
                f"system_messages must be one of {', '.join(SYSTEM_MESSAGE_MODES)}, got {system_messages!r}."
            )
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InvalidRequestError("conversations must be a non-empty list of message lists.")
        parsed = [parse_conversation(m, open_format=self.prompt_format == "messages") for m in conversations]
        own = [system if system_messages == "replace" else None for system, _, _ in parsed]
        if options.user_specified_system_prompt is not None and any(s is not None for s in own):
            raise InvalidRequestError(
                "Pass the system prompt either as a system message or as user_specified_system_prompt, not both."
            )
        return self.prompts(
            [last for _, _, last in parsed],
            options,
            [turns for _, turns, _ in parsed],
            systems=own,
            suffixes=[system if system_messages == "prepend" else None for system, _, _ in parsed],
        )

    def request(self, prompt: AssembledPrompt, options: GenerationOptions) -> GenerationRequest:
        """The engine request of an assembled prompt: its sampling (with the artifact's decoding
        settings for its route, where ``optimized_decoding``), its stop strings, and whether its
        answer is checked."""
        sampling = options.sampling()
        if options.optimized_decoding:
            settings = self.prompt_artifact.decoding_for(prompt.route.name if prompt.route else options.route)
            extra, left_out = with_decoding(sampling.extra, settings, self.backend.decoding_settings)
            for name in set(left_out) - self._left_out:  # said once per setting
                self._left_out.add(name)
                logger.debug("The %s engine has no %s: the artifact's setting is left out", self.backend.name, name)
            sampling = replace(sampling, extra=extra)
        stop = tuple(dict.fromkeys(sampling.stop + prompt.stop))
        check = options.check_answers and self.answer_check is not None and options.json_schema is None
        return GenerationRequest(prompt.prompt, replace(sampling, stop=stop), route=prompt.route, query=prompt.query,
                                 check_answer=check)  # fmt: skip

    def requests(self, queries: str | Sequence[str], options: GenerationOptions) -> list[GenerationRequest]:
        """The engine requests of a query or a list of queries (each checked), routed and assembled in
        one batch; each request's route is on ``request.route``."""
        options = _check_options(options)
        return [self.request(p, options) for p in self.prompts(parse_queries(queries)[1], options)]

    def chat_requests(
        self, conversations: Sequence[Sequence[Message]], options: GenerationOptions, system_messages: str = "replace"
    ) -> list[GenerationRequest]:
        """The engine requests of conversations, routed and assembled in one batch."""
        options = _check_options(options)
        return [self.request(p, options) for p in self.chat_prompts(conversations, options, system_messages)]

    def build_request(
        self,
        system_prompt: str | None,
        examples: Sequence[ICLExample],
        query: str | Sequence[Message],
        options: GenerationOptions,
    ) -> GenerationRequest:
        """One engine request with the given system prompt and examples (no lookup, no retrieval:
        the prompt and example fields of ``options`` are not read, its sampling fields are)."""
        options = _check_options(options)
        prompt = assemble(system_prompt, examples, query, format=self.prompt_format, tokenizer=self.backend.tokenizer)  # type: ignore[arg-type]
        if not isinstance(query, str):
            last = parse_conversation(query, open_format=True)[2]  # validated before its turns are read
            query = conversation_text(last, earlier_user_turns(query))
        return self.request(replace(prompt, query=query), options)

    # -- the answer check --------------------------------------------------------------------

    @property
    def answer_check(self) -> AnswerCheck | None:
        """The artifact's answer check (:mod:`auto_model.answer_check`), or None where it has none
        or its classifier was trained on another embedding model than the retriever's."""
        artifact = self.prompt_artifact
        if self._answer_check[0] is not artifact:
            found = AnswerCheck.from_dict(artifact.answer_check) if artifact.answer_check else None
            if found is not None and not found.fits(self.embedding_model):
                logger.warning("The artifact's answer check was trained on other embeddings than %s: answers are not "
                               "checked", self.embedding_model)  # fmt: skip
                found = None
            self._answer_check = (artifact, found)
        return self._answer_check[1]

    def answer_scores(self, answers: Sequence[str], queries: Sequence[str | None] | None = None) -> list[float]:
        """The answer check's score of each answer, read beside the request it answers (``queries``:
        one per answer); InvalidRequestError where the artifact has no answer check."""
        check = self.answer_check
        if check is None:
            raise InvalidRequestError(
                "This model's prompt artifact has no answer check (see auto-model-train answer-check)."
            )
        return check.scores(list(answers), self.retriever.embed, queries)

    def check(self, requests: Sequence[GenerationRequest], outcomes: list[Outcome]) -> list[Outcome]:
        """The outcomes with each checked answer scored, and replaced by the refusal where the check blocks it."""
        check = self.answer_check
        if check is None or not any(r.check_answer for r in requests):
            return outcomes
        routes = [r.route.name if r.route else None for r in requests]
        return check_completions(check, outcomes, [r.query for r in requests], [r.check_answer for r in requests],
                                 self.retriever.embed, routes)  # fmt: skip

    def check_stream(
        self, chunks: CutStream, request: GenerationRequest, window: int | None = None
    ) -> CutStream | CheckedStream:
        """A streamed answer (an engine's :meth:`~auto_model.engine.Engine.stream`) released only
        once checked, every ``window`` characters (default: the artifact's), where the request's
        answer is checked; else ``chunks`` as they are."""
        check = self.answer_check if request.check_answer else None
        if check is None:
            return chunks
        route = request.route.name if request.route else None
        return CheckedStream(chunks, check, lambda text: self.answer_scores([text], [request.query])[0], window, route)


__all__ = ["Aligner"]
