"""What a request asks for, validated before anything is loaded or sent.

:class:`GenerationOptions` holds the per-request arguments of :meth:`AutoModel.generate` (the seed's
names) and checks them when it is built; :func:`parse_queries` checks the queries. Both are pure and
need no engine, so a command line checks its whole request with them before it loads a model, and
:meth:`AutoModel.generate` runs the very same checks.

    >>> options = GenerationOptions(temperature=0, max_new_tokens=64, num_optimized_icl=2)
    >>> options.sampling().temperature
    0.0
    >>> GenerationOptions(top_p=0)
    Traceback (most recent call last):
    ...
    auto_model.errors.InvalidRequestError: top_p must be in (0, 1], got 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from auto_model.backends.base import SEED_RANGE, SamplingParams, check_one_sample
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError
from auto_model.routing import check_route

#: the most answers :attr:`GenerationOptions.best_of` may sample per query
MAX_BEST_OF = 64


@dataclass(frozen=True)
class GenerationOptions:
    """The per-request arguments of :meth:`AutoModel.generate`, checked when built.

    Attributes:
        user_specified_system_prompt: your own system prompt; it replaces the optimized one.
        optimized_prompt: inject the model's optimized system prompt.
        optimized_icl: inject in-context examples retrieved from the pool.
        num_optimized_icl: how many examples (0 to the pool size; see :meth:`check_pool`); None: as
            many as the model's artifact gives the request's route (3 where it does not say).
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass, in (0, 1].
        max_new_tokens: most tokens to generate per answer.
        stop: extra stop string(s).
        seed: for reproducible sampling.
        json_schema: constrain the answer to JSON matching this JSON Schema (vllm and openai backends).
        route: ``"everyday"`` or ``"safety"`` to choose the request's prompt and examples yourself;
            None routes it by its embedding (see :mod:`auto_model.routing`).
        extra: other sampling arguments, passed to the engine unchanged (``top_k``, ``min_tokens``, ...).
        best_of: sample this many answers per query in the same engine call and return the one the
            model's reward model scores highest (1 to :data:`MAX_BEST_OF`; needs temperature > 0
            and ``AutoModel(reward_model=...)``).
        optimized_decoding: apply the decoding settings of the model's artifact (its route's
            ``decoding``: e.g. a frequency penalty); sampling arguments in ``extra`` win over them.
        cut_loops: cut an answer where it starts to repeat itself (:mod:`auto_model.loops`); the
            engine stops generating there where it can watch the answer grow. Not for answers
            constrained to a ``json_schema`` (cutting would break their structure).
        check_answers: check each answer with the artifact's answer check
            (:mod:`auto_model.answer_check`) where it has one: an answer that complies with a
            harmful request is replaced by a refusal, ``finish_reason`` ``"content_filter"``.
    """

    user_specified_system_prompt: str | None = None
    optimized_prompt: bool = True
    optimized_icl: bool = True
    num_optimized_icl: int | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    route: str | None = None
    best_of: int = 1
    optimized_decoding: bool = True
    cut_loops: bool = True
    check_answers: bool = True

    def __post_init__(self) -> None:
        if self.user_specified_system_prompt is not None and not isinstance(self.user_specified_system_prompt, str):
            raise InvalidRequestError("user_specified_system_prompt must be a string or None.")
        for name in ("optimized_prompt", "optimized_icl", "optimized_decoding", "cut_loops", "check_answers"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        k = self.num_optimized_icl
        if k is not None and not is_whole(k, 0):
            raise InvalidRequestError(f"num_optimized_icl must be an integer >= 0 or None, got {k!r}.")
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}.")
        p = self.top_p
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 < p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {p!r}.")
        n = self.max_new_tokens
        if not is_whole(n, 1):
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {n!r}.")
        stop = self.stop
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop))
        ):
            raise InvalidRequestError(f"stop must be a string or a list of non-empty strings, got {stop!r}.")
        if self.seed is not None and (
            not isinstance(self.seed, numbers.Integral)
            or isinstance(self.seed, bool)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise InvalidRequestError(f"seed must be a 64-bit signed integer (-2**63 to 2**63 - 1), got {self.seed!r}.")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise InvalidRequestError(f"json_schema must be a JSON Schema dict, got {type(self.json_schema).__name__}.")
        if not isinstance(self.extra, Mapping):
            raise InvalidRequestError(
                f"extra must be a mapping of sampling arguments, got {type(self.extra).__name__}."
            )
        check_one_sample(self.extra)
        check_route(self.route)
        b = self.best_of
        if not is_whole(b, 1, MAX_BEST_OF):
            raise InvalidRequestError(f"best_of must be an integer from 1 to {MAX_BEST_OF}, got {b!r}.")
        if b > 1 and self.temperature == 0:
            raise InvalidRequestError(
                f"best_of={b} samples {b} answers to choose from: give temperature > 0 (greedy answers would all "
                "be the same)."
            )

    @classmethod
    def from_arguments(cls, *, sampling_kwargs: Mapping[str, Any] | None = None, **arguments: Any) -> GenerationOptions:
        """Options from :meth:`AutoModel.generate`'s arguments: ``seed``, ``json_schema``, ``route``,
        ``best_of``, ``optimized_decoding``, ``cut_loops`` and ``check_answers`` are taken out of ``sampling_kwargs``,
        the rest of them go to the engine unchanged."""
        extra = dict(sampling_kwargs or {})
        own = {name: extra.pop(name) for name in _OWN_KEYWORDS if name in extra}
        return cls(**arguments, **own, extra=extra)

    def check_pool(self, pool_size: int) -> None:
        """Raise :class:`InvalidRequestError` unless the pool has ``num_optimized_icl`` examples to give."""
        if self.optimized_icl and self.num_optimized_icl is not None and self.num_optimized_icl > pool_size:
            raise InvalidRequestError(
                f"num_optimized_icl must be an integer from 0 to {pool_size} (the ICL pool size), "
                f"got {self.num_optimized_icl!r}."
            )

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters for these options."""
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            float(self.temperature),
            float(self.top_p),
            int(self.max_new_tokens),
            stops,
            None if self.seed is None else int(self.seed),
            dict(self.extra),
            self.json_schema,
            int(self.best_of),
            self.cut_loops and self.json_schema is None,  # a cut would break the JSON's structure
        )


