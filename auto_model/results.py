"""What a request gives back: :class:`GenerationResult` (an answer with what it cost) and the
:class:`Candidate` answers of a ``best_of`` request. Plain frozen data, no engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from auto_model.errors import BatchGenerationError


@dataclass(frozen=True)
class GenerationResult:
    """An answer with what it cost (``generate(..., return_details=True)``).

    Attributes:
        text: the answer, as ``generate`` returns it.
        finish_reason: ``"stop"`` (the answer ended), ``"length"`` (``max_new_tokens`` cut it) or
            ``"content_filter"`` (the answer check replaced the answer with its refusal, or a server
            withheld it).
        prompt_tokens: tokens in the assembled prompt (system prompt and examples included).
        completion_tokens: tokens generated.
        backend: the engine that answered (``"vllm"``, ``"openai"``, ``"transformers"``).
        model: the model that answered.
        latency_s: seconds the request took; engines that batch report the time of the batch call.
        route: the route the request took (``"everyday"`` or ``"safety"``; see
            :mod:`auto_model.routing`), which chose its system prompt and examples.
        route_score: its safety score (None when the route was chosen by the caller or not needed).
        candidates: for ``best_of=n``, the n answers sampled, in sampling order, with their rewards
            (``text`` is the best of them; ``completion_tokens`` counts the tokens of all n).
        looped: the answer was cut where it started to repeat itself (``finish_reason`` is
            ``"stop"``; see :mod:`auto_model.loops`); ``completion_tokens`` counts what was generated.
        decoding: the decoding settings the engine applied (the artifact's for the request's route,
            and your own; see :data:`~auto_model.backends.base.DECODING_SETTINGS`).
        answer_score: the answer check's score of the generated answer (None: not checked; see
            :mod:`auto_model.answer_check`).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    backend: str
    model: str
    latency_s: float | None = field(default=None, compare=False)
    route: str | None = None
    route_score: float | None = field(default=None, compare=False)
    candidates: tuple[Candidate, ...] = ()
    looped: bool = False
    decoding: dict[str, Any] = field(default_factory=dict)
    answer_score: float | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Candidate:
    """One of the answers sampled for a ``best_of`` request, with its reward (None: not scored)."""

    text: str
    score: float | None
    finish_reason: str


def gathered(results: list[Any], single: bool, return_exceptions: bool = False) -> Any:
    """What ``generate`` returns of its results (each a result or the exception its request failed
    with): for one query its result, or its exception raised; for a list the list, or
    :class:`~auto_model.errors.BatchGenerationError` carrying every result and error where some
    failed (unless ``return_exceptions``: then the exceptions stand in their slots)."""
    if single:
        if isinstance(results[0], BaseException):
            raise results[0]
        return results[0]
    errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    if errors and not return_exceptions:
        raise BatchGenerationError([None if i in errors else r for i, r in enumerate(results)], errors)
    return results


#: ``on_completion(index, result)``: a finished request's :class:`GenerationResult`, or its exception.
ResultCallback = Callable[[int, Any], None]


__all__ = ["Candidate", "GenerationResult", "ResultCallback", "gathered"]
