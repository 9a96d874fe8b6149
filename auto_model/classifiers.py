"""The two classifiers that read a request (or a request and its answer): plain JSON numbers in
the prompt artifact, scored without an engine.

- :class:`SafetyClassifier`: a logistic regression over a sentence embedding (one dot product);
- :class:`LexicalClassifier`: a logistic regression over words and word pairs (TF-IDF), computed
  exactly as scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)`` does, with no
  library and no embedder.

The router (:mod:`auto_model.routing`) mixes them into a request's safety score; the answer check
(:mod:`auto_model.answer_check`) reads a request and its answer with them. Both are trained with
scikit-learn (``auto-model-train router`` and ``answer-check``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from auto_model.errors import InvalidRequestError


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


__all__ = ["LexicalClassifier", "SafetyClassifier"]
