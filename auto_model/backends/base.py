"""The one interface every engine implements.

A backend takes a *list* of requests and returns a list of completions in the same order, in one
call, so that it can batch however its engine batches best. Capability flags are class attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

from auto_model.prompting import Prompt

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific, passed through unchanged


@dataclass(frozen=True)
class GenerationRequest:
    """A fully assembled prompt (text, or chat messages for engines that take them) and its sampling."""

    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Completion:
    """What an engine produced for one request.

    Attributes:
        text: generated text, stop strings and special tokens removed.
        finish_reason: ``"stop"`` (end of turn or a stop string), ``"length"`` (max_new_tokens hit).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated (up to and including the one that ended the answer).
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


# Called as each completion is ready (index into the request list, completion), so callers can
# persist finished work before the whole batch is done.
CompletionCallback = Callable[[int, Completion], None]


class Backend(ABC):
    """Base class of the engines.

    Subclasses set ``name`` and the capability flags, load their engine in ``__init__`` and
    implement :meth:`generate`.
    """

    name: ClassVar[str]
    supports_chat: ClassVar[bool] = False  # accepts chat-message prompts (``"messages"`` format)
    supports_completion: ClassVar[bool] = True  # accepts plain-text prompts
    supports_streaming: ClassVar[bool] = False

    model_id: str
    #: ``"chat"`` when the model is instruction-tuned with a chat template, else ``"base"``.
    prompt_style: Literal["base", "chat"]
    #: the tokenizer used for chat templates, when the engine has one locally
    tokenizer: Optional[Any] = None

    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Completion]:
        """Generate a completion for every request; same length and order as ``requests``."""

    def close(self) -> None:
        """Release the engine's resources. Safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={getattr(self, 'model_id', None)!r})"
