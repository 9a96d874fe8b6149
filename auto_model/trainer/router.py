"""Train the routing classifier: ``auto-model-train router``.

The classifier (:class:`~auto_model.routing.SafetyClassifier`) is a logistic regression over the
retriever's sentence embeddings, fitted with scikit-learn on the routing set
(:func:`auto_model.routing.routing_set`): the pool's queries labelled by their tags, the routing
queries (``data/train/routing.jsonl``: ``{"query": ..., "label": "harmful" | "safe"}``) and the
labelled training queries.

The threshold is the one that routes the most harmful queries to safety while sending at most
``max_false_positive`` of the others there, measured on out-of-fold predictions (k-fold cross
validation), unless one is given. The classifier goes into the routing settings of a prompt
artifact, as plain JSON numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.routing import SafetyClassifier, calibrate_threshold


def fit_safety_classifier(
    queries: Sequence[str],
    harmful: Sequence[bool],
    vectors: Any,
    embedding_model: str,
    *,
    c: float = 16.0,
    max_false_positive: float = 0.05,
    threshold: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> SafetyClassifier:
    """A logistic regression on ``vectors`` (the queries' normalised embeddings), its threshold
    calibrated on out-of-fold predictions unless ``threshold`` is given."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    labels = np.asarray(harmful, dtype=bool)
    if len(queries) != len(labels) or len(vectors) != len(labels):
        raise InvalidRequestError("queries, labels and embeddings must have one row each.")
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < folds:
        raise InvalidRequestError(f"The router needs at least {folds} harmful and {folds} other queries.")
    if not c > 0:
        raise InvalidRequestError(f"--router-c must be > 0, got {c}.")
    if not 0 <= max_false_positive < 1:
        raise InvalidRequestError(f"--max-false-positive must be in [0, 1), got {max_false_positive}.")

    def model() -> Any:
        return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)

    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    held_out = cross_val_predict(model(), vectors, labels, cv=cv, method="predict_proba")[:, 1]
    chosen = (
        calibrate_threshold([float(p) for p in held_out], list(labels), max_false_positive)
        if threshold is None
        else float(threshold)
    )
    caught = held_out >= chosen
    fitted = model().fit(vectors, labels)
    return SafetyClassifier(
        embedding_model=embedding_model,
        weights=tuple(float(w) for w in fitted.coef_[0]),
        bias=float(fitted.intercept_[0]),
        threshold=round(chosen, 4),
        provenance={
            "method": "logistic regression (scikit-learn), balanced class weights",
            "c": c,
            "queries": len(labels),
            "harmful": positives,
            "threshold_from": "given"
            if threshold is not None
            else f"{folds}-fold cross-validation, at most {max_false_positive:.0%} of other queries routed to safety",
            "cv_recall": round(float(caught[labels].mean()), 4),
            "cv_false_positive": round(float(caught[~labels].mean()), 4),
        },
    )
