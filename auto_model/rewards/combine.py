"""Which reward to use, from a spec, and weighted combinations of rewards.

A spec names one reward, optionally with a weight after ``@``:

==========================  ===============================================================
``llm``                     the LLM judge (scores 1 to 5, with rationales)
``rm:PATH``                 a reward model trained by ``auto-model-rm train`` (logits)
``metric:NAME``             a programmatic metric (:data:`~auto_model.rewards.metrics.METRICS`; 0 to 1)
``metric:NAME@0.5``         the same, weighted 0.5 in a combination (default weight 1)
==========================  ===============================================================

Several specs make a :class:`WeightedReward`: each item gets every part's aspects (named
``part/aspect``) and, as its overall value, the weighted mean of the parts' overall values. An item
that any part could not score is not scored. Parts keep their own scales, so choose the weights
with them in mind (a reward model's logits often span several units, a metric 0 to 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.rewards.base import Reward, RewardItem, Score, reward_failures, reward_scale

KINDS = ("llm", "rm", "metric")


@dataclass(frozen=True)
class RewardSpec:
    """One parsed ``--reward`` value."""

    kind: str  # "llm", "rm" or "metric"
    argument: str | None  # the reward model's folder, or the metric's name
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.kind if self.argument is None or self.kind == "rm" else f"{self.kind}:{self.argument}"

    def __str__(self) -> str:
        """The spec as written (``rm:PATH@0.5``), the weight left out where it is 1."""
        body = self.kind if self.argument is None else f"{self.kind}:{self.argument}"
        return body if self.weight == 1 else f"{body}@{self.weight:g}"

    @classmethod
    def parse(cls, text: str) -> RewardSpec:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError("A reward spec is 'llm', 'rm:PATH' or 'metric:NAME', optionally with '@WEIGHT'.")
        body, at, weight_text = text.strip().rpartition("@") if "@" in text else (text.strip(), "", "")
        weight = 1.0
        if at:
            try:
                weight = float(weight_text)
            except ValueError:
                raise InvalidRequestError(
                    f"The weight in reward spec {text!r} must be a number, got {weight_text!r}."
                ) from None
            if not weight > 0:
                raise InvalidRequestError(f"The weight in reward spec {text!r} must be above 0.")
        kind, colon, argument = body.partition(":")
        if kind not in KINDS:
            raise InvalidRequestError(
                f"Unknown reward {body!r}; use 'llm', 'rm:PATH' (a folder from auto-model-rm train) or 'metric:NAME'."
            )
        if kind == "llm" and colon:
            raise InvalidRequestError(
                f"The LLM judge takes no argument ({text!r}); its models are the --*-model-name options."
            )
        if kind != "llm" and not argument:
            needed = "PATH" if kind == "rm" else "NAME"
            raise InvalidRequestError(f"Reward {kind!r} needs an argument: {kind}:{needed}.")
        return cls(kind, argument or None, weight)


def parse_reward_specs(texts: Sequence[str] | str) -> list[RewardSpec]:
    """Parse ``--reward`` values (each may also hold several specs separated by commas)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    specs = [RewardSpec.parse(part) for text in texts for part in str(text).split(",") if part.strip()]
    if not specs:
        raise InvalidRequestError("Give at least one reward: 'llm', 'rm:PATH' or 'metric:NAME'.")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InvalidRequestError(f"A reward is named twice in {', '.join(labels)}.")
    return specs


def check_reward_specs(specs: Sequence[RewardSpec]) -> None:
    """What can be checked before any engine loads: metric names, reward-model folders."""
    from auto_model.rewards.metrics import METRICS
    from auto_model.rewards.reward_model import check_reward_model_folder

    for spec in specs:
        if spec.kind == "metric" and spec.argument not in METRICS:
            raise InvalidRequestError(f"Unknown metric {spec.argument!r}; choose from {', '.join(METRICS)}.")
        if spec.kind == "rm":
            check_reward_model_folder(str(spec.argument), "The reward model")


