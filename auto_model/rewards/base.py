"""The reward interface: (query, answer) items in, one score per item out.

Every judge of answers — the LLM judge today (:class:`~auto_model.rewards.judge.Judge`), a reward
model and programmatic metrics next — takes a list of :class:`RewardItem` and returns, in the same
order, one :class:`Score` per item: a value per aspect, a rationale per aspect where the reward
gives one, and the reason it failed where it could not score the item. A failed item has no values;
it is never turned into a number. The trainer and the evaluation use rewards only through this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from auto_model.errors import InvalidRequestError


@dataclass(frozen=True)
class RewardItem:
    """One answer to score.

    Attributes:
        query: the request the answer replies to.
        answer: the answer.
        aspects: what to score it on (e.g. ``("Helpfulness", "Safety")``); ``None`` lets the reward
            choose (the LLM judge asks its metrics model which aspects matter for the query).
    """

    query: str
    answer: str
    aspects: tuple[str, ...] | None = None

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


@runtime_checkable
class Reward(Protocol):
    """Scores answers; see the module docstring."""

    def score(self, items: Sequence[RewardItem]) -> Sequence[Score]:
        """One :class:`Score` per item, in the order given."""


@dataclass(frozen=True)
class ItemScore:
    """A plain :class:`Score`, for rewards that have nothing more to say than the interface asks."""

    values: Mapping[str, float] | None
    rationales: Mapping[str, str | None] | None = None
    error: str | None = None


def mean_value(score: Score) -> float | None:
    """The mean over a score's aspects (None for a failed score)."""
    if not score.values:
        return None
    return sum(score.values.values()) / len(score.values)


__all__ = ["ItemScore", "Reward", "RewardItem", "Score", "mean_value"]
