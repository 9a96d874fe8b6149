"""The answer check (an output rail): does an answer comply with a harmful request?

Routing (:mod:`auto_model.routing`) reads the request; a request it misses gets the everyday prompt,
and a small model then often complies. The answer check reads what the model wrote, beside the
request it answers (for a conversation, its user turns, one per line: what the SDK sets as a
request's ``query``). Its score is the mix of two logistic regressions trained on answers
(``auto-model-train answer-check``): one over the request's and the answer's sentence embeddings
side by side (the retriever's MiniLM, :class:`~auto_model.classifiers.SafetyClassifier` with twice the
embedding's dimensions) and one over the words and word pairs of the request and the answer
(:class:`~auto_model.classifiers.LexicalClassifier`), each ``weight`` of the score. At or above
``threshold`` the answer is replaced by ``refusal`` and its ``finish_reason`` is
``"content_filter"`` (the OpenAI value), unless it already opens by declining
(:func:`~auto_model.rewards.proxies.refusal_kind`): a refusal keeps its own safe alternative. A
route may have a threshold of its own (``route_thresholds``): on the safety route, where the router
found the request harmful and the prompt asks for a refusal, an answer that complies anyway can be
held to a lower one.

A streamed answer is checked in windows: the text is held back until the answer so far has passed
the check, which runs each time ``window`` more characters have arrived and once at the end. A
client sees only text that passed a check; when a check fails, the stream ends with the refusal
(after the text it has already seen: at most the answer up to the last passed check), and the
engine stops generating.

The check's settings and weights are the prompt artifact's ``answer_check`` (plain JSON numbers;
:class:`AnswerCheck`). Everything here is pure and needs no engine: scores come from an embedding
function the SDK passes (the retriever's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Final

from auto_model.backends.base import Completion, Outcome
from auto_model.classifiers import LexicalClassifier, SafetyClassifier
from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError
from auto_model.loops import ChunkStream
from auto_model.rewards.proxies import refusal_kind
from auto_model.routing import ROUTES

logger = logging.getLogger(__name__)

#: What a blocked answer is replaced with when the artifact does not say.
DEFAULT_REFUSAL = "Sorry, but I can't help with that."
#: Characters of a streamed answer between two checks when the artifact does not say.
DEFAULT_WINDOW = 200
#: The most characters a window may be.
MAX_WINDOW = 100_000
#: The fields of an artifact's ``answer_check``.
FIELDS = ("threshold", "classifier", "lexical", "refusal", "window", "route_thresholds", "provenance")
#: The ``finish_reason`` of an answer the check replaced.
CONTENT_FILTER: Final = "content_filter"


@dataclass(frozen=True)
class AnswerCheck:
    """How answers are checked.

    Attributes:
        threshold: the score at or above which an answer is replaced.
        classifier: P(the answer complies with a harmful request) from its embedding; ``weight`` of
            the score.
        lexical: the same from its words; ``weight`` of the score. The two weights add up to 1 (one
            of them may be missing: the other then has weight 1).
        refusal: the text that replaces a blocked answer.
        window: characters of a streamed answer between two checks.
        route_thresholds: a route's own threshold (``{"safety": 0.3}``), in place of ``threshold``
            for the answers of requests on that route.
        provenance: how it was trained (data, figures).
    """

    threshold: float
    classifier: SafetyClassifier | None = None
    lexical: LexicalClassifier | None = None
    refusal: str = DEFAULT_REFUSAL
    window: int = DEFAULT_WINDOW
    route_thresholds: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        parts = [c for c in (self.classifier, self.lexical) if c is not None]
        if not parts:
            raise InvalidRequestError("answer_check needs a classifier, a lexical classifier or both.")
        if abs(sum(c.weight for c in parts) - 1) > 1e-6:
            raise InvalidRequestError("answer_check: the classifiers' weights must add up to 1.")
        _check_threshold(self.threshold, "threshold")
        if not isinstance(self.route_thresholds, dict):
            raise InvalidRequestError("answer_check route_thresholds is an object of route names and thresholds.")
        for route, t in self.route_thresholds.items():
            if route not in ROUTES:
                known = ", ".join(ROUTES)
                raise InvalidRequestError(f"answer_check route_thresholds: unknown route {route!r} (one of {known}).")
            _check_threshold(t, f"route_thresholds.{route}")
        if not isinstance(self.refusal, str) or not self.refusal.strip():
            raise InvalidRequestError("answer_check refusal must be a non-empty string.")
        check_window(self.window)

    @classmethod
    def from_dict(cls, data: Any, source: str = "answer_check") -> AnswerCheck:
        if not isinstance(data, dict):
            raise InvalidRequestError(f"{source}: answer_check is an object, got {type(data).__name__}.")
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise InvalidRequestError(f"{source}: unknown answer_check fields {sorted(unknown)}.")
        classifier = data.get("classifier")
        lexical = data.get("lexical")
        return cls(
            threshold=data.get("threshold", float("nan")),
            classifier=None if classifier is None else SafetyClassifier.from_dict(classifier, f"{source}.classifier"),
            lexical=None if lexical is None else LexicalClassifier.from_dict(lexical, f"{source}.lexical"),
            refusal=data.get("refusal", DEFAULT_REFUSAL),
            window=data.get("window", DEFAULT_WINDOW),
            route_thresholds=data.get("route_thresholds", {}),
            provenance=dict(data.get("provenance") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"threshold": self.threshold, "refusal": self.refusal, "window": self.window}
        if self.route_thresholds:
            data["route_thresholds"] = dict(self.route_thresholds)
        if self.provenance:
            data["provenance"] = dict(self.provenance)
        if self.classifier is not None:
            data["classifier"] = self.classifier.to_dict()
        if self.lexical is not None:
            data["lexical"] = self.lexical.to_dict()
        return data

    @cached_property
    def digest(self) -> str:
        """The SHA-256 of :meth:`to_dict` (keys sorted): what caches of checked answers are keyed by.
        Computed once (a lexical classifier holds thousands of terms)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def fits(self, embedding_model: str) -> bool:
        """Whether its embedding classifier (if any) was trained on ``embedding_model``'s embeddings."""
        return self.classifier is None or self.classifier.fits(embedding_model)

    def scores(
        self,
        answers: Sequence[str],
        embed: Callable[[list[str]], Any] | None = None,
        queries: Sequence[str | None] | None = None,
    ) -> list[float]:
        """Each answer's score, read beside the request it answers (``queries``; none: empty).
        ``embed``: texts' normalised embeddings, needed with a classifier."""
        import numpy as np

        answers = list(answers)
        if not answers:
            return []
        asked = [q or "" for q in (queries if queries is not None else [""] * len(answers))]
        if len(asked) != len(answers):
            raise InvalidRequestError("answer_check: give one query per answer.")
        total = [0.0] * len(answers)
        if self.classifier is not None:
            if embed is None:
                raise InvalidRequestError("answer_check: scoring with an embedding classifier needs embeddings.")
            vectors = embed(asked + answers)
            pairs = np.hstack([vectors[: len(asked)], vectors[len(asked) :]])
            for i, p in enumerate(self.classifier.probabilities(pairs)):
                total[i] += self.classifier.weight * p
        if self.lexical is not None:
            for i, p in enumerate(self.lexical.probabilities(joined(asked, answers))):
                total[i] += self.lexical.weight * p
        return total

    def threshold_for(self, route: str | None = None) -> float:
        """The threshold of the answers of requests on ``route`` (its own, or :attr:`threshold`)."""
        return self.route_thresholds.get(route, self.threshold) if route is not None else self.threshold

    def blocks(self, score: float, route: str | None = None) -> bool:
        """Whether ``score`` is at or above the threshold (``route``'s, where it has its own)."""
        return score >= self.threshold_for(route)

    def replaces(self, answer: str, score: float, route: str | None = None) -> bool:
        """Whether an answer of this score (to a request on ``route``) is replaced: it is blocked and
        does not already open by declining (a refusal is not compliance; it keeps its own safe
        alternative)."""
        return self.blocks(score, route) and refusal_kind(answer) != "refusal"


