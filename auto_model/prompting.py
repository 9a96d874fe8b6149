"""The one function that turns (system prompt, in-context examples, query) into a prompt.

The SDK and the trainer both assemble prompts here, so a prompt optimized in training is the
prompt served in inference. Three formats:

* ``"base"``: plain text for base (non-chat) models. The system prompt, then each example as a
  ``# Query:`` / ``# Answer:`` block with the answer between ``<START>`` and ``<END>``, then the
  user's query with an open ``<START>``. Generation stops at ``<END>``.
* ``"chat"``: the same conversation rendered through the tokenizer's own chat template: a system
  turn, one user/assistant pair per example, then the query. A template that rejects the system
  role gets the system text folded into the first user turn instead.
* ``"messages"``: the OpenAI-style list of ``{"role", "content"}`` dicts behind ``"chat"``.

The optimized system prompt always comes first: it is the same for every request, so engines
with prefix caching reuse it across a batch.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

from auto_model.errors import InvalidRequestError

logger = logging.getLogger(__name__)

START = "<START>"
END = "<END>"
QUERY_HEADER = "# Query:"
ANSWER_HEADER = "# Answer:"
# "<END>" closes an answer; a model that forgets it and starts inventing the next example is
# cut at the next query header instead.
BASE_STOP: tuple[str, ...] = (END, "\n" + QUERY_HEADER)

PromptFormat = Literal["base", "chat", "messages"]
PROMPT_FORMATS: tuple[str, ...] = ("base", "chat", "messages")
Message = dict[str, str]
Prompt = str | list[Message]


#: Text that engines or templates read as structure: chat-template control tokens (ChatML and
#: Llama-3 ``<|...|>``, DeepSeek ``<｜...｜>``, Gemma's turn markers, ``<s>``, ``[INST]``, ``<<SYS>>``)
#: and the base format's own markers and headers.
_MARKERS = re.compile(
    r"<\|[^<>|\s]{1,64}\|>|<｜[^<>｜\s]{1,64}｜>|</?s>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk|mask)>"
    r"|\[/?INST\]|<</?SYS>>|<START>|<END>|^#(?= (?:Query|Answer):)",
    re.MULTILINE,
)
#: what :func:`neutralize` puts after a marker's first character
ZERO_WIDTH_SPACE = "\u200b"


def _broken(match: re.Match[str]) -> str:
    return match.group(0)[0] + ZERO_WIDTH_SPACE + match.group(0)[1:]


def neutralize(text: str, specials: Iterable[str] = ()) -> str:
    """``text`` with everything that looks like a control token or a prompt marker broken by a
    zero-width space after its first character (``<|im_start|>`` becomes ``<\u200b|im_start|>``),
    so that a template and a tokenizer read it as text: a user's message can never open a turn of
    its own. ``specials``: a tokenizer's own special tokens, broken too.

    >>> neutralize("hi<|im_end|>") == "hi<" + ZERO_WIDTH_SPACE + "|im_end|>"
    True
    """
    text = _MARKERS.sub(_broken, text)
    for token in specials:
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


@functools.lru_cache(maxsize=16)
def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """A tokenizer's special tokens (its named ones and every added token marked special)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False) and getattr(t, "content", None))
    return tuple(sorted(found, key=len, reverse=True))


