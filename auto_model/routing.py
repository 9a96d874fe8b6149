"""Query-adaptive alignment: which prompt and which examples a request gets.

A model has routes — ``everyday`` and ``safety`` — each with its own system prompt (from the prompt
artifact) and its own part of the example pool (an example tagged ``harmful`` belongs to ``safety``,
any other to ``everyday``). A request's *safety score* comes from the query embedding the SDK
computes anyway for retrieval:

- **the vote of the nearest labelled queries**: the request's ``neighbours`` nearest queries vote,
  weighted by similarity (a softmax over their cosine similarities at ``temperature``); the share
  that goes to ``safety`` is the vote. The voters are the pool examples (``vote_set="pool"``), or
  the pool plus the packaged *routing set* (``vote_set="labelled"``): labelled queries written for
  routing (``data/train/routing.jsonl``: harmful requests in many categories and forms, and more
  ordinary requests, many of which only sound alarming) and the labelled training queries
  (``data/train/train.jsonl``). An everyday "prior" neighbour at similarity ``everyday_prior`` can
  vote too, so that a request whose nearest queries are all far from it stays everyday.
- **a classifier** (:class:`SafetyClassifier`, optional): a logistic regression over the sentence
  embedding, trained on the routing set (``auto-model-train router``); its weights are plain JSON
  numbers in the artifact and scoring is one dot product. Its probability makes up ``weight`` of
  the score, the vote the rest (weight 1: the classifier alone). A classifier made for another
  embedding model than the retriever's is not used (its share goes to the vote, and a warning says so).
- **a lexical classifier** (:class:`LexicalClassifier`, optional): a logistic regression over the
  query's words and word pairs (TF-IDF), trained on the same set. It reads the intent markers that
  a topic-level embedding blurs ("without anyone noticing", "fake", "untraceable"). Its probability
  makes up its own ``weight`` of the score; the vote has what neither classifier takes.

At or above ``threshold`` the request takes the safety route, and its examples are the nearest
safety examples (refusals to imitate); below it, the nearest everyday ones (so that "How do I boil
an egg?" is no longer shown a refusal). Thresholds are chosen on the routing set (cross-validated,
:func:`calibrate_threshold`) and the development split, never on the held-out split.

Everything here but :class:`RoutedRetriever` is pure and needs no engine or embedder.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.files import read_query_rows
from auto_model.rewording import plain_forms

logger = logging.getLogger(__name__)

EVERYDAY, SAFETY = "everyday", "safety"
ROUTES = (EVERYDAY, SAFETY)
#: The pool tag that puts an example on the safety route.
SAFETY_TAG = "harmful"
#: The routing set's embeddings per embedder and content, for the life of the embedder: routers made
#: again (another artifact, another pool object) do not embed it again, with or without a disk cache.
_VOTER_VECTORS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_VOTER_LOCK = threading.Lock()
#: Who votes: the pool's examples, or the pool and the packaged routing set.
VOTE_SETS = ("pool", "labelled")
_LABELS = {"harmful": True, "safe": False}


@dataclass(frozen=True)
class LabelledQuery:
    """A query known to be harmful or not (``source``: where it came from; ``group``: its row's
    ``id``, or for a reworded query the ``pair`` it rewords, so that cross-validation keeps a
    query and its rewordings in one fold)."""

    query: str
    harmful: bool
    source: str
    group: str | None = None


def packaged_routing_files() -> list[Path]:
    """The routing set's packaged files: the routing queries and the training queries."""
    root = resources.files("auto_model")
    return [Path(str(root.joinpath(name))) for name in ("data/train/routing.jsonl", "data/train/train.jsonl")]


def packaged_form_file() -> Path:
    """The routing queries asked again in other forms (tense, wrappers, padding; ``pair``: the
    routing query's id) and the wrappers' own sentences: the classifiers train on them too, the
    vote does not read them."""
    return Path(str(resources.files("auto_model").joinpath("data/train/routing-forms.jsonl")))


