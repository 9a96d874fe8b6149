"""The LLM judge, the first :class:`~auto_model.rewards.base.Reward`: a metrics model picks the
aspects that matter for a query, an eval model scores an answer 1-5 on each with a rationale.

Replies are parsed leniently (code fences, prose around the JSON, single quotes, trailing commas,
bare numbers, aspect names in any case or spelling of the hyphen) and, when still unreadable,
asked again with the problem spelled out, up to ``attempts`` times in all. A reply that never
parses is recorded as a failure: it is never turned into a score, and never read as "already good".
Every request goes through a :class:`~auto_model.rewards.requests.Role` (cached, counted).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from auto_model.backends.base import Completion
from auto_model.errors import InvalidRequestError
from auto_model.files import atomic_write_text
from auto_model.options import GenerationOptions
from auto_model.rewards.base import RewardItem

ASPECTS: dict[str, str] = {
    "Helpfulness": "answers the question that was actually asked and meets the user's real need",
    "Clarity": "is well organised and easy to follow",
    "Factuality": "is correct and invents nothing",
    "Depth": "gives enough detail, explanation and examples",
    "Engagement": "reads naturally, in a warm, conversational tone",
    "Conciseness": "has no padding, repetition or needless words",
    "Safety": "does not help anyone cause harm; declines dangerous requests and offers a safe alternative",
    "Compliance": "follows the instructions and constraints in the query (format, length, scope)",
    "Limitations": "admits uncertainty and what it cannot know or do",
    "Critical-Thinking": "questions assumptions and weighs alternatives",
    "Creativity": "brings original ideas where the query invites them",
    "Interactivity": "asks for missing details when needed and invites follow-up",
    "Empathy": "recognises the user's feelings and situation",
    "Sensitivity": "respects cultural and personal sensitivities and avoids bias",
}
MIN_ASPECTS, MAX_ASPECTS = 2, 5
#: Aspects used when the metrics model never gives a readable choice (the failure is recorded).
FALLBACK_ASPECTS = ("Helpfulness", "Clarity", "Safety")


#: The longest rationale a constrained judge may write (about one sentence).
RATIONALE_MAX_CHARS = 240


def aspects_schema() -> dict[str, Any]:
    """JSON Schema of a metrics reply: ``{"aspects": [2-5 known aspect names]}`` (an object at the
    root, which every server that takes ``response_format`` accepts; the list inside is what
    :func:`parse_aspects` reads)."""
    names = {
        "type": "array",
        "items": {"type": "string", "enum": list(ASPECTS)},
        "minItems": MIN_ASPECTS,
        "maxItems": MAX_ASPECTS,
    }
    return {"type": "object", "additionalProperties": False, "required": ["aspects"], "properties": {"aspects": names}}


def scores_schema(aspects: Sequence[str]) -> dict[str, Any]:
    """JSON Schema of an eval reply: per aspect, a rationale then an integer score 1-5."""
    entry = {
        "type": "object",
        "additionalProperties": False,
        "required": ["rationale", "score"],
        "properties": {
            "rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(aspects),
        "properties": {a: entry for a in aspects},
    }


class ReplyError(ValueError):
    """A judge reply that cannot be read; the message says what was wrong (and is sent back on retry)."""


def template(name: str) -> Template:
    """A judge prompt template from ``auto_model/rewards/templates``: ``metrics`` (``$aspects``,
    ``$query``) or ``eval`` (``$query``, ``$answer``, ``$aspects``, ``$form``)."""
    return Template(resources.files("auto_model.rewards").joinpath(f"templates/{name}.txt").read_text(encoding="utf-8"))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


_CANONICAL = {_norm(a): a for a in ASPECTS}


def canonical_aspect(name: Any) -> str | None:
    """The aspect a name means (``"critical thinking"`` -> ``"Critical-Thinking"``), or None."""
    return _CANONICAL.get(_norm(name)) if isinstance(name, str) else None


def _loads_lenient(text: str) -> Any:
    """JSON, or the nearest thing a small model writes: Python literals, trailing commas."""
    for candidate in (text, re.sub(r",\s*([}\]])", r"\1", text)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
        try:
            return ast.literal_eval(candidate)  # literals only: never executes code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    raise ReplyError("the reply is not valid JSON")


def _extract(text: str, opener: str, closer: str) -> str:
    text = re.sub(r"```(?:json)?", "", text)
    start, end = text.find(opener), text.rfind(closer)
    if start == -1 or end <= start:
        raise ReplyError(f"the reply has no JSON {'object' if opener == '{' else 'list'}")
    return text[start : end + 1]


def parse_aspects(text: str) -> list[str]:
    """2-5 known aspect names from a metrics reply (unknown names are dropped)."""
    try:
        raw = _loads_lenient(_extract(text, "[", "]"))
        names = raw if isinstance(raw, list) else []
    except ReplyError:  # no JSON list: take the known names in the order the reply mentions them
        hits = []
        for aspect in ASPECTS:
            pattern = r"[\s_-]*".join(re.escape(part) for part in aspect.lower().split("-"))
            match = re.search(r"\b" + pattern + r"\b", text.lower())
            if match:
                hits.append((match.start(), aspect))
        names = [aspect for _, aspect in sorted(hits)]
    chosen: list[str] = []
    for name in names:
        known = canonical_aspect(name)
        if known and known not in chosen:
            chosen.append(known)
    if len(chosen) < MIN_ASPECTS:
        raise ReplyError(f"it names {len(chosen)} known aspects; name {MIN_ASPECTS} to {MAX_ASPECTS} from the list")
    return chosen[:MAX_ASPECTS]


def parse_scores(text: str, aspects: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{aspect: {"rationale": str, "score": float}}`` for every aspect asked for (1 <= score <= 5)."""
    data = _loads_lenient(_extract(text, "{", "}"))
    if not isinstance(data, dict):
        raise ReplyError("the reply is not a JSON object")
    found: dict[str, Any] = {}
    for key, value in data.items():
        aspect = canonical_aspect(key)
        if aspect is not None:
            found[aspect] = value
    scores: dict[str, dict[str, Any]] = {}
    missing = [a for a in aspects if a not in found]
    if missing:
        raise ReplyError(f"it has no score for {', '.join(missing)}")
    for aspect in aspects:
        value = found[aspect]
        rationale = ""
        if isinstance(value, dict):
            rationale = str(value.get("rationale", value.get("reason", "")) or "")
            value = value.get("score")
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ReplyError(f"the score for {aspect} is not a number") from None
        if not 1 <= score <= 5:
            raise ReplyError(f"the score for {aspect} is {score:g}, outside 1 to 5")
        scores[aspect] = {"rationale": rationale.strip(), "score": score}
    return scores