#: keyword arguments of generate() that are options of the SDK, not the engine's sampling arguments
_OWN_KEYWORDS = ("seed", "json_schema", "route", "best_of", "optimized_decoding", "cut_loops", "check_answers")


def parse_queries(user_query: Any) -> tuple[bool, list[str]]:
    """``(single, queries)`` for a query or a list of queries; :class:`InvalidRequestError` for an
    empty list, a non-string or a blank query (naming which)."""
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


#: The per-request arguments of :meth:`AutoModel.generate`, ``stream`` and ``chat``, in the seed's order.
ARGUMENT_NAMES = ("user_specified_system_prompt", "optimized_prompt", "optimized_icl", "num_optimized_icl",
                  "temperature", "top_p", "max_new_tokens", "stop")  # fmt: skip
_DEFAULTS = GenerationOptions()


def call_options(
    options: GenerationOptions | None,
    prompt_arguments: tuple[Any, ...],
    sampling_arguments: tuple[Any, ...] = (),
    sampling_kwargs: dict[str, Any] | None = None,
) -> GenerationOptions:
    """A call's options: ``options`` as given, or built from the seed's individual arguments (in
    the seed's order, :data:`ARGUMENT_NAMES`: the prompt ones, then the sampling ones). Both at
    once is refused unless the individual ones are all left at their defaults."""
    arguments = dict(zip(ARGUMENT_NAMES, (*prompt_arguments, *sampling_arguments), strict=False))
    if options is None:
        return GenerationOptions.from_arguments(**arguments, sampling_kwargs=sampling_kwargs)
    if not isinstance(options, GenerationOptions):
        raise InvalidRequestError(f"options must be a GenerationOptions, got {type(options).__name__}.")
    given = [name for name, value in arguments.items() if value != getattr(_DEFAULTS, name)]
    given += list(sampling_kwargs or ())
    if given:
        raise InvalidRequestError(
            f"Pass either options= or {', '.join(given)}, not both: set them in the options "
            f"(dataclasses.replace(options, {given[0]}=...))."
        )
    return options


__all__ = ["ARGUMENT_NAMES", "GenerationOptions", "call_options", "parse_queries"]
