"""Query-adaptive alignment: which prompt and which examples a request gets.

A model has routes — ``everyday`` and ``safety`` — each with its own system prompt (from the prompt
artifact) and its own part of the example pool (an example tagged ``harmful`` belongs to ``safety``,
any other to ``everyday``). A request is routed by the retrieval the SDK runs anyway: its nearest
pool examples vote, weighted by similarity (a softmax over their cosine similarities at
``temperature``), and the share of the vote that goes to ``safety`` is the request's *safety score*.
An everyday "prior" neighbour at similarity ``everyday_prior`` votes too, so that a request whose
nearest examples are all far from it (they share only its wording) stays on the everyday route.
At or above ``threshold`` the request takes the safety route, and its examples are the nearest safety
examples (refusals to imitate); below it, the nearest everyday ones (so that "How do I boil an egg?"
is no longer shown a refusal). The threshold is calibrated on the training queries, never on the
eval splits (:func:`calibrate_threshold`).

Everything here but :class:`RoutedRetriever` is pure and needs no engine or embedder.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from auto_model.errors import InvalidRequestError

EVERYDAY, SAFETY = "everyday", "safety"
ROUTES = (EVERYDAY, SAFETY)
#: The pool tag that puts an example on the safety route.
SAFETY_TAG = "harmful"


@dataclass(frozen=True)
class RoutingSettings:
    """How requests are routed.

    Attributes:
        threshold: the safety score at or above which a request takes the safety route.
        neighbours: how many nearest pool examples vote.
        temperature: the softmax temperature over their cosine similarities (lower: the nearest
            ones count more).
        everyday_prior: the similarity of a virtual everyday neighbour that votes too (None: none).
    """

    threshold: float = 0.5
    neighbours: int = 8
    temperature: float = 0.05
    everyday_prior: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise InvalidRequestError(f"routing threshold must be in [0, 1], got {self.threshold!r}.")
        if not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise InvalidRequestError(f"routing neighbours must be an integer >= 1, got {self.neighbours!r}.")
        if not self.temperature > 0:
            raise InvalidRequestError(f"routing temperature must be > 0, got {self.temperature!r}.")
        if self.everyday_prior is not None and not -1 <= self.everyday_prior <= 1:
            raise InvalidRequestError(
                f"routing everyday_prior must be a similarity in [-1, 1], got {self.everyday_prior!r}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "routing") -> RoutingSettings:
        unknown = set(data) - {"threshold", "neighbours", "temperature", "everyday_prior"}
        if unknown:
            raise InvalidRequestError(f"{source}: unknown routing settings {sorted(unknown)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "neighbours": self.neighbours, "temperature": self.temperature,
                "everyday_prior": self.everyday_prior}  # fmt: skip


@dataclass(frozen=True)
class Route:
    """The route a request took, and why.

    Attributes:
        name: ``"everyday"`` or ``"safety"``.
        score: the request's safety score (None when the caller chose the route).
        threshold: the threshold it was compared with (None when the caller chose).
    """

    name: str
    score: float | None = None
    threshold: float | None = None

    @property
    def chosen_by_caller(self) -> bool:
        return self.score is None


def example_route(example: Any) -> str:
    """The route an example belongs to: ``safety`` if it is tagged ``harmful``, else ``everyday``."""
    return SAFETY if SAFETY_TAG in getattr(example, "tags", ()) else EVERYDAY


def check_route(route: Any) -> str | None:
    """``route`` if it names a route (or is None: automatic); InvalidRequestError otherwise."""
    if route is None or route in ROUTES:
        return route
    raise InvalidRequestError(f"route must be one of {', '.join(ROUTES)} or None (automatic), got {route!r}.")


def safety_score(
    neighbours: Sequence[tuple[float, str]], temperature: float, everyday_prior: float | None = None
) -> float:
    """The share of a softmax-weighted vote of ``(similarity, route)`` neighbours that goes to safety
    (with ``everyday_prior``, a virtual everyday neighbour of that similarity votes too)."""
    votes = list(neighbours) + ([(everyday_prior, EVERYDAY)] if everyday_prior is not None else [])
    if not votes:
        return 0.0
    top = max(s for s, _ in votes)
    weights = [(math.exp((s - top) / temperature), route) for s, route in votes]
    total = sum(w for w, _ in weights)
    return sum(w for w, route in weights if route == SAFETY) / total


def decide(score: float, settings: RoutingSettings) -> Route:
    return Route(SAFETY if score >= settings.threshold else EVERYDAY, score, settings.threshold)


def calibrate_threshold(scores: Sequence[float], harmful: Sequence[bool], max_false_positive: float = 0.05) -> float:
    """The threshold that routes the most harmful queries to safety while sending at most
    ``max_false_positive`` of the others there (on calibration data: the training queries).
    Ties keep the highest such threshold."""
    if len(scores) != len(harmful) or not any(harmful) or all(harmful):
        raise InvalidRequestError("Calibration needs scores for both harmful and other queries.")
    negatives = sum(not h for h in harmful)
    best: tuple[int, float] | None = None
    for t in sorted(set(scores), reverse=True):
        false_positive = sum(1 for s, h in zip(scores, harmful, strict=True) if s >= t and not h) / negatives
        if false_positive > max_false_positive:
            break
        caught = sum(1 for s, h in zip(scores, harmful, strict=True) if s >= t and h)
        if best is None or caught > best[0]:
            best = (caught, t)
    return 1.0 if best is None else best[1]


class RoutedRetriever:
    """Routes requests and retrieves each one's examples from its route's part of the pool.

    The query is embedded once; the routing vote and the examples both come from searches of that
    embedding (the full pool's index, then the route's own). Routing is off (every request is
    ``everyday`` and searches the whole pool, as before routes existed) when the pool has no
    example of one of the routes.
    """

    def __init__(self, retriever: Any, settings: RoutingSettings | None = None):
        self.retriever = retriever
        self.settings = settings or RoutingSettings()
        self.parts = {route: [ex for ex in retriever.pool if example_route(ex) == route] for route in ROUTES}
        self.enabled = all(self.parts.values())
        self._by_route: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _part(self, route: str) -> Any:
        if not self.enabled:
            return self.retriever
        if route not in self._by_route:
            with self._lock:
                if route not in self._by_route:
                    from auto_model.retrieval import ICLRetriever

                    full = self.retriever
                    # The route's examples keep their rows of the full pool's embeddings: nothing is embedded again.
                    vectors = full.indexed_embeddings()
                    rows = [i for i, ex in enumerate(full.pool) if example_route(ex) == route]
                    self._by_route[route] = ICLRetriever(
                        self.parts[route], full.embedding_model, embedder=full.embedder, cache_dir=False,
                        embeddings=vectors[rows],
                    )  # fmt: skip
        return self._by_route[route]

    def route(self, queries: Sequence[str], vectors: Any = None) -> list[Route]:
        """The route each query takes on its own (see the module docstring)."""
        if not self.enabled:
            return [Route(EVERYDAY) for _ in queries]
        vectors = self.retriever.embed(list(queries)) if vectors is None else vectors
        found = self.retriever.search_embedded(vectors, self.settings.neighbours)
        settings = self.settings
        return [
            decide(
                safety_score([(s, example_route(ex)) for s, ex in row], settings.temperature, settings.everyday_prior),
                settings,
            )  # fmt: skip
            for row in found
        ]

    def search(
        self, queries: Sequence[str], k: int, route: str | None = None, vectors: Any = None
    ) -> tuple[list[Route], list[list[Any]]]:
        """(route, the ``k`` nearest examples of that route) per query; ``route`` forces one;
        ``vectors``: the queries already embedded (:meth:`ICLRetriever.embed`)."""
        check_route(route)
        queries = list(queries)
        if not queries:
            return [], []
        if route is not None and k <= 0:  # nothing to vote on, nothing to retrieve: no embedding
            return [Route(route) for _ in queries], [[] for _ in queries]
        vectors = self.retriever.embed(queries) if vectors is None else vectors
        routes = [Route(route) for _ in queries] if route is not None else self.route(queries, vectors)
        examples: list[list[Any]] = [[] for _ in queries]
        if k > 0:
            for name in ROUTES:
                rows = [i for i, r in enumerate(routes) if r.name == name]
                if rows:
                    found = self._part(name).search_embedded(vectors[rows], k)
                    for i, row in zip(rows, found, strict=True):
                        examples[i] = [ex for _, ex in row]
        return routes, examples


__all__ = [
    "EVERYDAY",
    "ROUTES",
    "SAFETY",
    "SAFETY_TAG",
    "Route",
    "RoutedRetriever",
    "RoutingSettings",
    "calibrate_threshold",
    "check_route",
    "decide",
    "example_route",
    "safety_score",
]
