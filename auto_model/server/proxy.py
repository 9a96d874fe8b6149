"""The model of ``auto-model serve --upstream``: its alignment, and no engine.

In front of an upstream the server generates nothing itself: it aligns each request (the model's
:class:`~auto_model.aligner.Aligner`: the artifact, the pool, the router, the answer check),
forwards it, and checks and reranks what comes back. :class:`ProxiedModel` is what that needs —
the aligner, assembling prompts as the upstream's OpenAI-compatible API takes them
(:func:`~auto_model.backends.openai.server_target`), and the reward that picks the best of several
answers (:class:`~auto_model.rewards.best_of.BestOf`) — and loads no engine and opens no
connection. An in-process server gets an :class:`~auto_model.AutoModel` instead, which is both.
"""

from __future__ import annotations

import os
from typing import Any

from auto_model.aligner import Aligner
from auto_model.backends.openai import server_target
from auto_model.rewards.best_of import BestOf
from auto_model.server.upstream import Upstream


class ProxiedModel:
    """A model an upstream serves, aligned here.

    Args:
        model_name: the model's name (its artifact is the one :class:`~auto_model.AutoModel` would
            load for it).
        upstream: the server that generates (its URL decides the decoding settings it takes).
        prompt_path, icl_path, embedding_model, reward_model: as for :class:`~auto_model.AutoModel`.
        prompt_format: ``"chat"`` (the default: the upstream gets chat messages) or ``"base"``.
    """

    def __init__(
        self,
        model_name: str,
        upstream: Upstream,
        *,
        prompt_path: str | os.PathLike[str] | None = None,
        icl_path: str | os.PathLike[str] | None = None,
        embedding_model: str | None = None,
        reward_model: str | os.PathLike[str] | Any = None,
        prompt_format: str = "chat",
    ):
        self.model_name = model_name
        self.best_of = BestOf(reward_model)
        target = server_target(model_name, upstream.base_url, prompt_format)
        self.aligner = Aligner.for_model(model_name, prompt_path, icl_path, embedding_model, target)

    def close(self) -> None:
        """Nothing to release: no engine, no connection (the server owns its upstream client)."""

    def __repr__(self) -> str:
        return f"ProxiedModel(model_name={self.model_name!r}, prompt={self.aligner.prompt_artifact.model_id!r})"


__all__ = ["ProxiedModel"]