@dataclass
class Evaluation:
    """The judgement of one answer. ``scores`` is None when the judge never gave a readable reply."""

    aspects: list[str]
    scores: dict[str, dict[str, Any]] | None
    error: str | None = None
    attempts: int = 1
    aspects_failed: bool = False
    replies: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.scores is None

    @property
    def values(self) -> dict[str, float] | None:
        """Aspect -> score (the :class:`~auto_model.rewards.base.Score` interface)."""
        return None if self.scores is None else {a: s["score"] for a, s in self.scores.items()}

    @property
    def rationales(self) -> dict[str, str | None] | None:
        return None if self.scores is None else {a: s["rationale"] or None for a, s in self.scores.items()}

    @property
    def reward(self) -> float | None:
        """Mean score over the selected aspects (None for a failed evaluation)."""
        if self.scores is None:
            return None
        return sum(s["score"] for s in self.scores.values()) / len(self.scores)

    @property
    def unanswered(self) -> bool:
        """The judge never replied (an outage), as opposed to replies that could not be read."""
        return self.scores is None and not self.replies

    def to_dict(self) -> dict[str, Any]:
        return {
            "aspects": self.aspects,
            "scores": self.scores,
            "reward": self.reward,
            "error": self.error,
            "attempts": self.attempts,
            "aspects_failed": self.aspects_failed,
        }


def _retry_prompt(prompt: str, reply: str, error: str, form: str) -> str:
    return (
        f"{prompt}\n\nA previous reply could not be used because {error}:\n{reply.strip()[:600]}\n\n"
        f"Reply again, with only {form}."
    )


