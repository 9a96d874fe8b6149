"""A trained reward model (``auto-model-rm train``) as a reward: the interface's items in, one score
per item out, in one batched pass.

A reward model gives one number per answer, so every score has one aspect, :data:`ASPECT`, whatever
aspects an item asks for; it gives no rationales. Its numbers are unbounded logits, comparable between
answers scored by the same model, not between models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.rewards.base import ItemScore, RewardItem

ASPECT = "Reward"


def check_reward_model_folder(path: str | os.PathLike[str], name: str = "reward_model") -> Path:
    """``path`` as a reward model folder (one written by ``auto-model-rm train``), checked before any
    model loads; ``name`` is what the caller calls it in the error."""
    folder = Path(path).expanduser()
    if not (folder / "reward_model.json").is_file():
        raise InvalidRequestError(
            f"{name} {str(path)!r} is not a reward model folder (no reward_model.json); train one with "
            "auto-model-rm train."
        )
    return folder


class RewardModelReward:
    """Scores (query, answer) items with a reward model: a folder written by ``auto-model-rm train``,
    or a loaded :class:`~auto_model.feedback.reward_model.RewardModel`."""

    #: logits have no top or bottom
    scale = None

    def __init__(self, model: str | os.PathLike[str] | Any, batch_size: int = 16):
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}.")
        if isinstance(model, (str, os.PathLike)):
            from auto_model.feedback.reward_model import RewardModel

            model = RewardModel.load(model)
        self.model = model
        self.batch_size = batch_size

    def score(self, items: Sequence[RewardItem]) -> list[ItemScore]:
        if not items:
            return []
        values = self.model.score([i.query for i in items], [i.answer for i in items], batch_size=self.batch_size)
        return [ItemScore({ASPECT: value}, {ASPECT: None}) for value in values]