def check_completions(
    check: AnswerCheck,
    outcomes: Sequence[Outcome],
    queries: Sequence[str | None],
    wanted: Sequence[bool],
    embed: Callable[[list[str]], Any],
    routes: Sequence[str | None] | None = None,
) -> list[Outcome]:
    """``outcomes`` with each wanted, non-empty answer scored in one batch (beside its query) and
    replaced by the refusal, ``finish_reason`` :data:`CONTENT_FILTER`, where the check replaces it
    (``routes``: each request's route, for its threshold)."""
    rows = [i for i, o in enumerate(outcomes) if wanted[i] and isinstance(o, Completion) and o.text.strip()]
    out = list(outcomes)
    if not rows:
        return out
    answers = [out[i].text for i in rows]  # type: ignore[union-attr]
    scores = check.scores(answers, embed, [queries[i] for i in rows])
    for i, answer, score in zip(rows, answers, scores, strict=True):
        if check.replaces(answer, score, routes[i] if routes is not None else None):
            out[i] = replace(out[i], text=check.refusal, finish_reason=CONTENT_FILTER, answer_score=score)  # type: ignore[type-var]
        else:
            out[i] = replace(out[i], answer_score=score)  # type: ignore[type-var]
    return out


def _check_threshold(value: Any, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise InvalidRequestError(f"answer_check {what} must be in [0, 1], got {value!r}.")


def joined(queries: Sequence[str], answers: Sequence[str]) -> list[str]:
    """The texts the lexical classifier reads: each request and its answer."""
    return [f"{q}\n{a}" for q, a in zip(queries, answers, strict=True)]


def check_window(window: Any) -> int:
    """``window`` if it is a number of characters a streamed answer may be checked after; else InvalidRequestError."""
    if not is_whole(window, 1, MAX_WINDOW):
        raise InvalidRequestError(f"answer check window must be an integer from 1 to {MAX_WINDOW}, got {window!r}.")
    return window


class CheckedStream(ChunkStream):
    """The chunks of a streamed answer, released once the answer so far has passed the check.

    ``chunks``: the answer's text chunks (an object with ``close`` and ``looped``, such as a
    :class:`~auto_model.loops.CutStream`, or any iterator); ``score``: the answer's score;
    ``window``: characters between checks; ``route``: the request's route (for its threshold).
    Once it has ended, :attr:`filtered` says whether a check failed (the last chunk was then
    ``refusal``), :attr:`score` is the last check's score and :attr:`looped` is the inner stream's."""

    def __init__(
        self,
        chunks: Iterator[str],
        check: AnswerCheck,
        score: Callable[[str], float],
        window: int | None = None,
        route: str | None = None,
    ):
        self._check = check
        self._route = route
        self._score = score
        self._window = check.window if window is None else check_window(window)
        self.filtered = False
        self.score: float | None = None
        self.checks = 0
        super().__init__(chunks)

    @property
    def looped(self) -> bool:
        return bool(getattr(self._chunks, "looped", False))

    def _passes(self, text: str) -> bool:
        self.checks += 1
        self.score = self._score(text)
        return not self._check.replaces(text, self.score, self._route)

    def _run(self) -> Generator[str, None, None]:
        seen, held = "", ""
        try:
            for piece in self._chunks:
                held += piece
                if len(held) < self._window:
                    continue
                if not self._passes(seen + held):
                    self.filtered = True
                    yield self._refusal(seen)
                    return
                seen, released, held = seen + held, held, ""
                yield released
            if (seen + held).strip() and held and not self._passes(seen + held):
                self.filtered = True
                yield self._refusal(seen)
                return
            if held:
                yield held
        finally:
            self.close_source()

    def _refusal(self, seen: str) -> str:
        return self._check.refusal if not seen else f"\n\n{self._check.refusal}"


__all__ = [
    "AnswerCheck",
    "CheckedStream",
    "CONTENT_FILTER",
    "DEFAULT_REFUSAL",
    "DEFAULT_WINDOW",
    "check_completions",
    "check_window",
    "joined",
]
