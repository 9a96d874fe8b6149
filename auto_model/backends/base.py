"""The one interface every engine implements.

A backend takes a *list* of requests and returns a list of completions in the same order, in one
call, so that it can batch however its engine batches best. Capability flags are class attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    ClassVar,
    Literal,
)

from auto_model.errors import InvalidRequestError
from auto_model.prompting import Prompt

FinishReason = Literal["stop", "length", "content_filter"]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific, passed through unchanged
    #: constrain the reply to JSON matching this JSON Schema (engines with ``supports_json_schema``)
    json_schema: dict[str, Any] | None = None
    #: answers to sample for the request, in the same engine call (see :attr:`Completion.samples`)
    n: int = 1
    #: stop an answer where it starts to loop (:mod:`auto_model.loops`); engines that can watch
    #: the answer as it is generated stop generating there, the SDK cuts the text
    cut_loops: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """A fully assembled prompt (text, or chat messages for engines that take them) and its sampling."""

    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: the route (:class:`~auto_model.routing.Route`) the SDK chose; engines do not read it
    route: Any = field(default=None, compare=False)
    #: the query the request answers (a conversation's user turns, one per line, the last one last);
    #: the answer check and a reward model read the answer beside it (engines do not read it)
    query: str | None = field(default=None, compare=False)
    #: the SDK checks the answer (:mod:`auto_model.answer_check`); engines do not read it
    check_answer: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Completion:
    """What an engine produced for one request.

    Attributes:
        text: generated text, stop strings and special tokens removed.
        finish_reason: ``"stop"`` (end of turn or a stop string), ``"length"`` (max_new_tokens hit).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated (up to and including the one that ended the answer).
        latency_s: seconds from sending the request to its answer (for engines that batch, the
            time of the engine call that produced it).
        samples: for a request that asked for ``n`` > 1 answers, all n (this completion is the
            first, with ``completion_tokens`` the total over the n); empty otherwise.
        scores: the reward of each sample, in the same order, once a reward model has scored them
            (:meth:`~auto_model.rewards.best_of.BestOf.rerank`); this completion is then the best one.
        looped: the answer was cut where it started to repeat itself (``finish_reason`` is then
            ``"stop"``; see :mod:`auto_model.loops`).
        answer_score: the answer check's score of the answer (None: not checked); an answer it
            replaced has ``finish_reason`` ``"content_filter"``.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    latency_s: float | None = field(default=None, compare=False)  # timing is not part of the answer
    samples: tuple[Completion, ...] = ()
    scores: tuple[float | None, ...] = ()
    looped: bool = False
    answer_score: float | None = field(default=None, compare=False)


def with_samples(samples: Sequence[Completion]) -> Completion:
    """The completion of a request that asked for several answers: the first, carrying all of them,
    its token count the total over them."""
    if len(samples) == 1:
        return samples[0]
    return replace(samples[0], completion_tokens=sum(s.completion_tokens for s in samples), samples=tuple(samples))


@dataclass
class StreamEnd:
    """How a streamed answer ended, filled in by the engine when the stream is over (None where the
    engine does not say): ``finish_reason`` (``"stop"`` or ``"length"``), the prompt's tokens and the
    tokens generated. Pass one to :meth:`Backend.stream`; read it once the stream is exhausted."""

    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def fill(self, completion: Completion) -> None:
        """Take what ``completion`` says (a backend that streams its finished answer as one chunk)."""
        self.finish_reason = completion.finish_reason
        self.prompt_tokens = completion.prompt_tokens
        self.completion_tokens = completion.completion_tokens


#: What a backend returns per request: the completion, or the exception that request failed with.
Outcome = Completion | BaseException

# Called as each request finishes (index into the request list, completion or exception), so
# callers can persist finished work before the whole batch is done.
CompletionCallback = Callable[[int, Outcome], None]


