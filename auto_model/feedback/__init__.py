"""Synthetic feedback (ALMoST): prompts a model writes from seeds (``pg``,
:func:`~auto_model.feedback.prompts.generate_prompts`), responses by configuration (``rg``,
:func:`~auto_model.feedback.responses.generate_responses`), comparisons ranked by rules of thumb
(``cs``, :func:`~auto_model.feedback.comparisons.compare`), and a reward model trained on them
(:func:`~auto_model.feedback.reward_model.train_reward_model`, :class:`RewardModel`).

Command lines: ``auto-model-feedback --mode pg|rg|cs`` and ``auto-model-rm train|score|eval|refusals``.
"""

from __future__ import annotations

from auto_model.feedback.comparisons import COMPARISONS_FORMAT, compare, response_problem
from auto_model.feedback.reward_model import RewardModel, train_reward_model

__all__ = ["COMPARISONS_FORMAT", "RewardModel", "compare", "response_problem", "train_reward_model"]
