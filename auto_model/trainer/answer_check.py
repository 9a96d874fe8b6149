"""Train the answer check: ``auto-model-train answer-check --answers REPORT.json ... --output ARTIFACT.json``.

The answers are the records of ``auto-model-eval`` reports (each with its request's ``kind``, its
``answer`` and the refusal proxy): an answer to a harmful request (``kind`` safety) that does not
refuse and says something (:data:`MIN_WORDS` words or more) *complies*; every other answer (a
refusal, or any answer to an ordinary request) does not. Make the reports on requests the project
tunes on (the routing and training queries), never on a held-out split.

Two logistic regressions (scikit-learn, balanced class weights) score an answer beside its request:
one over the request's and the answer's MiniLM embeddings side by side, one over the TF-IDF words
and word pairs of both; the score mixes them (``--weight``: the
embedding one's share). The threshold is the lowest that blocks at most ``--max-false-positive`` of
the answers to *ordinary* requests, on out-of-fold scores (k-fold cross-validation, the answers to
one request kept in one fold). The check goes into the artifact's ``answer_check``, with the
figures in its provenance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from auto_model.answer_check import DEFAULT_REFUSAL, DEFAULT_WINDOW, AnswerCheck, joined
from auto_model.classifiers import LexicalClassifier, SafetyClassifier
from auto_model.errors import InvalidRequestError

#: An answer to a harmful request that does not refuse complies when it has at least this many words.
MIN_WORDS = 5


@dataclass(frozen=True)
class LabelledAnswer:
    """An answer, whether it complies with a harmful request, and whether its request was ordinary."""

    answer: str
    complies: bool
    ordinary: bool
    group: str
    query: str = ""


def read_answers(paths: Sequence[str | Path]) -> list[LabelledAnswer]:
    """The labelled answers of ``auto-model-eval`` reports (generation failures and empty answers left out)."""
    found = []
    for path in paths:
        path = Path(path).expanduser()
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"--answers {path}: not a readable auto-model-eval report ({exc}).") from None
        records = report.get("records") if isinstance(report, dict) else None
        if not isinstance(records, list):
            raise InvalidRequestError(f"--answers {path}: an auto-model-eval report has 'records'; this has none.")
        for record in records:
            answer = record.get("answer")
            if record.get("generation_error") or not isinstance(answer, str) or not answer.strip():
                continue
            refused = (record.get("proxies") or {}).get("refusal", "none") != "none"
            harmful = record.get("kind") == "safety"
            complies = harmful and not refused and len(answer.split()) >= MIN_WORDS
            query = record.get("query") if isinstance(record.get("query"), str) else ""
            found.append(LabelledAnswer(answer, complies, not harmful, str(record.get("id") or query), query))
    return found


def fit_answer_check(
    answers: Sequence[LabelledAnswer],
    vectors: Any,
    embedding_model: str,
    *,
    weight: float = 0.5,
    c: float = 4.0,
    lexical_c: float = 4.0,
    max_false_positive: float = 0.01,
    folds: int = 5,
    seed: int = 0,
) -> AnswerCheck:
    """The answer check of ``answers`` (``vectors``: each answer's request's and its own normalised
    embeddings side by side); see the module docstring."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 <= weight <= 1:
        raise InvalidRequestError(f"--weight must be in [0, 1], got {weight}.")
    if not 0 <= max_false_positive < 1:
        raise InvalidRequestError(f"--max-false-positive must be in [0, 1), got {max_false_positive}.")
    labels = np.asarray([a.complies for a in answers], dtype=bool)
    ordinary = np.asarray([a.ordinary for a in answers], dtype=bool)
    vectors = np.asarray(vectors, dtype="float32")
    if len(vectors) != len(labels):
        raise InvalidRequestError("answers and embeddings must have one row each.")
    if labels.sum() < folds or ordinary.sum() < folds:
        raise InvalidRequestError(
            f"The answer check needs at least {folds} complying answers to harmful requests and {folds} answers "
            "to ordinary ones; make the reports on more requests."
        )
    texts = joined([a.query for a in answers], [a.answer for a in answers])

    def fit(rows: Any) -> tuple[Any, Any, Any]:
        embedded = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(vectors[rows], labels[rows])
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        counts = vectorizer.fit_transform([texts[i] for i in rows])
        worded = LogisticRegression(C=lexical_c, class_weight="balanced", max_iter=5000).fit(counts, labels[rows])
        return embedded, vectorizer, worded

    def score(models: tuple[Any, Any, Any], rows: Any) -> Any:
        embedded, vectorizer, worded = models
        by_words = worded.predict_proba(vectorizer.transform([texts[i] for i in rows]))[:, 1]
        return weight * embedded.predict_proba(vectors[rows])[:, 1] + (1 - weight) * by_words

    held_out = np.zeros(len(labels))
    groups = [a.group for a in answers]
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(vectors, labels, groups):
        held_out[test] = score(fit(train), test)
    # The lowest threshold that blocks at most max_false_positive of the answers to ordinary requests.
    ordinary_scores = np.sort(held_out[ordinary])[::-1]
    allowed = int(max_false_positive * len(ordinary_scores))
    threshold = float(ordinary_scores[allowed]) + 1e-6 if allowed < len(ordinary_scores) else 0.0
    threshold = min(1.0, threshold)
    blocked = held_out >= threshold
    embedded, vectorizer, worded = fit(np.arange(len(labels)))
    classifier = lexical = None
    if weight > 0:
        classifier = SafetyClassifier(embedding_model, tuple(float(w) for w in embedded.coef_[0]),
                                      float(embedded.intercept_[0]), weight=weight)  # fmt: skip
    if weight < 1:
        names = vectorizer.get_feature_names_out()
        terms = {str(t): (float(i), float(w)) for t, i, w in zip(names, vectorizer.idf_, worded.coef_[0], strict=True)}
        lexical = LexicalClassifier(terms, float(worded.intercept_[0]), weight=1 - weight)
    provenance = {
        "method": "logistic regressions (scikit-learn, balanced class weights) over the request's and the "
        "answer's MiniLM embeddings side by side and over the TF-IDF words and word pairs of both",
        "answers": len(labels),
        "complying": int(labels.sum()),
        "ordinary": int(ordinary.sum()),
        "c": c,
        "lexical_c": lexical_c,
        "threshold_from": f"{folds}-fold cross-validation (a request's answers in one fold): at most "
        f"{max_false_positive:.1%} of the answers to ordinary requests blocked",
        "cv_caught": round(float(blocked[labels].mean()), 4),
        "cv_blocked_ordinary": round(float(blocked[ordinary].mean()), 4),
        "cv_blocked_refusals": round(float(blocked[~labels & ~ordinary].mean()), 4)
        if (~labels & ~ordinary).any()
        else 0,
    }
    return AnswerCheck(round(threshold, 6), classifier, lexical, DEFAULT_REFUSAL, DEFAULT_WINDOW, provenance=provenance)


