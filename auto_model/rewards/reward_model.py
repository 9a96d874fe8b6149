"""A trained reward model (``auto-model-rm train``): the reader that scores with it (:class:`RewardModel`),
and the reward made of it: the interface's items in, one score per item out, in one batched pass.

A reward model gives one number per answer, so every score has one aspect, :data:`ASPECT`, whatever
aspects an item asks for; it gives no rationales. Its numbers are unbounded logits, comparable between
answers scored by the same model, not between models.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError, InvalidRequestError, MissingDependencyError, ModelNotFoundError
from auto_model.rewards.base import ItemScore, RewardItem

ASPECT = "Reward"
RM_FORMAT = "auto_model.reward_model/v1"
TEMPLATE = "Human: {prompt}\n\nAssistant: {response}"
RM_FILE = "reward_model.json"


def dialogue(prompt: str, response: str) -> str:
    """The text the reward model reads for one response (the end-of-text token is added after it)."""
    return TEMPLATE.format(prompt=prompt.strip(), response=response.strip())


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Training logs and bars on stderr; stdout stays for the command's result."""
    import transformers

    from auto_model.logs import engine_progress_bars

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:  # scoring needs no datasets
        bars = False
    try:
        with contextlib.redirect_stdout(sys.stderr), engine_progress_bars(False):  # no loading and saving bars
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


class RewardModel:
    """A trained reward model: :meth:`score` gives one number per (prompt, response); higher is better."""

    def __init__(self, model: Any, tokenizer: Any, info: dict[str, Any], path: Path):
        self.model, self.tokenizer, self.info, self.path = model, tokenizer, info, path
        self.max_length = int(info.get("max_length") or 512)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RewardModel:
        """Load an RM folder written by ``auto-model-rm train`` (offline; safetensors only)."""
        path = Path(path)
        info_file = path / RM_FILE
        if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
            raise ModelNotFoundError(f"No reward model in {path}: train one with auto-model-rm train.")
        info: dict[str, Any] = {}
        if info_file.exists():
            info = json.loads(info_file.read_text(encoding="utf-8"))
            if info.get("format") != RM_FORMAT:
                raise ArtifactError(f"{info_file}: unknown format {info.get('format')!r} (expected {RM_FORMAT}).")
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:
            raise MissingDependencyError("transformers", "hf", purpose="to score with a reward model") from exc
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch.float32, use_safetensors=True
            )
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return cls(model, tokenizer, info, path)

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """The reward of each response to its prompt, in batches."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise InvalidRequestError("prompts and responses must be lists of strings (one prompt per response).")
        if len(prompts) != len(responses):
            raise InvalidRequestError(f"{len(prompts)} prompts for {len(responses)} responses: pass one per response.")
        import torch

        texts = [dialogue(p, r) + (self.tokenizer.eos_token or "") for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        scores: list[float] = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                part = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in part],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                )
                logits = self.model(**batch).logits.squeeze(-1)
                for i, value in zip(part, logits.tolist(), strict=True):
                    scores[i] = float(value)
        return scores

    def accuracy(self, pairs: Sequence[Comparison]) -> float:
        """How often the chosen response scores above the rejected one."""
        if not pairs:
            raise InvalidRequestError("No comparisons to measure the accuracy on.")
        prompts = [p.prompt for p in pairs]
        chosen = self.score(prompts, [p.chosen for p in pairs])
        rejected = self.score(prompts, [p.rejected for p in pairs])
        return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


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
    or a loaded :class:`RewardModel`."""

    #: logits have no top or bottom
    scale = None

    def __init__(self, model: str | os.PathLike[str] | Any, batch_size: int = 16):
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}.")
        if isinstance(model, (str, os.PathLike)):
            model = RewardModel.load(model)
        self.model = model
        self.batch_size = batch_size

    def score(self, items: Sequence[RewardItem]) -> list[ItemScore]:
        if not items:
            return []
        values = self.model.score([i.query for i in items], [i.answer for i in items], batch_size=self.batch_size)
        return [ItemScore({ASPECT: value}, {ASPECT: None}) for value in values]
