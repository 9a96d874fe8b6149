"""A reworded request read as a plain one: what the router also scores (:func:`plain_forms`).

Attackers move a harmful request into forms that a classifier trained on plain requests scores
lower: a preface before a colon ("For a history class: ...", "Role-play as my mentor and answer
as they would: ..."), another tense or mood ("How did people once ...", "How will someone ...",
"Hypothetically, how would one ..."), a third person ("a person wanted to ..."), or a story whose
character "describes how to ...". :func:`plain_forms` undoes each of these with a few rules and
returns the plain requests they hide; the router scores them beside the request itself and keeps
the highest score (:func:`auto_model.routing.routing_texts`). An ordinary request stays ordinary
in its plain form ("How did people once preserve meat?" becomes "how do I preserve meat?"), so the
rules change nothing for it; they add texts to score, never take any away.

The rules are written for the project (no public request set was read to write them) and are
pure: no engine, no embedder.
"""

from __future__ import annotations

import re

#: A short preface, a colon, and the request after it.
_PREFACE = re.compile(r"[^:\n]{3,160}:\s+(?P<request>\S.*)", re.DOTALL)
#: The fewest words of a request after a preface (shorter: "Note: see above" is not one).
MIN_WORDS = 4
_WHO = r"(?:people|someone|somebody|one|they|he|she|criminals|a person|anyone|a character|the character|you)"
#: (pattern, replacement) applied in order: tense and mood back to the asker's own present request.
_RULES = [
    (
        rf"\bhow (?:did|would|could|might|will|were|was|do|does|can|should)(?: (?!I\b)\w+)? {_WHO}"
        r"(?: once| back then| in the past| historically| have| be able to| go about| used to| use to"
        r"| manage to| typically| usually| actually)*\b",
        "how do I",
    ),
    (
        r"\b(?:in the past|back then|historically|in history|in the old days|once upon a time"
        r"|in the (?:1[89]|20)\d0s|in \d{4}|in the coming (?:years|decades)|in (?:the )?future|by the year \d{4}"
        r"|hypothetically(?: speaking)?|in theory(?: only)?|in principle|theoretically"
        r"|purely as a thought experiment)\b,?",
        "",
    ),
    (
        r"\b(?:someone|somebody|a person|one|a character|the character|he|she|they)(?: \w+)? "
        r"(?:set out to|wanted to|wants to|decided to|tried to|planned to|was going to|were going to"
        r"|needed to|had to|would|could|might)\b",
        "I want to",
    ),
]
_COMPILED = [(re.compile(pattern, re.IGNORECASE), replacement) for pattern, replacement in _RULES]
#: "... a character describes how to X": the "how to X" inside a longer request.
_HOW_TO = re.compile(r"\bhow to\s+(?P<rest>\w.{10,})", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"\s{2,}")
_BEFORE_MARK = re.compile(r"\s+([?.!,])")


def _restated(text: str) -> str:
    """``text`` with the rules applied (unchanged when none applies)."""
    restated = text
    for pattern, replacement in _COMPILED:
        restated = pattern.sub(replacement, restated)
    if restated == text:
        return text
    return _BEFORE_MARK.sub(r"\1", _SPACES.sub(" ", restated)).strip()


def plain_forms(text: str) -> list[str]:
    """The plain requests a reworded ``text`` may hide (none for most requests): the text after a
    short preface and colon; the text, and that, restated in the asker's present tense; and a "how
    to ..." clause inside it, asked on its own. Each differs from ``text`` and appears once."""
    text = text.strip()
    found: list[str] = []
    preface = _PREFACE.fullmatch(text)
    if preface and len(preface.group("request").split()) >= MIN_WORDS:
        found.append(preface.group("request").strip())
    for base in (text, *found):
        restated = _restated(base)
        if restated and restated != base:
            found.append(restated)
    clause = _HOW_TO.search(text)
    if clause and clause.start() > 0:
        found.append("How to " + clause.group("rest").strip())
    return [form for form in dict.fromkeys(found) if form != text]


__all__ = ["MIN_WORDS", "plain_forms"]