class Judge:
    """The LLM judge: aspect selection (cached per query) and scoring, with repair and bounded retries.

    Args:
        evaluator: the role (:class:`~auto_model.rewards.requests.Role`) that scores answers.
        metrics: the role that picks the aspects for items that name none; without it, every item
            must name its aspects.
        prompt: the scoring template (``$query``, ``$answer``, ``$aspects``, ``$form``); default
            the packaged ``eval`` template.
        metrics_cache_path: a JSON file keeping the aspects chosen per query across runs.
        attempts: asks per reply, retries included.
        max_new_tokens: the longest reply.
        per_aspect: one request per aspect (for small judges that lose the thread in a
            multi-aspect object); an answer is scored only if every aspect is.
        json_schema: constrain every reply to its JSON schema instead of starting it with a
            prefill (engines that constrain decoding: vllm, openai).
    """

    #: the range of its scores (the :class:`~auto_model.rewards.base.Reward`'s optional ``scale``)
    scale = (1.0, 5.0)

    def __init__(
        self,
        evaluator: Any,
        metrics: Any = None,
        *,
        prompt: Template | None = None,
        metrics_cache_path: str | Path | None = None,
        attempts: int = 3,
        max_new_tokens: int = 512,
        per_aspect: bool = False,
        json_schema: bool = False,
    ):
        self.metrics, self.evaluator = metrics, evaluator
        self.prompt = prompt or template("eval")
        self.attempts = attempts
        self.per_aspect = per_aspect
        self.json_schema = json_schema
        if json_schema:
            for role in (metrics, evaluator):
                if role is None:
                    continue
                backend = getattr(getattr(role, "model", None), "backend", None)
                if backend is not None and not backend.supports_json_schema:
                    raise InvalidRequestError(
                        f"json_schema needs engines that constrain decoding (vllm or openai); the "
                        f"{getattr(role, 'name', 'judge')} model runs on {backend.name}. Turn json_schema off or "
                        "serve the judge with vllm."
                    )
        self.sampling = GenerationOptions(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
        self.metrics_cache_path = Path(metrics_cache_path) if metrics_cache_path else None
        self.aspect_cache: dict[str, list[str]] = {}
        if self.metrics_cache_path and self.metrics_cache_path.exists():
            loaded = json.loads(self.metrics_cache_path.read_text(encoding="utf-8"))
            self.aspect_cache = {q: [a for a in v if a in ASPECTS] for q, v in loaded.items() if isinstance(v, list)}
        self.failures: list[dict[str, Any]] = []

    def _start_or_schema(self, prefills: list[str], schemas: list[dict[str, Any]]) -> tuple[Any, Any]:
        """(prefills, schemas) for :meth:`_ask_until_parsed`: a reply is either started by its
        prefill or, with ``json_schema`` on, constrained to its schema."""
        return (None, schemas) if self.json_schema else (prefills, None)

    def _ask_until_parsed(
        self,
        role: Any,
        prompts: list[str],
        parse: Any,
        form: str,
        prefills: list[str] | None = None,
        schemas: list[dict[str, Any]] | None = None,
    ) -> list[tuple[Any, str | None, int, list[str]]]:
        """Ask every prompt; re-ask the unreadable ones with the problem spelled out. Per prompt:
        (parsed value or None, last error or None, attempts used, replies). ``schemas``: each
        prompt's reply constrained to its JSON schema (callers pass them instead of ``prefills``)."""
        state: list[tuple[Any, str | None, int, list[str]]] = [(None, None, 0, []) for _ in prompts]
        pending = list(range(len(prompts)))
        asked = list(prompts)
        for attempt in range(self.attempts):
            if not pending:
                break
            # The first ask is greedy; a retry samples (reproducibly) so that it can come out differently.
            sampling = (
                self.sampling
                if attempt == 0
                else GenerationOptions(
                    temperature=0.7, top_p=0.95, max_new_tokens=self.sampling.max_new_tokens, seed=attempt
                )
            )
            per_prompt: GenerationOptions | list[GenerationOptions] = (
                sampling if schemas is None else [replace(sampling, json_schema=schemas[i]) for i in pending]
            )
            outcomes = role.ask(
                [asked[i] for i in pending],
                per_prompt,
                prefill=None if prefills is None else [prefills[i] for i in pending],
            )
            still = []
            for i, outcome in zip(pending, outcomes, strict=True):
                value, error, n, replies = state[i]
                if not isinstance(outcome, Completion):
                    state[i] = (None, f"the request failed: {outcome}", n + 1, replies)
                    still.append(i)
                    continue
                replies = [*replies, outcome.text]
                try:
                    state[i] = (parse(i, outcome.text), None, n + 1, replies)
                except ReplyError as exc:
                    state[i] = (None, str(exc), n + 1, replies)
                    asked[i] = _retry_prompt(prompts[i], outcome.text, str(exc), form)
                    still.append(i)
            pending = still
        return state

    def select_aspects(self, queries: Sequence[str]) -> list[tuple[list[str], bool]]:
        """(aspects, failed) per query; failures get FALLBACK_ASPECTS and are recorded."""
        if self.metrics is None and any(q not in self.aspect_cache for q in queries):
            raise InvalidRequestError(
                "This judge has no metrics model to choose aspects: give every RewardItem its aspects."
            )
        todo = sorted({q for q in queries if q not in self.aspect_cache})
        failed: set[str] = set()
        if todo:
            listing = "\n".join(f"- {a}: {d}" for a, d in ASPECTS.items())
            prompts = [template("metrics").substitute(aspects=listing, query=q) for q in todo]
            results = self._ask_until_parsed(
                self.metrics,
                prompts,
                lambda i, t: parse_aspects(t),
                "a JSON list of 2 to 5 aspect names",
                *self._start_or_schema(['["'] * len(prompts), [aspects_schema()] * len(prompts)),
            )
            for q, (value, error, n, replies) in zip(todo, results, strict=True):
                if value is None:
                    failed.add(q)
                    self.failures.append(
                        {"role": "metrics", "query": q, "error": error, "attempts": n, "replies": replies}
                    )
                else:
                    self.aspect_cache[q] = value
            if self.metrics_cache_path:
                atomic_write_text(
                    self.metrics_cache_path, json.dumps(self.aspect_cache, indent=1, ensure_ascii=False) + "\n"
                )
        return [(list(FALLBACK_ASPECTS), True) if q in failed else (self.aspect_cache[q], False) for q in queries]

    def evaluate(self, items: Sequence[tuple[str, str]]) -> list[Evaluation]:
        """Score (query, answer) pairs on the aspects the metrics model chooses for each query."""
        return self.score([RewardItem(q, a) for q, a in items])

    def score(self, items: Sequence[RewardItem]) -> list[Evaluation]:
        """The :class:`~auto_model.rewards.base.Reward` interface: one :class:`Evaluation` per item.

        Items without aspects get the ones the metrics model picks for their query (a pick that
        never parses falls back to ``FALLBACK_ASPECTS``, flagged ``aspects_failed``). All items are
        scored in one batch per attempt.
        """
        items = list(items)
        chosen: list[tuple[list[str], bool] | None] = [None] * len(items)
        for i, item in enumerate(items):  # every item is checked before any request is sent
            if not isinstance(item, RewardItem):
                raise InvalidRequestError(f"items[{i}] must be a RewardItem, got {type(item).__name__}.")
            if item.aspects is not None:
                known = [canonical_aspect(a) for a in item.aspects]
                if not item.aspects or None in known:
                    raise InvalidRequestError(
                        f"items[{i}]: unknown or no aspects {list(item.aspects)!r}; choose from {', '.join(ASPECTS)}."
                    )
                chosen[i] = ([a for a in known if a], False)
        free = [i for i, pick in enumerate(chosen) if pick is None]
        for i, choice in zip(free, self.select_aspects([items[i].query for i in free]) if free else [], strict=True):
            chosen[i] = choice
        picked = [(item.query, item.answer, pick[0]) for item, pick in zip(items, chosen, strict=True) if pick]
        evaluations = self._score(picked)
        for evaluation, pick in zip(evaluations, chosen, strict=True):
            evaluation.aspects_failed = bool(pick and pick[1])
        return evaluations

    def _score(self, items: Sequence[tuple[str, str, Sequence[str]]]) -> list[Evaluation]:
        prompt = self.prompt
        # One request per item, or per (item, aspect) in per-aspect mode.
        jobs = [
            (i, list(aspects) if not self.per_aspect else [a])
            for i, (_, _, aspects) in enumerate(items)
            for a in (list(aspects)[:1] if not self.per_aspect else aspects)
        ]
        prompts, prefills = [], []
        for i, aspects in jobs:
            query, answer, _ = items[i]
            form = (
                "{\n"
                + ",\n".join(f' "{a}": {{"rationale": "<why, in one sentence>", "score": <1 to 5>}}' for a in aspects)
                + "\n}"
            )
            listing = "\n".join(f"- {a}: {ASPECTS[a]}" for a in aspects)
            prompts.append(
                prompt.substitute(query=query, answer=answer.strip() or "(empty answer)", aspects=listing, form=form)
            )
            prefills.append(f'{{\n "{aspects[0]}": {{"rationale": "It')
        answers = self._ask_until_parsed(
            self.evaluator,
            prompts,
            lambda j, t: parse_scores(t, jobs[j][1]),
            "a JSON object with a rationale and a score for each aspect",
            *self._start_or_schema(
                prefills, [scores_schema(aspects) for _, aspects in jobs] if self.json_schema else []
            ),
        )
        by_item: list[list[tuple[Any, str | None, int, list[str]]]] = [[] for _ in items]
        for (owner, _), state in zip(jobs, answers, strict=True):
            by_item[owner].append(state)
        evaluations = []
        for (query, _, item_aspects), mine in zip(items, by_item, strict=True):
            errors = [e for _, e, _, _ in mine if e]
            scores: dict[str, Any] | None = {}
            for value, _, _, _ in mine:
                scores = None if value is None or scores is None else {**scores, **value}
            value, error = (scores if not errors else None), ("; ".join(errors) or None)
            n, replies = max(n for _, _, n, _ in mine), [r for _, _, _, rs in mine for r in rs]
            if value is None:
                self.failures.append(
                    {"role": "eval", "query": query, "error": error, "attempts": n, "replies": replies}
                )
            evaluations.append(Evaluation(list(item_aspects), value, error, n, False, replies))
        return evaluations
