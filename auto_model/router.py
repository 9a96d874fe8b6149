"""The router: :class:`RoutedRetriever` routes requests and retrieves each one's examples from its
route's part of the pool, over a retriever (its embedder and FAISS indexes). What a route is, the
settings, the scores and the texts a request is scored on are :mod:`auto_model.routing` (pure).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from auto_model.classifiers import SafetyClassifier
from auto_model.routing import (
    EVERYDAY,
    ROUTES,
    SAFETY,
    SAFETY_TAG,
    Route,
    RoutingSettings,
    check_route,
    decide,
    example_route,
    routing_set,
    routing_texts,
    safety_score,
)

logger = logging.getLogger(__name__)

#: The routing set's embeddings per embedder and content, for the life of the embedder: routers made
#: again (another artifact, another pool object) do not embed it again, with or without a disk cache.
_VOTER_VECTORS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_VOTER_LOCK = threading.Lock()


class RoutedRetriever:
    """Routes requests and retrieves each one's examples from its route's part of the pool.

    The query is embedded once; the safety score (the vote of a search of the voters' index, mixed
    with the classifier's probability when there is one) and the examples (a search of the route's
    own part) both come from that embedding. Routing is off (every request is ``everyday`` and
    searches the whole pool, as before routes existed) when the pool has no example of one of the
    routes.
    """

    def __init__(self, retriever: Any, settings: RoutingSettings | None = None):
        self.retriever = retriever
        self.settings = settings or RoutingSettings()
        self.parts = {route: [ex for ex in retriever.pool if example_route(ex) == route] for route in ROUTES}
        self.enabled = all(self.parts.values())
        self._by_route: dict[str, Any] = {}
        self._voters: Any = None
        self._lock = threading.Lock()
        self._warned = False

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

    def voters(self) -> Any:
        """The index the vote searches: the pool's, or one over the routing set (built once: the
        pool's rows come from the pool's index, the rest is embedded with the pool's embedder and
        cached on disk like the pool, and kept per embedder in this process)."""
        if self.settings.vote_set == "pool":
            return self.retriever
        if self._voters is None:
            with self._lock:
                if self._voters is None:
                    import numpy as np

                    from auto_model.retrieval import ICLExample, ICLRetriever

                    full = self.retriever
                    found = routing_set(full.pool)
                    labelled = [ICLExample(q.query, "", (SAFETY_TAG,) if q.harmful else ()) for q in found]
                    # The pool's queries keep their rows of the pool's index; only the files' are embedded.
                    first: dict[str, int] = {}
                    for i, ex in enumerate(full.pool):
                        first.setdefault(ex.query, i)
                    own = [first[q.query] for q in found if q.source == "pool"]
                    added = [ex for ex, q in zip(labelled, found, strict=True) if q.source != "pool"]
                    files = ICLRetriever(added, full.embedding_model, embedder=full.embedder, cache_dir=full.cache_dir)
                    with _VOTER_LOCK:
                        try:
                            known = _VOTER_VECTORS.setdefault(full.embedder, {})
                        except TypeError:  # an embedder that cannot be weakly referenced: not kept
                            known = {}
                        key = files.cache_key()
                        if key not in known:
                            known[key] = files.pool_embeddings()
                    vectors = np.vstack([full.indexed_embeddings()[own], known[key]])
                    self._voters = ICLRetriever(labelled, full.embedding_model, embedder=full.embedder,
                                                cache_dir=False, embeddings=vectors)  # fmt: skip
        return self._voters

    def classifier(self, dimensions: int | None = None) -> SafetyClassifier | None:
        """The settings' classifier if it fits the retriever's embeddings, else None (its share goes to the vote)."""
        found = self.settings.classifier
        if found is None or found.fits(self.retriever.embedding_model, dimensions):
            return found
        if not self._warned:
            self._warned = True
            logger.warning(
                "The routing classifier was trained on %s embeddings, the retriever uses %s: it is not used, "
                "and its share of the safety score goes to the vote of the nearest labelled queries.",
                found.embedding_model,
                self.retriever.embedding_model,
            )
        return None

    def route(
        self, queries: Sequence[str], vectors: Any = None, earlier: Sequence[Sequence[str]] | None = None
    ) -> list[Route]:
        """The route each query takes (see the module docstring); ``earlier``: each query's earlier
        user turns, read too when the settings' ``segments`` is on."""
        return self._route(list(queries), vectors, earlier)[0]

    def _route(
        self, queries: list[str], vectors: Any = None, earlier: Sequence[Sequence[str]] | None = None
    ) -> tuple[list[Route], Any]:
        """The routes, and per query the embedding of the text that scored highest (its examples are
        the nearest to that text: the request inside the padding, the turn that asked it)."""
        if not self.enabled:
            return [Route(EVERYDAY) for _ in queries], vectors
        import numpy as np

        vectors = self.retriever.embed(queries) if vectors is None else vectors
        settings = self.settings
        if settings.segments:
            texts = [
                routing_texts(q, earlier[i] if earlier else (), settings.rewordings) for i, q in enumerate(queries)
            ]
        else:
            texts = [[q] for q in queries]
        more = [t for group in texts for t in group[1:]]
        all_vectors = np.vstack([vectors, self.retriever.embed(more)]) if more else vectors
        flat = list(queries) + more
        scores = self._scores(flat, all_vectors)
        # Query i's own text is row i; its other texts follow the queries, in order.
        rows: list[list[int]] = []
        at = len(queries)
        for i, group in enumerate(texts):
            rows.append([i, *range(at, at + len(group) - 1)])
            at += len(group) - 1
        best = [max(row, key=lambda r: scores[r]) for row in rows]
        routes = [decide(scores[b], settings) for b in best]
        return routes, all_vectors[best]

    def _scores(self, texts: list[str], vectors: Any) -> list[float]:
        """The safety score of each text (its embedding a row of ``vectors``)."""
        settings = self.settings
        classifier = self.classifier(vectors.shape[1])
        n = len(texts)
        probabilities = classifier.probabilities(vectors) if classifier is not None else [None] * n
        lexical = settings.lexical.probabilities(texts) if settings.lexical is not None else [None] * n
        votes: list[float | None] = [None] * n  # not needed when the classifiers make up the whole score
        if sum(c.weight for c in (classifier, settings.lexical) if c is not None) < 1 - 1e-9:
            found = self.voters().search_embedded(vectors, settings.neighbours)
            votes = [
                safety_score([(s, example_route(ex)) for s, ex in row], settings.temperature, settings.everyday_prior)
                for row in found
            ]  # fmt: skip
        return [settings.mix(v, p, w) for v, p, w in zip(votes, probabilities, lexical, strict=True)]

    def search(
        self,
        queries: Sequence[str],
        k: int | Mapping[str, int],
        route: str | None = None,
        vectors: Any = None,
        earlier: Sequence[Sequence[str]] | None = None,
    ) -> tuple[list[Route], list[list[Any]]]:
        """(route, the ``k`` nearest examples of that route) per query; ``k`` may differ per route
        (``{"everyday": 1, "safety": 3}``); ``route`` forces one; ``vectors``: the queries already
        embedded (:meth:`ICLRetriever.embed`); ``earlier``: each query's earlier user turns. A
        request routed to safety by one of its parts gets the examples nearest to that part."""
        check_route(route)
        queries = list(queries)
        per_route = dict(k) if isinstance(k, Mapping) else dict.fromkeys(ROUTES, k)
        if not queries:
            return [], []
        if route is not None and per_route.get(route, 0) <= 0:  # nothing to vote on or retrieve: no embedding
            return [Route(route) for _ in queries], [[] for _ in queries]
        vectors = self.retriever.embed(queries) if vectors is None else vectors
        if route is not None:
            routes, deciding = [Route(route) for _ in queries], vectors
        else:
            routes, deciding = self._route(queries, vectors, earlier)
        examples: list[list[Any]] = [[] for _ in queries]
        for name in ROUTES:
            rows = [i for i, r in enumerate(routes) if r.name == name]
            if rows and per_route.get(name, 0) > 0:
                found = self._part(name).search_embedded(
                    (deciding if name == SAFETY else vectors)[rows], per_route[name]
                )
                for i, row in zip(rows, found, strict=True):
                    examples[i] = [ex for _, ex in row]
        return routes, examples


__all__ = ["RoutedRetriever"]
