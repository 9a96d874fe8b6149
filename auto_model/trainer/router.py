"""Train the routing classifier: ``auto-model-train router``.

The classifier (:class:`~auto_model.classifiers.SafetyClassifier`) is a logistic regression over the
retriever's sentence embeddings, fitted with scikit-learn on the routing set
(:func:`auto_model.routing.routing_set`): the pool's queries labelled by their tags, the routing
queries (``data/train/routing.jsonl``: ``{"query": ..., "label": "harmful" | "safe"}``) and the
labelled training queries.

A second, lexical classifier (:class:`~auto_model.classifiers.LexicalClassifier`: a logistic regression
over the queries' TF-IDF words and word pairs, with scikit-learn's ``TfidfVectorizer``) is fitted
on the same queries when it gets a weight. The request's safety score mixes the classifiers'
probabilities (each its ``weight``) with the vote of the nearest labelled queries (the rest).
The routing threshold is the one that routes the most harmful queries to safety while sending at
most ``max_false_positive`` of the others there, measured on out-of-fold scores (k-fold cross
validation), unless one is given. The classifiers go into the routing settings of a prompt
artifact, as plain JSON numbers, with the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from auto_model.errors import InvalidRequestError
from auto_model.routing import (
    EVERYDAY,
    SAFETY,
    LexicalClassifier,
    RoutingSettings,
    SafetyClassifier,
    calibrate_threshold,
    safety_score,
)

if TYPE_CHECKING:
    from auto_model.trainer.config import DRPOConfig
    from auto_model.trainer.drpo import TrainResult


def check_router_settings(
    c: float, weight: float, lexical_weight: float, lexical_c: float, max_false_positive: float
) -> None:
    """InvalidRequestError naming the flag for a router setting out of its range (before any query is embedded)."""
    if not c > 0:
        raise InvalidRequestError(f"--router-c must be > 0, got {c}.")
    if not 0 < weight <= 1:
        raise InvalidRequestError(f"--classifier-weight must be in (0, 1], got {weight}.")
    if not 0 <= lexical_weight < 1 or weight + lexical_weight > 1 + 1e-9:
        raise InvalidRequestError(
            f"--lexical-weight must be in [0, 1) and add up to at most 1 with --classifier-weight, "
            f"got {lexical_weight}."
        )
    if not lexical_c > 0:
        raise InvalidRequestError(f"--lexical-c must be > 0, got {lexical_c}.")
    if not 0 <= max_false_positive < 1:
        raise InvalidRequestError(f"--max-false-positive must be in [0, 1), got {max_false_positive}.")


def fit_router(
    queries: Sequence[str],
    harmful: Sequence[bool],
    vectors: Any,
    embedding_model: str,
    *,
    c: float = 16.0,
    weight: float = 0.25,
    lexical_weight: float = 0.25,
    lexical_c: float = 4.0,
    neighbours: int = 16,
    temperature: float = 0.1,
    max_false_positive: float = 0.05,
    threshold: float | None = None,
    folds: int = 5,
    seed: int = 0,
    voters: Sequence[bool] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[SafetyClassifier, LexicalClassifier | None, float]:
    """A logistic regression on ``vectors`` (the queries' normalised embeddings), one on the
    queries' words when ``lexical_weight`` > 0 (else None), and the routing threshold of their
    probabilities mixed with the vote (``weight`` and ``lexical_weight`` of the score): the
    threshold is calibrated on out-of-fold scores (each fold scored by regressions fitted on,
    and a vote of, the other folds) unless ``threshold`` is given.

    ``voters``: which queries vote (as at run time, where the reworded forms do not; default: all);
    ``groups``: queries of one group (a query and its rewordings) stay in one fold."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(harmful, dtype=bool)
    vectors = np.asarray(vectors, dtype="float32")
    if len(queries) != len(labels) or len(vectors) != len(labels):
        raise InvalidRequestError("queries, labels and embeddings must have one row each.")
    voting = np.ones(len(labels), dtype=bool) if voters is None else np.asarray(voters, dtype=bool)
    if len(voting) != len(labels) or (groups is not None and len(groups) != len(labels)):
        raise InvalidRequestError("voters and groups must have one entry per query.")
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < folds:
        raise InvalidRequestError(f"The router needs at least {folds} harmful and {folds} other queries.")
    check_router_settings(c, weight, lexical_weight, lexical_c, max_false_positive)

    def model(strength: float = c) -> Any:
        return LogisticRegression(C=strength, class_weight="balanced", max_iter=5000)

    def words(texts: Sequence[str]) -> tuple[Any, Any]:
        """The TF-IDF vectorizer fitted on ``texts`` and their feature rows."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        return vectorizer, vectorizer.fit_transform(texts)

    fitted = model().fit(vectors, labels)
    classifier = SafetyClassifier(
        embedding_model=embedding_model,
        weights=tuple(float(w) for w in fitted.coef_[0]),
        bias=float(fitted.intercept_[0]),
        weight=weight,
    )
    lexical = None
    if lexical_weight > 0:
        vectorizer, counts = words(queries)
        regression = model(lexical_c).fit(counts, labels)
        names = vectorizer.get_feature_names_out()
        lexical = LexicalClassifier(
            terms={
                str(t): (float(i), float(w))
                for t, i, w in zip(names, vectorizer.idf_, regression.coef_[0], strict=True)
            },
            bias=float(regression.intercept_[0]),
            weight=lexical_weight,
            provenance={"method": "TF-IDF words and word pairs (seen twice or more), logistic regression "
                        "(scikit-learn), balanced class weights", "c": lexical_c},
        )  # fmt: skip
    settings = RoutingSettings(classifier=classifier, lexical=lexical)
    held_out = np.zeros(len(labels))
    splitter = StratifiedGroupKFold if groups is not None else StratifiedKFold
    split = splitter(folds, shuffle=True, random_state=seed).split(vectors, labels, groups)
    for train, test in split:
        probabilities = model().fit(vectors[train], labels[train]).predict_proba(vectors[test])[:, 1]
        by_words: Any = [None] * len(test)
        if lexical is not None:
            vectorizer, counts = words([queries[i] for i in train])
            regression = model(lexical_c).fit(counts, labels[train])
            by_words = regression.predict_proba(vectorizer.transform([queries[i] for i in test]))[:, 1]
        voting_rows = train[voting[train]]
        similarity = vectors[test] @ vectors[voting_rows].T
        nearest = np.argsort(-similarity, axis=1)[:, :neighbours]
        for row, (i, p, w) in enumerate(zip(test, probabilities, by_words, strict=True)):
            votes = [(float(similarity[row, j]), SAFETY if labels[voting_rows][j] else EVERYDAY) for j in nearest[row]]
            vote = safety_score(votes, temperature)
            held_out[i] = settings.mix(vote, float(p), None if w is None else float(w))
    chosen = (
        calibrate_threshold([float(p) for p in held_out], list(labels), max_false_positive)
        if threshold is None
        else float(threshold)
    )
    caught = held_out >= chosen
    classifier = replace(
        classifier,
        provenance={
            "method": "logistic regression (scikit-learn), balanced class weights",
            "c": c,
            "queries": len(labels),
            "harmful": positives,
            "voters": int(voting.sum()),
            "threshold_from": "given"
            if threshold is not None
            else f"{folds}-fold cross-validation of the "
            f"mixed score, at most {max_false_positive:.0%} of other queries routed to safety",
            "cv_recall": round(float(caught[labels].mean()), 4),
            "cv_false_positive": round(float(caught[~labels].mean()), 4),
        },
    )
    return classifier, lexical, round(chosen, 4)


def train_router(config: DRPOConfig) -> TrainResult:
    """The router stage of a resolved :class:`~auto_model.trainer.config.DRPOConfig`: fit the routing
    classifier and write the artifact that carries it (no engine is loaded). Returns the
    :class:`~auto_model.trainer.drpo.TrainResult`."""
    from pathlib import Path

    from auto_model.artifacts import prompt_for_model, save_prompt_artifact
    from auto_model.retrieval import ICLRetriever, load_icl_pool
    from auto_model.routing import packaged_form_file, packaged_routing_files, read_labelled_queries, routing_set
    from auto_model.trainer.drpo import TrainResult

    c = config
    assert c.base_model_name is not None and c.log_dir is not None, "a resolved config (DRPO resolves it)"
    if c.route_threshold is not None and not 0 <= c.route_threshold <= 1:
        raise InvalidRequestError(f"--route-threshold must be in [0, 1], got {c.route_threshold}.")
    check_router_settings(c.router_c, c.classifier_weight, c.lexical_weight, c.lexical_c, c.max_false_positive)
    if (c.routing_data or c.data_dir or c.icl_path) and c.classifier_weight + c.lexical_weight < 1:
        raise InvalidRequestError(
            "A mixed safety score is calibrated with the vote of the packaged routing set, which requests meet at "
            "run time; with --routing-data, --data-dir or --icl-path, the classifiers must make up the whole score: "
            "pass --classifier-weight and --lexical-weight that add up to 1 (e.g. --classifier-weight 1 "
            "--lexical-weight 0)."
        )
    artifact = prompt_for_model(c.base_model_name, c.prompt_path)
    pool = load_icl_pool(c.icl_path)
    routing_file, train_file = packaged_routing_files()
    if c.data_dir is not None:
        train_file = Path(c.data_dir).expanduser()
        train_file = train_file / "train.jsonl" if train_file.is_dir() else train_file
    items = routing_set(pool, [c.routing_data or routing_file, train_file])
    voters = [True] * len(items)
    if not c.no_form_data:
        known = {item.query for item in items}
        forms = [f for f in read_labelled_queries(c.form_data or packaged_form_file()) if f.query not in known]
        items, voters = items + forms, voters + [False] * len(forms)
    retriever = ICLRetriever(pool)
    queries = [item.query for item in items]
    old = RoutingSettings.from_dict(artifact.routing) if artifact.routing else RoutingSettings()
    classifier, lexical, threshold = fit_router(
        queries,
        [item.harmful for item in items],
        retriever.embed(queries),
        retriever.embedding_model,
        c=c.router_c,
        weight=c.classifier_weight,
        lexical_weight=c.lexical_weight,
        lexical_c=c.lexical_c,
        neighbours=old.neighbours,
        temperature=old.temperature,
        max_false_positive=c.max_false_positive,
        threshold=c.route_threshold,
        seed=c.seed,
        voters=voters,
        groups=[item.group or item.query for item in items],
    )
    # The vote that the classifier is mixed with is the one it was calibrated with: the routing set's.
    whole = classifier.weight + (lexical.weight if lexical is not None else 0.0) >= 1 - 1e-9
    vote_set = old.vote_set if whole else "labelled"
    routing = replace(old, threshold=threshold, vote_set=vote_set, classifier=classifier, lexical=lexical).to_dict()
    output = Path(c.output) if c.output else Path(c.log_dir) / "optimized_prompt.json"
    save_prompt_artifact(replace(artifact, routing=routing, source=None), output)
    p = classifier.provenance
    summary = (
        f"router: {p['queries']} queries ({p['harmful']} harmful), classifier weight {classifier.weight}, "
        f"lexical weight {lexical.weight if lexical is not None else 0}, "
        f"threshold {threshold}; cross-validated: {p['cv_recall']:.1%} of harmful queries to safety, "
        f"{p['cv_false_positive']:.1%} of the others -> {output}"
    )
    return TrainResult(output, summary)
