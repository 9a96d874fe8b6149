"""Everyday quality without a judge: a reward model's preference of each configuration over a
baseline (usually the model alone), on the same items.

Every answer is scored by the reward model (``auto-model-eval --reward-model PATH``, a folder from
``auto-model-rm train``) against its query, in one batched pass. For a configuration and the
baseline, an item is a *win* when the configuration's answer scores higher, a *tie* when they
score the same (within :data:`TIE`), a *loss* otherwise. The *win rate* counts a tie as half a win;
its 95% interval is a percentile bootstrap over the items (a fixed seed, so a report is the same
every time it is rendered). Only regular items count: a refusal's reward says little about
everyday quality, and safety has its own proxies.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from auto_model.rewards.base import RewardItem

#: reward differences smaller than this are ties
TIE = 1e-6
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def score_answers(answers: Sequence[Any], reward_model: str | os.PathLike[str]) -> None:
    """Set ``.reward`` on every answer that has text, scored by the reward model in one pass."""
    from auto_model.rewards.reward_model import RewardModelReward

    todo = [a for a in answers if a.text is not None]
    scores = RewardModelReward(reward_model).score([RewardItem(a.item.query, a.text) for a in todo])
    for answer, score in zip(todo, scores, strict=True):
        answer.reward = score.reward


def preference(records: Sequence[dict[str, Any]], configs: Sequence[str], baseline: str) -> list[dict[str, Any]]:
    """Each configuration's reward-model preference over ``baseline`` on the regular items both
    answered: wins, ties, losses, the win rate (a tie is half a win) and its 95% bootstrap interval."""
    rewards = {(r["config"], r["id"]): r.get("reward") for r in records if r["kind"] == "regular"}
    ids = list(dict.fromkeys(r["id"] for r in records if r["kind"] == "regular"))
    rows = []
    for name in configs:
        if name == baseline:
            continue
        outcomes = []  # 1 win, 0.5 tie, 0 loss
        for item in ids:
            a, b = rewards.get((name, item)), rewards.get((baseline, item))
            if a is None or b is None:
                continue
            outcomes.append(0.5 if abs(a - b) < TIE else float(a > b))
        n = len(outcomes)
        low, high = _bootstrap(outcomes)
        rows.append(
            {
                "config": name,
                "baseline": baseline,
                "n": n,
                "win": sum(o == 1.0 for o in outcomes),
                "tie": sum(o == 0.5 for o in outcomes),
                "loss": sum(o == 0.0 for o in outcomes),
                "win_rate": sum(outcomes) / n if n else None,
                "ci95": [low, high] if n else None,
            }
        )
    return rows


def _bootstrap(outcomes: Sequence[float]) -> tuple[float | None, float | None]:
    if not outcomes:
        return None, None
    rng = random.Random(BOOTSTRAP_SEED)
    n = len(outcomes)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    return means[int(0.025 * BOOTSTRAP_SAMPLES)], means[int(0.975 * BOOTSTRAP_SAMPLES) - 1]


def mean_reward(records: Sequence[dict[str, Any]], config: str) -> float | None:
    values = [
        r["reward"] for r in records if r["config"] == config and r["kind"] == "regular" and r.get("reward") is not None
    ]
    return sum(values) / len(values) if values else None


__all__ = ["preference", "score_answers", "mean_reward"]