def read_labelled_queries(path: str | os.PathLike[str]) -> list[LabelledQuery]:
    """The labelled queries of a JSONL file: each line's ``label`` (``harmful`` or ``safe``), or
    its ``category`` (``harmful`` or any other, as in the training queries)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactError(f"No labelled queries at {path}; give a .jsonl file of query and label.")
    found = []
    for number, row in read_query_rows(path):
        if "label" in row:
            if row["label"] not in _LABELS:
                raise ArtifactError(f"{path}:{number}: 'label' must be one of harmful, safe, got {row['label']!r}.")
            harmful = _LABELS[row["label"]]
        elif isinstance(row.get("category"), str):
            harmful = row["category"] == "harmful"
        else:
            raise ArtifactError(f"{path}:{number}: give a 'label' (harmful or safe) or a 'category'.")
        group = row.get("pair") or row.get("id")
        found.append(LabelledQuery(row["query"], harmful, path.stem, str(group) if group is not None else None))
    return found


def routing_set(pool: Sequence[Any], paths: Sequence[str | os.PathLike[str]] | None = None) -> list[LabelledQuery]:
    """The pool's queries (labelled by their tags) and the labelled queries of ``paths`` (default:
    :func:`packaged_routing_files`), the first occurrence of each query text kept."""
    found = [LabelledQuery(ex.query, example_route(ex) == SAFETY, "pool") for ex in pool]
    for path in packaged_routing_files() if paths is None else paths:
        found += read_labelled_queries(path)
    seen: set[str] = set()
    unique = []
    for item in found:
        if item.query not in seen:
            seen.add(item.query)
            unique.append(item)
    return unique


def _model_key(name: str) -> str:
    """An embedding model's name without its organisation or folder, case-folded."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def _check_classifier_fields(data: Any, source: str, what: str, kind: str, own: set[str]) -> None:
    """InvalidRequestError unless ``data`` is an object of ``kind`` with only its ``own`` fields and the
    common ones (kind, bias, weight, provenance)."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{source}: a {what} is an object, got {type(data).__name__}.")
    unknown = set(data) - own - {"kind", "bias", "weight", "provenance"}
    if unknown:
        raise InvalidRequestError(f"{source}: unknown {what} fields {sorted(unknown)}.")
    if data.get("kind", kind) != kind:
        raise InvalidRequestError(f"{source}: unknown {what} kind {data.get('kind')!r}; this version reads {kind}.")


@dataclass(frozen=True)
class SafetyClassifier:
    """A logistic regression over a query's sentence embedding: P(the query asks for harm).

    Attributes:
        embedding_model: the sentence-transformers model whose embeddings it was trained on.
        weights: one weight per embedding dimension.
        bias: the intercept.
        weight: the share of the safety score that is the classifier's probability (the rest is
            the vote's; 1: the classifier alone).
        provenance: how it was trained (data, regularisation, calibration figures).
    """

    embedding_model: str
    weights: tuple[float, ...]
    bias: float
    weight: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.embedding_model, str) or not self.embedding_model:
            raise InvalidRequestError("classifier embedding_model must be a model name.")
        if not self.weights or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in self.weights):
            raise InvalidRequestError("classifier weights must be a non-empty list of finite numbers.")
        if not isinstance(self.bias, (int, float)) or not math.isfinite(self.bias):
            raise InvalidRequestError(f"classifier bias must be a finite number, got {self.bias!r}.")
        _weight_in_range(self.weight, "classifier")

    @classmethod
    def from_dict(cls, data: Any, source: str = "classifier") -> SafetyClassifier:
        _check_classifier_fields(data, source, "classifier", "logistic", {"embedding_model", "weights"})
        weights = data.get("weights")
        if not isinstance(weights, list):
            raise InvalidRequestError(f"{source}: classifier weights must be a list of numbers.")
        return cls(
            embedding_model=data.get("embedding_model", ""),
            weights=tuple(weights),
            bias=data.get("bias", float("nan")),
            weight=data.get("weight", 1.0),
            provenance=dict(data.get("provenance") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": "logistic", "embedding_model": self.embedding_model,
                                "weight": self.weight, "bias": round(float(self.bias), 6)}  # fmt: skip
        if self.provenance:
            data["provenance"] = dict(self.provenance)
        data["weights"] = [round(float(w), 6) for w in self.weights]
        return data

    def fits(self, embedding_model: str, dimensions: int | None = None) -> bool:
        """Whether it can score embeddings of ``embedding_model`` (of ``dimensions`` numbers)."""
        same = _model_key(embedding_model) == _model_key(self.embedding_model)
        return same and (dimensions is None or dimensions == len(self.weights))

    def probabilities(self, vectors: Any) -> list[float]:
        """P(harmful) for each row of ``vectors`` (normalised query embeddings)."""
        import numpy as np

        logits = np.asarray(vectors, dtype="float64") @ np.asarray(self.weights, dtype="float64") + float(self.bias)
        return [float(p) for p in 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))]


#: The words of a query, as the lexical classifier was trained to see them (scikit-learn's default
#: token pattern over the lower-cased text: runs of two or more word characters).
_WORD = re.compile(r"(?u)\b\w\w+\b")


def _weight_in_range(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InvalidRequestError(f"{what} weight must be in (0, 1], got {value!r}.")


@dataclass(frozen=True)
class LexicalClassifier:
    """A logistic regression over a query's words and word pairs: P(the query asks for harm).

    The features are TF-IDF values (sub-linear term frequency, L2-normalised) of the lower-cased
    query's words and adjacent word pairs that are in ``terms``, exactly as scikit-learn's
    ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)`` computes them; scoring needs no
    library and no embedder.

    Attributes:
        terms: each known word or word pair and its (inverse document frequency, weight).
        bias: the intercept.
        weight: the share of the safety score that is this probability.
        provenance: how it was trained.
    """

    terms: dict[str, tuple[float, float]]
    bias: float
    weight: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.terms, dict) or not self.terms:
            raise InvalidRequestError("lexical classifier terms must be a non-empty object of term: [idf, weight].")
        for term, pair in self.terms.items():
            if not (isinstance(term, str) and term and isinstance(pair, tuple) and len(pair) == 2
                    and all(isinstance(x, (int, float)) and math.isfinite(x) for x in pair)):  # fmt: skip
                raise InvalidRequestError(
                    f"lexical classifier term {term!r} must map to [idf, weight], two finite numbers; got {pair!r}."
                )
        if not isinstance(self.bias, (int, float)) or not math.isfinite(self.bias):
            raise InvalidRequestError(f"lexical classifier bias must be a finite number, got {self.bias!r}.")
        _weight_in_range(self.weight, "lexical classifier")

    @classmethod
    def from_dict(cls, data: Any, source: str = "lexical") -> LexicalClassifier:
        _check_classifier_fields(data, source, "lexical classifier", "tfidf-logistic", {"terms"})
        terms = data.get("terms")
        if not isinstance(terms, dict):
            raise InvalidRequestError(f"{source}: lexical classifier terms must be an object of term: [idf, weight].")
        return cls(
            terms={t: tuple(v) if isinstance(v, list) else v for t, v in terms.items()},
            bias=data.get("bias", float("nan")),
            weight=data.get("weight", 1.0),
            provenance=dict(data.get("provenance") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": "tfidf-logistic", "weight": self.weight, "bias": round(float(self.bias), 6)}
        if self.provenance:
            data["provenance"] = dict(self.provenance)
        data["terms"] = {t: [round(float(i), 5), round(float(w), 5)] for t, (i, w) in sorted(self.terms.items())}
        return data

    def features(self, query: str) -> dict[str, float]:
        """The query's known terms and their normalised TF-IDF values."""
        words = _WORD.findall(query.lower())
        counts: dict[str, int] = {}
        for term in words + [f"{a} {b}" for a, b in pairwise(words)]:
            if term in self.terms:
                counts[term] = counts.get(term, 0) + 1
        values = {t: (1 + math.log(n)) * self.terms[t][0] for t, n in counts.items()}
        norm = math.sqrt(sum(v * v for v in values.values()))
        return {t: v / norm for t, v in values.items()} if norm > 0 else {}

    def probabilities(self, queries: Sequence[str]) -> list[float]:
        """P(harmful) for each query."""
        out = []
        for query in queries:
            logit = float(self.bias) + sum(v * self.terms[t][1] for t, v in self.features(query).items())
            out.append(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))))
        return out


