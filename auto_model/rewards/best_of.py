"""Best-of-n: the reward that picks the best of several sampled answers (``best_of``).

:class:`BestOf` holds a reward — a reward model folder from ``auto-model-rm train`` (loaded on
first use) or any object with the reward interface's ``score`` — and reranks the outcomes of
requests that sampled several answers. An engine owns one (:attr:`auto_model.engine.Engine.best_of`);
the server's proxy mode, which has no engine, owns its own.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from auto_model.backends.base import Completion, Outcome
from auto_model.errors import InvalidRequestError
from auto_model.prompting import strip_markers
from auto_model.rewards.base import RewardItem, best_index
from auto_model.rewards.reward_model import RewardModelReward, check_reward_model_folder


def check_reward_model(source: Any) -> Any:
    """``reward_model`` checked before any engine loads: None, a reward model folder (from
    ``auto-model-rm train``), or any object with the reward interface's ``score``."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return check_reward_model_folder(source)
    if not callable(getattr(source, "score", None)):
        raise InvalidRequestError(
            f"reward_model must be a folder from auto-model-rm train or a reward with .score(items), got "
            f"{type(source).__name__}."
        )
    return source


class BestOf:
    """The reward that picks the best of several sampled answers, or none."""

    def __init__(self, reward: Any = None):
        """``reward``: a reward model folder, any reward with ``score``, or None; checked here
        (:func:`check_reward_model`), so a bad folder fails before any engine loads."""
        self._source = check_reward_model(reward)
        self._reward: Any = None
        self._lock = threading.Lock()  # concurrent first calls load one reward model

    @property
    def reward(self) -> Any:
        """The reward that picks the best of ``best_of`` answers (loaded on first use), or None."""
        if self._reward is None and self._source is not None:
            with self._lock:
                if self._reward is None:
                    source = self._source
                    if isinstance(source, (str, os.PathLike)):
                        source = RewardModelReward(source)
                    self._reward = source
        return self._reward

    @reward.setter
    def reward(self, reward: str | os.PathLike[str] | Any) -> None:
        source = check_reward_model(reward)
        with self._lock:
            if source is not self._source and source != self._source:  # the same one stays loaded
                self._source, self._reward = source, None

    @property
    def reward_id(self) -> str | None:
        """What names :attr:`reward` in request caches: a reward model folder by the SHA-256 of its
        ``reward_model.json`` (a retrained model is another reward), another reward by its type."""
        source = self._source
        if source is None:
            return None
        if isinstance(source, (str, os.PathLike)):
            digest = hashlib.sha256((Path(source) / "reward_model.json").read_bytes()).hexdigest()[:16]
            return f"rm:{digest}"
        return type(source).__name__

    def check(self, n: int, streaming: bool = False) -> None:
        """Several answers to choose from need a reward to choose with, and finished answers."""
        if n > 1 and streaming:
            raise InvalidRequestError("best_of chooses among finished answers, so it cannot stream; use generate().")
        if n > 1 and self._source is None:
            raise InvalidRequestError(
                f"best_of={n} needs a reward model to choose with: AutoModel(..., reward_model=PATH) "
                "(a folder from auto-model-rm train)."
            )

    def rerank(self, queries: Sequence[str], outcomes: Sequence[Outcome]) -> list[Outcome]:
        """For each query's outcome that carries several samples (a request with ``best_of`` > 1),
        the best sample by :attr:`reward`, with every sample's score on ``.scores``; all samples of
        all queries are scored in one call. Other outcomes come back unchanged."""
        if len(queries) != len(outcomes):
            raise InvalidRequestError(f"rerank needs one query per outcome, got {len(queries)} and {len(outcomes)}.")
        owners = [i for i, o in enumerate(outcomes) if isinstance(o, Completion) and o.samples]
        if not owners:
            return list(outcomes)
        self.check(max(len(o.samples) for o in outcomes if isinstance(o, Completion)))
        items = [
            RewardItem(queries[i], strip_markers(s.text), finish_reason=s.finish_reason, looped=s.looped)
            for i in owners
            for s in outcomes[i].samples  # type: ignore[union-attr]
        ]
        scores = iter(self.reward.score(items))
        out = list(outcomes)
        for i in owners:
            completion = outcomes[i]
            assert isinstance(completion, Completion)
            values = tuple(next(scores).reward for _ in completion.samples)
            best = best_index(values)
            chosen = completion.samples[best]
            out[i] = replace(
                chosen,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                samples=completion.samples,
                scores=values,
            )
        return out


__all__ = ["BestOf", "check_reward_model"]
