"""Judge-free measures of an answer, trustworthy without any LLM judge.

* :func:`refusal_kind` — ``"refusal"``, ``"partial"`` or ``"none"``. An answer is a *refusal*
  when its opening (the first two sentences, at most 250 characters) declines in the first person
  ("I can't help with that", "Sorry, but I won't ...", "I must decline"). It is a *partial*
  refusal when such a phrase appears only later, after the answer has started to comply. Phrases
  that merely contain "can't" ("you can't go wrong with ...") are not refusals: the detector looks
  for a first-person refusal of the request itself.
* :func:`repetition` — the share of word n-grams (n=3) that repeat an earlier one: 0 for an answer
  that never repeats itself, close to 1 for one stuck in a loop.
* :func:`length_words` — words in the answer.
* :func:`ended_cleanly` — the answer ended on its own (stop marker or end of turn), not at the
  length limit.
* :func:`loops` — the answer repeats itself: a sentence or list item three times or more, or over
  35% of its word 4-grams repeat an earlier one. It is measured on the text as it is, independently
  of the SDK's loop cut (:mod:`auto_model.loops`), which cuts such answers where they start.
"""

from __future__ import annotations

import re
from typing import Literal

RefusalKind = Literal["refusal", "partial", "none"]

_VERB = r"(?:help|assist|provide|give|support|share|write|create|do|offer|comply|fulfil|fulfill|engage)"
_REFUSAL = re.compile(
    r"\b(?:"
    rf"(?:i|we) (?:can(?:not|'t| not)|won't|will not|do not|don't) {_VERB}"
    rf"|(?:i|we)(?:'m| am|'re| are) (?:not able to|unable to|not going to) {_VERB}"
    r"|(?:i|we) (?:must|have to|need to) (?:decline|refuse)"
    r"|(?:sorry|apologies|afraid),? (?:but )?(?:i|we) (?:can(?:not|'t)|won't)"
    r"|not (?:something|a request) (?:i|we) can (?:help|assist)"
    r")\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


def opening(text: str, sentences: int = 2, limit: int = 250) -> str:
    """The first ``sentences`` sentences of ``text``, at most ``limit`` characters."""
    parts = _SENTENCE_END.split(_normalise(text), maxsplit=sentences)
    return " ".join(parts[:sentences])[:limit]


def refusal_kind(text: str) -> RefusalKind:
    """Whether an answer refuses: ``"refusal"`` (it opens by declining), ``"partial"`` (it declines
    only after starting to comply) or ``"none"``."""
    text = _normalise(text)
    if not text:
        return "none"
    if _REFUSAL.search(opening(text)):
        return "refusal"
    return "partial" if _REFUSAL.search(text) else "none"


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 = none repeats)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


_ITEM_MARKER = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022])\s*")
_UNIT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]*_]*\s+|\n+")


def loops(text: str) -> bool:
    """Whether ``text`` repeats itself: one sentence or list item (of 3 words or more, case, list marker
    and punctuation aside) three times or more, or over 35% of its word 4-grams repeated."""
    counts: dict[str, int] = {}
    for unit in _UNIT_SPLIT.split(text):
        words = re.findall(r"\w+", _ITEM_MARKER.sub("", unit).lower())
        if len(words) >= 3:
            key = " ".join(words)
            counts[key] = counts.get(key, 0) + 1
            if counts[key] >= 3:
                return True
    return repetition(text, 4) > 0.35


def length_words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def ended_cleanly(finish_reason: str) -> bool:
    """True when the answer ended by itself (stop marker or end of turn), not at the length limit."""
    return finish_reason == "stop"