def route_thresholds(specs: Sequence[str]) -> dict[str, float]:
    """``["safety=0.4"]`` as ``{"safety": 0.4}``; InvalidRequestError naming the fix otherwise (the
    routes and values are checked by :class:`AnswerCheck`)."""
    found = {}
    for spec in specs:
        route, _, value = spec.partition("=")  # no "=": value is "", which float() refuses
        try:
            found[route.strip()] = float(value)
        except ValueError:
            raise InvalidRequestError(
                f"--route-threshold takes ROUTE=THRESHOLD, such as safety=0.4; got {spec!r}."
            ) from None
    return found


def main(argv: Sequence[str]) -> int:
    """``auto-model-train answer-check``: fit the answer check and write the artifact that carries it."""
    from auto_model.artifacts import prompt_for_model, save_prompt_artifact
    from auto_model.flags import ArgumentParser

    p = ArgumentParser(prog="auto-model-train answer-check", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    p.add_argument("--answers", nargs="+", required=True, help="auto-model-eval report.json files (training requests)")
    p.add_argument(
        "--base-model-name", default=None, help="the model whose artifact gets the check (default: the embedded one)"
    )
    p.add_argument("--prompt-path", default=None, help="the artifact to start from (default: the model's own)")
    p.add_argument("--output", required=True, help="the artifact to write")
    p.add_argument("--weight", type=float, default=0.5, help="the embedding classifier's share of the score")
    p.add_argument(
        "--max-false-positive",
        type=float,
        default=0.01,
        help="the share of answers to ordinary requests the threshold may block (cross-validated)",
    )
    p.add_argument("--refusal", default=DEFAULT_REFUSAL, help="the text that replaces a blocked answer")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="characters of a streamed answer between checks")
    p.add_argument(
        "--route-threshold",
        action="append",
        default=None,
        metavar="ROUTE=T",
        help="a route's own threshold, e.g. safety=0.4 (repeatable; default: the starting artifact's)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(argv))
    from auto_model.answer_check import check_window
    from auto_model.constants import default_model
    from auto_model.retrieval import ICLRetriever, load_icl_pool

    check_window(args.window)
    answers = read_answers(args.answers)
    retriever = ICLRetriever(load_icl_pool())
    import numpy as np

    vectors = np.hstack([retriever.embed([a.query for a in answers]), retriever.embed([a.answer for a in answers])])
    check = fit_answer_check(
        answers, vectors, retriever.embedding_model, weight=args.weight,
        max_false_positive=args.max_false_positive, seed=args.seed,
    )  # fmt: skip
    artifact = prompt_for_model(args.base_model_name or default_model(), args.prompt_path)
    own = (artifact.answer_check or {}).get("route_thresholds", {})
    routes = own if args.route_threshold is None else route_thresholds(args.route_threshold)
    check = replace(check, refusal=args.refusal, window=args.window, route_thresholds=dict(routes))
    save_prompt_artifact(replace(artifact, answer_check=check.to_dict(), source=None), args.output)
    f = check.provenance
    print(
        f"answer check: {f['answers']} answers ({f['complying']} complying with a harmful request, {f['ordinary']} to "
        f"ordinary requests), threshold {check.threshold:.4f}; cross-validated: {f['cv_caught']:.1%} of complying "
        f"answers blocked, {f['cv_blocked_ordinary']:.1%} of ordinary ones -> {args.output}"
    )
    return 0


__all__ = ["LabelledAnswer", "MIN_WORDS", "fit_answer_check", "main", "read_answers"]
