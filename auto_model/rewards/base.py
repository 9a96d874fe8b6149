"""The reward interface: (query, answer) items in, one score per item out.

Every judge of answers — the LLM judge (:class:`~auto_model.rewards.judge.Judge`), a trained reward
model (:class:`~auto_model.rewards.reward_model.RewardModelReward`), programmatic metrics
(:class:`~auto_model.rewards.metrics.MetricReward`) and weighted combinations of them
(:class:`~auto_model.rewards.combine.WeightedReward`) — takes a list of :class:`RewardItem` and
returns, in the same order, one :class:`Score` per item: a value per aspect, a rationale per aspect
where the reward gives one, the item's overall value, and the reason it failed where it could not
score the item. A failed item has no values; it is never turned into a number. The trainer and the
evaluation use rewards only through this.

Scales differ by reward: the LLM judge scores 1 to 5, metrics 0 to 1, a reward model gives
unbounded logits (comparable between answers it scored, not between models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from auto_model.errors import InvalidRequestError


@dataclass(frozen=True)
class RewardItem:
    """One answer to score.

    Attributes:
        query: the request the answer replies to.
        answer: the answer.
        aspects: what to score it on (e.g. ``("Helpfulness", "Safety")``); ``None`` lets the reward
            choose (the LLM judge asks its metrics model which aspects matter for the query).
        harmful: whether the query asks for something a careful assistant declines (None: unknown);
            the refusal metric needs it.
        finish_reason: how the answer ended (``"stop"`` or ``"length"``; None: unknown); the
            clean-ending metric needs it.
        looped: the SDK cut the answer where it started to loop (it did not end on its own).
    """

    query: str
    answer: str
    aspects: tuple[str, ...] | None = None
    harmful: bool | None = None
    finish_reason: str | None = None
    looped: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not isinstance(self.answer, str):
            raise InvalidRequestError("A RewardItem's query and answer must be strings.")
        if self.aspects is not None:
            if isinstance(self.aspects, str) or not all(isinstance(a, str) for a in self.aspects):
                raise InvalidRequestError(f"aspects must be a sequence of aspect names or None, got {self.aspects!r}.")
            object.__setattr__(self, "aspects", tuple(self.aspects))


@runtime_checkable
class Score(Protocol):
    """What a reward says about one item."""

    @property
    def values(self) -> Mapping[str, float] | None:
        """Aspect -> value; ``None`` when the item could not be scored (see :attr:`error`)."""

    @property
    def rationales(self) -> Mapping[str, str | None] | None:
        """Aspect -> the reward's reason for its value, where it gives one."""

    @property
    def error(self) -> str | None:
        """Why the item could not be scored, or None."""

    @property
    def reward(self) -> float | None:
        """The item's overall value (the mean over its aspects, or a combination's weighted mean);
        None when it could not be scored."""

    @property
    def unanswered(self) -> bool:
        """True when the reward's engine gave no reply at all for the item: an outage, not a judgement."""


@runtime_checkable
class Reward(Protocol):
    """Scores answers; see the module docstring. Two members are optional, and read only through
    :func:`reward_scale` and :func:`reward_failures`: ``scale = (low, high)``, the range of its values,
    which the optimizer is told (None or absent: no fixed range), and ``failures``, the records of
    the items it could not score (a judge's unparsable replies), which runs write beside their result."""

    def score(self, items: Sequence[RewardItem]) -> Sequence[Score]:
        """One :class:`Score` per item, in the order given."""


def reward_scale(reward: Reward) -> tuple[float, float] | None:
    """A reward's ``scale`` (None when it has none)."""
    return getattr(reward, "scale", None)


def reward_failures(reward: Reward) -> list[Any]:
    """A reward's ``failures`` so far (empty when it keeps none)."""
    return list(getattr(reward, "failures", ()))


@dataclass(frozen=True)
class ItemScore:
    """A plain :class:`Score`, for rewards that have nothing more to say than the interface asks."""

    values: Mapping[str, float] | None
    rationales: Mapping[str, str | None] | None = None
    error: str | None = None
    unanswered: bool = False

    @property
    def reward(self) -> float | None:
        return mean_value(self)


def mean_value(score: Score) -> float | None:
    """The mean over a score's aspects (None for a failed score)."""
    if not score.values:
        return None
    return sum(score.values.values()) / len(score.values)


def best_index(values: Sequence[float | None]) -> int:
    """The position of the highest value (an unscored one, None, never wins over a scored one; ties
    go to the first)."""
    return max(range(len(values)), key=lambda j: (values[j] is not None, values[j] or 0.0, -j))


def has_rationales(score: Score) -> bool:
    """True when the reward gave a reason for every aspect it scored."""
    return bool(score.values) and all((score.rationales or {}).get(a) for a in score.values or {})


def all_at_least(score: Score, threshold: float | None) -> bool:
    """True when every aspect of a scored item reaches ``threshold`` (never for None)."""
    return threshold is not None and bool(score.values) and all(v >= threshold for v in (score.values or {}).values())


def score_record(score: Score) -> dict[str, Any]:
    """A score as JSON (for checkpoints and logs): the form :class:`~auto_model.rewards.judge.Evaluation`
    writes, which :func:`score_from_record` reads back."""
    to_dict = getattr(score, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    values, rationales = score.values, score.rationales or {}
    return {
        "aspects": list(values or ()),
        "scores": None
        if values is None
        else {a: {"rationale": rationales.get(a), "score": v} for a, v in values.items()},
        "reward": score.reward,
        "error": score.error,
        "attempts": 1,
        "aspects_failed": False,
    }


def score_from_record(record: Mapping[str, Any]) -> ItemScore:
    """The score a :func:`score_record` holds."""
    scores = record.get("scores")
    if scores is None:
        return ItemScore(None, None, record.get("error"))
    return _RecordedScore(
        {a: s["score"] for a, s in scores.items()},
        {a: s.get("rationale") or None for a, s in scores.items()},
        record.get("error"),
        overall=record.get("reward"),
    )


@dataclass(frozen=True)
class _RecordedScore(ItemScore):
    overall: float | None = None

    @property
    def reward(self) -> float | None:
        return self.overall if self.overall is not None else mean_value(self)


__all__ = [
    "ItemScore",
    "best_index",
    "Reward",
    "RewardItem",
    "Score",
    "all_at_least",
    "has_rationales",
    "mean_value",
    "score_from_record",
    "score_record",
]