@dataclass(frozen=True)
class PromptTarget:
    """What assembling prompts for an engine needs to know of it, known without starting it (a
    served model's, for a proxy in front of its server): its name, :attr:`Backend.prompt_style`,
    whether it takes chat messages, the decoding settings it applies, and its tokenizer (None for a
    server). A :class:`Backend` is one too."""

    name: str
    prompt_style: Literal["base", "chat"]
    supports_chat: bool
    decoding_settings: frozenset[str]
    tokenizer: Any = None


class Backend(ABC):
    """Base class of the engines.

    Subclasses set ``name`` and the capability flags, load their engine in ``__init__`` and
    implement :meth:`generate`.
    """

    name: ClassVar[str]
    #: takes a model *name* served elsewhere instead of local weights
    remote: ClassVar[bool] = False
    #: ``generate`` may be called from several threads at once
    thread_safe: ClassVar[bool] = False
    #: a request joins the engine's running batch as it comes (no caller needs to gather a batch first)
    continuous_batching: ClassVar[bool] = False
    supports_chat: ClassVar[bool] = False  # accepts chat-message prompts (``"messages"`` format)
    #: honours ``SamplingParams.json_schema`` (constrained decoding); others reject such a request
    supports_json_schema: ClassVar[bool] = False
    #: the :data:`DECODING_SETTINGS` this engine applies; an artifact's others are left out for it
    decoding_settings: frozenset[str] = frozenset()

    model_id: str
    #: ``"chat"`` when the model is instruction-tuned with a chat template, else ``"base"``.
    prompt_style: Literal["base", "chat"]
    #: the tokenizer used for chat templates, when the engine has one locally
    tokenizer: Any | None = None

    @abstractmethod
    def __init__(self, model: Any, **options: Any) -> None:
        """Load the engine for ``model`` (a resolved local model; a model name for remote engines);
        ``options`` are the engine's own (see each backend)."""

    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        """Generate a completion for every request; same length and order as ``requests``.

        A request that fails on its own (too long, rejected by a server after retries) gets its
        exception in its slot; the other requests still get their completions. An error that
        takes the whole engine down is raised.
        """

    def stream(self, request: GenerationRequest, end: StreamEnd | None = None) -> Iterator[str]:
        """Yield the answer to one request in text chunks; once they are over, ``end`` (if given)
        says how the answer ended and what it cost.

        The default yields the whole answer as one chunk once it is done; engines that can
        stream token by token override this.
        """
        outcome = self.generate([request])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        if end is not None:
            end.fill(outcome)
        if outcome.text:
            yield outcome.text

    def close(self) -> None:  # noqa: B027 (optional: engines without resources keep this no-op)
        """Release the engine's resources. Safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={getattr(self, 'model_id', None)!r})"


_DTYPE_NAMES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def dtype_name(dtype: Any) -> str:
    """``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` for any spelling of them
    (``"bf16"``, ``"half"``, ``torch.bfloat16``, None for auto)."""
    name = _DTYPE_NAMES.get("auto" if dtype is None else str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise InvalidRequestError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}.")
    return name


#: Decoding settings a prompt artifact may carry (``"decoding"``), with their allowed ranges. Every
#: engine takes them as sampling arguments of these names where it supports them
#: (:attr:`Backend.decoding_settings`).
#: the seeds every engine takes (a 64-bit signed integer, as vLLM's and OpenAI's servers accept)
SEED_RANGE = (-(2**63), 2**63 - 1)
DECODING_SETTINGS: dict[str, tuple[type, float, float]] = {
    "repetition_penalty": (float, 0.5, 2.0),  # > 1 makes every token already seen (prompt too) less likely
    "frequency_penalty": (float, -2.0, 2.0),  # lowers a token by this much per time it was generated
    "presence_penalty": (float, -2.0, 2.0),  # lowers a token by this much once it was generated
    "no_repeat_ngram_size": (int, 0, 64),  # never generate an n-gram of this size twice (0: off)
}


def check_decoding(settings: Any, where: str = "decoding") -> dict[str, float | int]:
    """Decoding settings checked against :data:`DECODING_SETTINGS`; :class:`InvalidRequestError`
    names the setting and its range."""
    if not isinstance(settings, Mapping):
        raise InvalidRequestError(f"{where} must be an object of decoding settings, got {type(settings).__name__}.")
    checked: dict[str, float | int] = {}
    for name, value in settings.items():
        if name not in DECODING_SETTINGS:
            raise InvalidRequestError(
                f"{where}: unknown decoding setting {name!r}; known: {', '.join(DECODING_SETTINGS)}."
            )
        kind, low, high = DECODING_SETTINGS[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and not float(value).is_integer()) or not low <= value <= high:
            raise InvalidRequestError(
                f"{where}: {name} must be {'an integer' if kind is int else 'a number'} from {low:g} to {high:g}, "
                f"got {value!r}."
            )
        checked[name] = kind(value)
    return checked


#: Sampling arguments that ask an engine for several answers to one request.
MULTI_SAMPLE_ARGUMENTS = ("n", "best_of", "num_return_sequences")


def check_one_sample(extra: Mapping[str, Any], where: str = "") -> None:
    """Refuse sampling arguments that ask for several answers per request: a result holds one
    answer, so the others would be dropped silently. Raises :class:`InvalidRequestError`."""
    for name in MULTI_SAMPLE_ARGUMENTS:
        value = extra.get(name)
        if value is not None and value != 1:
            raise InvalidRequestError(
                f"{where}{name}={value!r} asks for several answers per request, and a result holds one. Send the "
                "query several times (with temperature > 0 and a different seed each) to get several answers."
            )


def cpu_dtype(dtype: Any) -> str:
    """The dtype a local engine computes in on a CPU: ``"auto"`` is float32, an explicit choice is kept.

    float32 is exact for the SDK's de-quantised GGUF folders, and it is the dtype in which a greedy
    answer does not depend on the other requests of its batch (measured on vLLM-CPU and
    transformers; bfloat16 rounds differently with the batch's shape and changes answers). On CPUs
    with native bfloat16 (AVX512-BF16, AMX), ``dtype="bfloat16"`` is faster and half the memory.
    """
    name = dtype_name(dtype)
    return "float32" if name == "auto" else name


def encode_prompt(tokenizer: Any, text: str, prompt_style: str) -> list[int]:
    """Token ids of an assembled prompt, the same way for every local engine.

    A chat template already wrote its own special tokens; a base prompt gets the tokenizer's usual
    ones (e.g. BOS), unless it already starts with them.
    """
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos)) and prompt_style == "base"
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def choose_prompt_style(
    prompt_format: str, has_chat_template: bool, chat: bool | None, model_id: str
) -> Literal["base", "chat"]:
    """How to assemble prompts for a model.

    Args:
        prompt_format: ``"auto"``, ``"chat"`` or ``"base"``, as the user asked.
        has_chat_template: the model's tokenizer has a chat template (or, for a server, takes chat).
        chat: what a packaged model is known to be (``False`` for a base model), or None if unknown.
    """
    if prompt_format not in ("auto", "chat", "base"):
        raise InvalidRequestError(f"prompt_format must be 'auto', 'chat' or 'base', got {prompt_format!r}.")
    if prompt_format == "chat":
        if not has_chat_template:
            raise InvalidRequestError(f"{model_id} has no chat template; use prompt_format='base'.")
        return "chat"
    if prompt_format == "base":
        return "base"
    return "chat" if has_chat_template and chat is not False else "base"


class StopCutter:
    """Cuts a text stream at the first stop string, holding back only what could start one.

    >>> cut = StopCutter(["<END>"])
    >>> cut.feed("Hello <E") + cut.feed("ND> more") + cut.flush()
    'Hello '
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, chunk: str) -> str:
        if self.stopped:
            return ""
        self.buffer += chunk
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)
