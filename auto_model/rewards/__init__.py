"""Rewards: what judges answers, for the trainer and the evaluation alike.

:mod:`auto_model.rewards.base` holds the reward interface ((query, answer) items in, per-item scores
out); :mod:`auto_model.rewards.judge` the LLM judge, its first implementation;
:mod:`auto_model.rewards.reward_model` a trained reward model (``auto-model-rm``);
:mod:`auto_model.rewards.requests` the cached, counted LLM requests both are built on. Nothing here
imports the trainer or the evaluation.
"""

from auto_model.rewards.base import ItemScore, Reward, RewardItem, Score, mean_value

__all__ = ["ItemScore", "Reward", "RewardItem", "Score", "mean_value"]