def build_reward(specs: Sequence[RewardSpec], llm: Callable[[], Reward] | None = None) -> Reward:
    """The reward the specs name; ``llm`` makes the LLM judge where one is named."""
    parts: list[tuple[str, Reward, float]] = []
    for spec in specs:
        if spec.kind == "llm":
            if llm is None:
                raise InvalidRequestError("The LLM judge is not available here; use 'rm:PATH' or 'metric:NAME'.")
            reward = llm()
        elif spec.kind == "rm":
            from auto_model.rewards.reward_model import RewardModelReward

            reward = RewardModelReward(str(spec.argument))
        else:
            from auto_model.rewards.metrics import MetricReward

            reward = MetricReward(str(spec.argument))
        parts.append((spec.label, reward, spec.weight))
    if len(parts) == 1 and parts[0][2] == 1.0:
        return parts[0][1]
    return WeightedReward(parts)


@dataclass(frozen=True)
class WeightedScore:
    """A :class:`~auto_model.rewards.base.Score` of a :class:`WeightedReward`."""

    values: Mapping[str, float] | None
    rationales: Mapping[str, str | None] | None
    error: str | None
    reward: float | None
    unanswered: bool = False
    parts: Mapping[str, float | None] | None = None  # each part's overall value

    def to_dict(self) -> dict[str, Any]:
        rationales = self.rationales or {}
        return {
            "aspects": list(self.values or ()),
            "scores": None
            if self.values is None
            else {a: {"rationale": rationales.get(a), "score": v} for a, v in self.values.items()},
            "reward": self.reward,
            "parts": dict(self.parts or {}),
            "error": self.error,
            "attempts": 1,
            "aspects_failed": False,
        }


class WeightedReward:
    """Several rewards at once: ``parts`` is ``(label, reward, weight)``; see the module docstring."""

    def __init__(self, parts: Sequence[tuple[str, Reward, float]]):
        if not parts:
            raise InvalidRequestError("A weighted reward needs at least one part.")
        if any(not w > 0 for _, _, w in parts):
            raise InvalidRequestError("Every weight of a weighted reward must be above 0.")
        self.parts = list(parts)
        scales = {reward_scale(reward) for _, reward, _ in self.parts}
        #: the parts' common scale, or None when they differ (or one has no top)
        self.scale: tuple[float, float] | None = scales.pop() if len(scales) == 1 else None

    @property
    def failures(self) -> list[Any]:
        return [f for _, reward, _ in self.parts for f in reward_failures(reward)]

    def score(self, items: Sequence[RewardItem]) -> list[WeightedScore]:
        items = list(items)
        by_part = [(label, list(reward.score(items)), weight) for label, reward, weight in self.parts]
        total = sum(w for _, _, w in self.parts)
        out = []
        for i in range(len(items)):
            scores: list[tuple[str, Score, float]] = [(label, got[i], w) for label, got, w in by_part]
            failed = [(label, s) for label, s, _ in scores if s.values is None or s.reward is None]
            unanswered = any(getattr(s, "unanswered", False) for _, s, _ in scores)
            parts = {label: s.reward for label, s, _ in scores}
            if failed:
                error = "; ".join(f"{label}: {s.error or 'no score'}" for label, s in failed)
                out.append(WeightedScore(None, None, error, None, unanswered, parts))
                continue
            values = {f"{label}/{a}": v for label, s, _ in scores for a, v in (s.values or {}).items()}
            rationales = {f"{label}/{a}": r for label, s, _ in scores for a, r in (s.rationales or {}).items()}
            reward = sum(w * (s.reward or 0.0) for _, s, w in scores) / total
            out.append(WeightedScore(values, rationales, None, reward, unanswered, parts))
        return out


__all__ = ["KINDS", "RewardSpec", "WeightedReward", "WeightedScore", "build_reward", "check_reward_specs",
           "parse_reward_specs"]  # fmt: skip