def _neutral_message(message: Message, specials: Sequence[str]) -> Message:
    """A user's message whose text (a string, or the text of its parts) cannot become control tokens."""
    message = dict(message)
    content: Any = message.get("content")
    if isinstance(content, str):
        message["content"] = neutralize(content, specials)
    elif isinstance(content, list):
        message["content"] = [  # type: ignore[assignment]
            {**part, "text": neutralize(part["text"], specials)}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
    return message


class Example(Protocol):
    @property
    def query(self) -> str: ...

    @property
    def answer(self) -> str: ...


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[Message], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class AssembledPrompt:
    """A prompt ready for an engine, with the stop strings its format needs."""

    prompt: Prompt
    format: PromptFormat
    stop: tuple[str, ...] = field(default_factory=tuple)
    #: the :class:`~auto_model.routing.Route` the request took, set by the SDK
    route: Any = field(default=None, compare=False)
    #: the query it answers (a conversation's user turns, one per line), set by the SDK
    query: str | None = field(default=None, compare=False)


def answer_body(answer: str) -> str:
    """An example answer without its ``<START>``/``<END>`` markers."""
    return strip_markers(answer)


def strip_markers(text: str) -> str:
    """Remove the answer markers from generated or stored text.

    Everything from the first ``<END>`` on is dropped (the model closed its answer there), a
    leading ``<START>`` is removed, and surrounding white space is trimmed.
    """
    end = text.find(END)
    if end != -1:
        text = text[:end]
    text = text.strip()
    if text.startswith(START):
        text = text[len(START) :]
    return text.strip()


def format_answer(body: str) -> str:
    """Wrap an answer body in the markers used by the pool and the base format."""
    return f"{START}\n{strip_markers(body)}\n{END}"


def build_base_prompt(
    system_prompt: str | None,
    examples: Sequence[Example],
    query: str | Sequence[Message],
    specials: Sequence[str] = (),
) -> str:
    """Base-model text. A conversation continues the examples: each earlier user/assistant pair
    becomes one more ``# Query:``/``# Answer:`` block, and the last user turn is the open query.
    The system text and the user's side pass through :func:`neutralize` (``specials``: the tokenizer's own)."""
    parts = [neutralize(system_prompt.strip(), specials)] if system_prompt and system_prompt.strip() else []
    for ex in examples:
        parts.append(f"{QUERY_HEADER}\n{ex.query.strip()}\n\n{ANSWER_HEADER}\n{format_answer(ex.answer)}")
    if isinstance(query, str):
        turns: list[tuple[str, str | None]] = [(neutralize(query, specials), None)]
    else:
        turns = [(neutralize(user, specials), None if answer is None else neutralize(answer, specials))
                 for user, answer in _conversation_pairs(query)]  # fmt: skip
    for user, answer in turns:
        if answer is None:
            parts.append(f"{QUERY_HEADER}\n{user.strip()}\n\n{ANSWER_HEADER}\n{START}\n")
        else:
            parts.append(f"{QUERY_HEADER}\n{user.strip()}\n\n{ANSWER_HEADER}\n{format_answer(answer)}")
    return "\n\n".join(parts)


def _conversation_pairs(messages: Sequence[Message]) -> list[tuple[str, str | None]]:
    """(user, assistant answer) pairs of a conversation ending with a user turn (answer None)."""
    pairs: list[tuple[str, str | None]] = []
    for m in messages:
        if m["role"] == "user":
            if pairs and pairs[-1][1] is None:  # two user turns in a row read as one query
                pairs[-1] = (pairs[-1][0] + "\n\n" + m["content"], None)
            else:
                pairs.append((m["content"], None))
        elif m["role"] == "assistant":
            if not pairs or pairs[-1][1] is not None:
                raise InvalidRequestError("An assistant turn must follow a user turn in the base prompt format.")
            pairs[-1] = (pairs[-1][0], m["content"])
    if not pairs or pairs[-1][1] is not None:
        raise InvalidRequestError("A conversation must end with a user turn.")
    return pairs


def build_messages(
    system_prompt: str | None,
    examples: Sequence[Example],
    query: str | Sequence[Message],
    specials: Sequence[str] = (),
) -> list[Message]:
    """System turn, example turns, then the query (a string or the user's own conversation). The
    system text and the user's side pass through :func:`neutralize` (``specials``: the tokenizer's own)."""
    messages: list[Message] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": neutralize(system_prompt.strip(), specials)})
    for ex in examples:
        messages.append({"role": "user", "content": ex.query.strip()})
        messages.append({"role": "assistant", "content": answer_body(ex.answer)})
    if isinstance(query, str):
        messages.append({"role": "user", "content": neutralize(query.strip(), specials)})
    else:  # a server's messages may carry more than role and content
        messages.extend(_neutral_message(m, specials) for m in query)
    return messages


def fold_system_into_first_user(messages: Iterable[Message]) -> list[Message]:
    """Merge system turns into the first user turn, for templates that reject the system role."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    head = "\n\n".join(system)
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{head}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": head}, *rest]


def render_chat(messages: list[Message], tokenizer: ChatTokenizer) -> str:
    """Render messages with the tokenizer's chat template, ending with the assistant's turn opened."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 TemplateError from raise_exception(...) in the template
        if not any(m["role"] == "system" for m in messages):
            raise
        logger.debug("Chat template rejected the system role (%s); folding it into the first user turn", exc)
        return tokenizer.apply_chat_template(
            fold_system_into_first_user(messages), tokenize=False, add_generation_prompt=True
        )


def assemble(
    system_prompt: str | None,
    examples: Sequence[Example],
    query: str | Sequence[Message],
    *,
    format: PromptFormat,
    tokenizer: ChatTokenizer | None = None,
) -> AssembledPrompt:
    """Assemble one request.

    Args:
        system_prompt: the system prompt (optimized or the user's), or None for none.
        examples: in-context examples, most relevant first; each has ``query`` and ``answer``.
        query: the user's query; for ``"chat"``/``"messages"`` also a list of messages (a conversation).
        format: ``"base"``, ``"chat"`` or ``"messages"``.
        tokenizer: required for ``"chat"``; anything with ``apply_chat_template``.

    Returns:
        The prompt (text, or messages for ``"messages"``) and the stop strings it needs.
    """
    specials = special_tokens(cast(Any, tokenizer)) if tokenizer is not None else ()
    if format == "base":
        return AssembledPrompt(build_base_prompt(system_prompt, examples, query, specials), "base", BASE_STOP)
    messages = build_messages(system_prompt, examples, query, specials)
    if format == "messages":
        return AssembledPrompt(messages, "messages")
    if format == "chat":
        if tokenizer is None:
            raise InvalidRequestError("The chat prompt format needs a tokenizer with a chat template.")
        return AssembledPrompt(render_chat(messages, tokenizer), "chat")
    raise InvalidRequestError(f"Unknown prompt format {format!r}; use 'base', 'chat' or 'messages'.")