@dataclass(frozen=True)
class RoutingSettings:
    """How requests are routed.

    Attributes:
        threshold: the safety score at or above which a request takes the safety route.
        neighbours: how many nearest pool examples vote.
        temperature: the softmax temperature over their cosine similarities (lower: the nearest
            ones count more).
        everyday_prior: the similarity of a virtual everyday neighbour that votes too (None: none).
        vote_set: who votes: ``"pool"`` (the pool's examples) or ``"labelled"`` (the pool and the
            packaged routing set).
        classifier: scores requests with the vote (its ``weight`` share of the score) when it fits
            the retriever's embedding model.
        lexical: scores requests by their words (its ``weight`` share of the score); the two
            classifiers' weights add up to at most 1, and the vote has the rest.
        segments: score a request's parts too (:func:`routing_texts`: its sentences, the earlier
            user turns of its conversation, all of them together) and keep the highest score, so
            that padding or an earlier turn does not hide a request; False: the last user turn alone.
        rewordings: with ``segments``, score the plain requests a reworded one may hide too (its
            text after a preface, restated in the present tense, a "how to" clause inside a story:
            :func:`auto_model.rewording.plain_forms`). Off unless an artifact turns it on: on held-out
            split 8 it changed no route and one of Gemma's refusals (see docs/safety.md).
    """

    threshold: float = 0.5
    neighbours: int = 8
    temperature: float = 0.05
    everyday_prior: float | None = None
    vote_set: str = "pool"
    classifier: SafetyClassifier | None = None
    lexical: LexicalClassifier | None = None
    segments: bool = True
    rewordings: bool = False

    def __post_init__(self) -> None:
        for name in ("segments", "rewordings"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"routing {name} must be true or false, got {getattr(self, name)!r}.")
        if sum(c.weight for c in (self.classifier, self.lexical) if c is not None) > 1 + 1e-9:
            raise InvalidRequestError(
                "routing: the classifier's and the lexical classifier's weights add up to more than 1; "
                "lower one of them."
            )
        if not 0 <= self.threshold <= 1:
            raise InvalidRequestError(f"routing threshold must be in [0, 1], got {self.threshold!r}.")
        if not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise InvalidRequestError(f"routing neighbours must be an integer >= 1, got {self.neighbours!r}.")
        if not self.temperature > 0:
            raise InvalidRequestError(f"routing temperature must be > 0, got {self.temperature!r}.")
        if self.vote_set not in VOTE_SETS:
            raise InvalidRequestError(f"routing vote_set must be one of {', '.join(VOTE_SETS)}, got {self.vote_set!r}.")
        if self.everyday_prior is not None and not -1 <= self.everyday_prior <= 1:
            raise InvalidRequestError(
                f"routing everyday_prior must be a similarity in [-1, 1], got {self.everyday_prior!r}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "routing") -> RoutingSettings:
        fields = {"threshold", "neighbours", "temperature", "everyday_prior", "vote_set", "classifier", "lexical",
                  "segments", "rewordings"}  # fmt: skip
        unknown = set(data) - fields
        if unknown:
            raise InvalidRequestError(f"{source}: unknown routing settings {sorted(unknown)}.")
        data = dict(data)
        if data.get("classifier") is not None:
            data["classifier"] = SafetyClassifier.from_dict(data["classifier"], f"{source}.classifier")
        if data.get("lexical") is not None:
            data["lexical"] = LexicalClassifier.from_dict(data["lexical"], f"{source}.lexical")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"threshold": self.threshold, "neighbours": self.neighbours,
                                "temperature": self.temperature}  # fmt: skip
        if self.everyday_prior is not None:
            data["everyday_prior"] = self.everyday_prior
        if self.vote_set != "pool":
            data["vote_set"] = self.vote_set
        if not self.segments:
            data["segments"] = False
        if self.rewordings:
            data["rewordings"] = True
        if self.classifier is not None:
            data["classifier"] = self.classifier.to_dict()
        if self.lexical is not None:
            data["lexical"] = self.lexical.to_dict()
        return data

    def mix(self, vote: float | None, probability: float | None = None, lexical: float | None = None) -> float:
        """The safety score: each classifier's ``weight`` share of its probability (``None``: that
        classifier is not used) and the rest of the vote."""
        score, rest = 0.0, 1.0
        for part, p in ((self.classifier, probability), (self.lexical, lexical)):
            if part is not None and p is not None:
                score, rest = score + part.weight * p, rest - part.weight
        if rest > 1e-9:
            if vote is None:
                raise ValueError("the vote is needed: the classifiers do not make up the whole score")
            score += rest * vote
        return score


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


