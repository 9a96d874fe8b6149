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
- **a classifier** (:class:`~auto_model.classifiers.SafetyClassifier`, optional): a logistic regression over the
  sentence embedding, trained on the routing set (``auto-model-train router``); its weights are plain JSON
  numbers in the artifact and scoring is one dot product. Its probability makes up ``weight`` of
  the score, the vote the rest (weight 1: the classifier alone). A classifier made for another
  embedding model than the retriever's is not used (its share goes to the vote, and a warning says so).
- **a lexical classifier** (:class:`~auto_model.classifiers.LexicalClassifier`, optional): a logistic regression over
  the query's words and word pairs (TF-IDF), trained on the same set. It reads the intent markers that
  a topic-level embedding blurs ("without anyone noticing", "fake", "untraceable"). Its probability
  makes up its own ``weight`` of the score; the vote has what neither classifier takes.

At or above ``threshold`` the request takes the safety route, and its examples are the nearest
safety examples (refusals to imitate); below it, the nearest everyday ones (so that "How do I boil
an egg?" is no longer shown a refusal). Thresholds are chosen on the routing set (cross-validated,
:func:`calibrate_threshold`) and the development split, never on the held-out split.

The two classifiers are :mod:`auto_model.classifiers`; :class:`~auto_model.router.RoutedRetriever`
(:mod:`auto_model.router`) routes requests over a retriever. Everything here is pure and needs no
engine or embedder.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from auto_model.classifiers import LexicalClassifier, SafetyClassifier
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.files import read_query_rows
from auto_model.rewording import plain_forms

logger = logging.getLogger(__name__)

EVERYDAY, SAFETY = "everyday", "safety"
ROUTES = (EVERYDAY, SAFETY)
#: The pool tag that puts an example on the safety route.
SAFETY_TAG = "harmful"
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


__all__ = [
    "EVERYDAY",
    "ROUTES",
    "VOTE_SETS",
    "LabelledQuery",
    "packaged_form_file",
    "packaged_routing_files",
    "routing_texts",
    "read_labelled_queries",
    "routing_set",
    "SAFETY",
    "SAFETY_TAG",
    "Route",
    "RoutingSettings",
    "calibrate_threshold",
    "check_route",
    "decide",
    "example_route",
    "safety_score",
]
