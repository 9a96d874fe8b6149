"""Conversations as the SDK reads them: validation, the text of a message, the user turns routing reads.

A conversation is a list of ``{"role", "content"}`` messages. :func:`parse_conversation` checks it
(for an engine that takes OpenAI messages, OpenAI's other roles and multi-part content too) and splits
it into its system text, its turns and the last user turn; :func:`earlier_user_turns` gives the user
turns before the last, which routing and the answer check read beside it. Pure: no engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from auto_model.errors import InvalidRequestError
from auto_model.prompting import Message

#: The roles a conversation may hold.
ROLES = ("system", "user", "assistant")
#: What a system message in a conversation does (``chat(..., system_messages=...)``).
SYSTEM_MESSAGE_MODES = ("replace", "prepend", "drop")
#: The roles of OpenAI's chat API, which a server engine takes.
OPEN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def message_text(content: Any) -> str | None:
    """The text of a message's content: a string, or the joined text of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "\n".join(p["text"] for p in content if p.get("type") == "text" and isinstance(p.get("text"), str))
    return None


def earlier_user_turns(turns: Sequence[Message]) -> list[str]:
    """The text of a conversation's user turns before its last one (routing reads them too)."""
    users = [message_text(m.get("content")) or "" for m in turns if m.get("role") == "user"]
    return users[:-1]


def parse_conversation(messages: Any, open_format: bool = False) -> tuple[str | None, list[Message], str]:
    """Validate a conversation; return its system text (or None), the other turns and the text of
    the last user turn. ``open_format`` (an engine that takes OpenAI messages) also lets through
    OpenAI's other roles, multi-part content and extra fields, unchanged."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError('messages must be a non-empty list of {"role": ..., "content": ...} dicts.')
    system: list[str] = []
    turns: list[Message] = []
    for i, m in enumerate(messages):
        if open_format:
            if not isinstance(m, dict) or m.get("role") not in OPEN_ROLES:
                raise InvalidRequestError(
                    f"messages[{i}] must be a dict whose role is one of {', '.join(OPEN_ROLES)}, got {m!r}."
                )
            content = m.get("content")
            if content is not None and message_text(content) is None:
                raise InvalidRequestError(f"messages[{i}].content must be a string or a list of content parts.")
            if m["role"] in ("system", "developer"):
                if turns:
                    raise InvalidRequestError(
                        f"messages[{i}]: a {m['role']} message must come before the conversation turns."
                    )
                system.append(message_text(content) or "")
            else:
                turns.append(dict(m))
            continue
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequestError(
                f'messages[{i}] must be {{"role": "system" | "user" | "assistant", "content": str}}, got {m!r}.'
            )
        if m["role"] == "system":
            if turns:
                raise InvalidRequestError(f"messages[{i}]: a system message must come before the conversation turns.")
            system.append(m["content"])
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    last = turns[-1]["role"] if turns else None
    if last != "user" and not (open_format and last in ("tool", "function")):
        raise InvalidRequestError("The last message must be a user turn: the one to answer.")
    last_user = next((message_text(m.get("content")) or "" for m in reversed(turns) if m["role"] == "user"), "")
    if not last_user.strip():
        raise InvalidRequestError("The last user message is empty; pass the question to answer.")
    return ("\n\n".join(system) if system else None), turns, last_user


__all__ = ["OPEN_ROLES", "ROLES", "SYSTEM_MESSAGE_MODES", "earlier_user_turns", "message_text", "parse_conversation"]