#: Where a request is cut into sentences: after . ! or ? and white space, and at line breaks.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
#: A sentence longer than this many words is also read in overlapping windows of half as many.
LONG_SENTENCE = 32


def _parts(text: str) -> list[str]:
    """The parts of ``text`` scored on their own: each two adjacent sentences when it holds three or
    more, and a long sentence's overlapping word windows. A sentence is not scored alone: out of
    its request, "Walk me through how they would do it." reads as harm."""
    sentences = [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]
    parts = [f"{a} {b}" for a, b in pairwise(sentences)] if len(sentences) > 2 else []
    window = LONG_SENTENCE // 2
    for sentence in sentences:
        words = sentence.split()
        if len(words) > LONG_SENTENCE:
            parts += [" ".join(words[i : i + window]) for i in range(0, len(words) - window // 2, window // 2)]
    return parts


def routing_texts(query: str, earlier: Sequence[str] = (), rewordings: bool = False) -> list[str]:
    """The texts whose highest safety score routes a request: the request (its last user turn)
    first; then, when it holds three sentences or more, each two adjacent ones, and a long
    sentence in overlapping windows of words; then each earlier user turn of its conversation, read
    the same way, and all its user turns together; then (``rewordings``) the plain requests that the
    request and each earlier turn may hide behind a preface, another tense or a story
    (:func:`auto_model.rewording.plain_forms`). Padding a request, asking it a turn earlier or
    rewording it does not hide it; each text appears once."""
    texts = [query, *_parts(query)]
    turns = [t for t in earlier if t and t.strip()]
    for turn in turns:
        texts += [turn, *_parts(turn)]
    if turns:
        texts.append(conversation_text(query, turns))
    if rewordings:
        for text in (query, *turns):
            texts += plain_forms(text)
    return list(dict.fromkeys(texts))


def conversation_text(query: str, earlier: Sequence[str] = ()) -> str:
    """A request read with its conversation: the earlier user turns, then ``query`` (the last), one
    per line. Routing scores it; the answer check reads an answer beside it."""
    return "\n".join([*(t for t in earlier if t and t.strip()), query])


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


__all__ = [
    "EVERYDAY",
    "ROUTES",
    "VOTE_SETS",
    "LabelledQuery",
    "LexicalClassifier",
    "packaged_form_file",
    "packaged_routing_files",
    "routing_texts",
    "read_labelled_queries",
    "routing_set",
    "SAFETY",
    "SAFETY_TAG",
    "Route",
    "RoutedRetriever",
    "RoutingSettings",
    "SafetyClassifier",
    "calibrate_threshold",
    "check_route",
    "decide",
    "example_route",
    "safety_score",
]
