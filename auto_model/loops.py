"""Finding where an answer starts to loop, as it is written.

Small models under greedy decoding often fall into a loop: the same sentence or list item again
and again until the token limit. :class:`LoopGuard` reads an answer as it grows (a stream's chunks,
or an engine's tokens) and finds the first point where it repeats itself; the answer is cut there.
:func:`cut_loop` does the same for a finished answer. Both apply the same rules, so a streamed
answer and the same answer generated whole are cut at the same place.

The rules (a *unit* is a sentence or a line, compared without its list marker, its short label
(``"**Tripod**: "``), case, punctuation or Markdown emphasis, or a whole fenced code block; units
of fewer than :data:`MIN_UNIT_WORDS` words never count):

* a unit seen twice before loops on its third occurrence (whatever the items' labels);
* a unit seen once before, label and all, loops on its second occurrence when it is long
  (:data:`LONG_UNIT_WORDS` words or more) or follows its first occurrence directly;
* a run of words that repeats itself with a period of at most :data:`MAX_PERIOD` words loops on
  its third cycle, once the run spans :data:`MIN_RUN_WORDS` words (``"very very very ..."``, or a
  phrase looping without punctuation).

The answer is cut at the start of the occurrence (or cycle) that makes the loop. Lines inside
Markdown code fences are not compared one by one (code repeats lines legitimately: ``}``,
``return x``, the same loop header twice); the same code block again is a unit that repeats, and
code looping word for word is caught by the run rule. Distinct list items, headings and code are
never cut.

>>> cut_loop("1. Cut the stems. 2. Use fresh water every day. 3. Use fresh water every day. 4. Use")
('1. Cut the stems. 2. Use fresh water every day.', True)
>>> cut_loop("1. Cut the stems.\\n2. Change the water.\\n3. Keep them cool.")
('1. Cut the stems.\\n2. Change the water.\\n3. Keep them cool.', False)
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from typing import Any

#: units of fewer words never count as a loop ("Yes.", "}", "Step 1:")
MIN_UNIT_WORDS = 3
#: a unit this long that comes again is a loop at its first repeat
LONG_UNIT_WORDS = 10
#: the longest phrase (in words) whose back-to-back repetition the run rule looks for
MAX_PERIOD = 24
#: the fewest words a looping run must span before it counts (three cycles at the least)
MIN_RUN_WORDS = 12

#: what opens or closes a Markdown code block
FENCES = ("```", "~~~")
_BOUNDARY = re.compile(r"\n|(?<=[.!?])[\"')\]*_]*\s")
_MARKER_ONLY = re.compile(r"^\s*(?:\d{1,3}|[A-Za-z])[.)]\s*$")
_MARKER_SO_FAR = re.compile(r"^\s*(?:\d{1,3}|[A-Za-z])?[.)]?\s*$")  # what may still become "12. "
#: a list item's marker ("1. ", "a) ", "- ", "• ") and the space after it
LIST_MARKER = re.compile(r"^\s*(?:(?:\d{1,3}|[A-Za-z])[.)]|[-*+\u2022])\s+")
_LABEL = re.compile(r"^[^:.!?\n]{1,60}?:\s+(?=\S)")  # "**Use a tripod**: " before an item's text
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
_TOKEN = re.compile(r"\S+")
_EDGE = re.compile(r"^\W+|\W+$")


def _unit_words(raw: str) -> list[str]:
    """The words a unit is compared by: no list marker, short label, case or punctuation."""
    text = LIST_MARKER.sub("", raw.strip())
    label = _LABEL.match(text)
    if label and len(_WORD.findall(label.group())) <= 6:
        text = text[label.end() :]
    return _WORD.findall(text.lower())


def _code_words(raw: str) -> list[str]:
    """What a code block is compared by: its tokens, white space aside."""
    return raw.split()


class LoopGuard:
    """Reads an answer as it grows; finds where it starts to loop (:attr:`cut`).

    :meth:`feed` takes the next piece of text and returns what can be shown now: text that no
    later piece can turn into the start of a loop. :meth:`flush` ends the answer and returns the
    rest. Once :attr:`looped` is set, the answer is over: nothing more is returned, and the text
    up to :attr:`cut` is the answer.

    >>> guard = LoopGuard()
    >>> shown = "".join(guard.feed(c) for c in ["Keep the vase cool. Keep", " the vase cool. Keep the"])
    >>> shown + guard.flush(), guard.looped
    ('Keep the vase cool. ', True)
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.text = ""
        #: where the loop starts in :attr:`text`, once one is found
        self.cut: int | None = None
        self._shown = 0
        # units
        self._unit_start = 0
        self._scanned = 0  # text before this has been searched for unit boundaries
        self._line_start = 0
        self._in_code = False
        self._block_start = 0  # where the open code block's fence line starts
        self._counts: dict[str, int] = {}  # units by their text (no label)
        self._wholes: dict[str, int] = {}  # units by their text with their label
        self._previous: str | None = None  # the last unit counted, with its label
        # words (the run rule)
        self._words: list[str] = []
        self._word_at: list[int] = []
        self._word_scan = 0  # text before this has been split into words
        self._runs = [0] * (MAX_PERIOD + 1)

    @property
    def looped(self) -> bool:
        return self.cut is not None

    def feed(self, piece: str) -> str:
        """Add ``piece`` to the answer; return the text that can be shown now."""
        if self.cut is not None or not piece:
            return ""
        self.text += piece
        self._read(final=False)
        return self._show(final=False)

    def follow(self, text: str) -> None:
        """Read ``text``, the whole answer so far (an engine's decoded tokens): only what is new is
        fed; if a token changed how the ones before it decode (rare), the answer is read anew."""
        if self.cut is not None:
            return
        if not text.startswith(self.text):
            self._reset()
        self.feed(text[len(self.text) :])

    def flush(self) -> str:
        """The answer is complete: return the rest of what can be shown."""
        if self.cut is None:
            self._read(final=True)
        return self._show(final=True)

    def answer(self) -> str:
        """The answer so far, cut where it loops (trailing white space kept)."""
        return self.text if self.cut is None else self.text[: self.cut]

    # -- reading -------------------------------------------------------------------------------

    def _read(self, final: bool) -> None:
        """Read what is new, in the order it was written: the words up to each unit's end, then
        the unit (so the first loop found is the first one written, whatever the chunks)."""
        text = self.text
        while True:
            match = _BOUNDARY.search(text, self._scanned)
            if match is None:
                break
            end = match.end()
            if self._read_words(end, final=False) or self._close_unit(end, match.group().endswith("\n")):
                return
            self._scanned = end
        if self._read_words(len(text), final):
            return
        if final and self._unit_start < len(text):
            self._close_unit(len(text), newline=True)

    def _read_words(self, upto: int, final: bool) -> bool:
        """Read the finished words before ``upto``; True when one completes a looping run."""
        text = self.text
        for match in _TOKEN.finditer(text, self._word_scan, upto):
            if match.end() == len(text) and not final:
                break  # the last token may still grow
            self._word_scan = match.end()
            word = _EDGE.sub("", match.group().lower())
            if any(ch.isalnum() for ch in word):
                self._words.append(word)
                self._word_at.append(match.start())
                if self._add_word() is not None:
                    return True
        return False

    def _add_word(self) -> int | None:
        words, i = self._words, len(self._words) - 1
        for p in range(1, min(MAX_PERIOD, i) + 1):
            self._runs[p] = self._runs[p] + 1 if words[i] == words[i - p] else 0
            span = self._runs[p] + p
            if self._runs[p] >= 2 * p and span >= MIN_RUN_WORDS:
                start = i - span + 1
                self.cut = self._word_at[start + 2 * p]  # the third cycle
                return self.cut
        return None

    def _close_unit(self, end: int, newline: bool) -> bool:
        """A unit ends at ``end``; True when it is the start of a loop."""
        raw = self.text[self._unit_start : end]
        if _MARKER_ONLY.match(raw) and not newline:
            return False  # "2." belongs to the item that follows it
        start, self._unit_start = self._unit_start, end
        if newline:
            line_start, self._line_start = self._line_start, end
            if self.text[line_start:end].strip().startswith(FENCES):
                self._in_code = not self._in_code
                if self._in_code:
                    self._block_start = line_start
                    return False
                # the block closed: it is one unit, from its opening fence line on
                block = self.text[line_start:end]
                content = self.text[self._block_start : line_start].split("\n", 1)[-1]
                words = _code_words(content)
                return self._count(words, " ".join(words), self._block_start + len(block) - len(block.lstrip()))
        if self._in_code:
            return False
        whole = " ".join(_WORD.findall(LIST_MARKER.sub("", raw.strip()).lower()))
        return self._count(_unit_words(raw), whole, start + (len(raw) - len(raw.lstrip())))

    def _count(self, words: list[str], whole: str, start: int) -> bool:
        """Count a finished unit that starts at ``start`` (``whole``: its text with its label);
        True (and :attr:`cut`) when it loops."""
        if len(words) < MIN_UNIT_WORDS:
            return False
        key = " ".join(words)
        if self._counts.get(key, 0) >= 2 or self._repeats(whole):
            self.cut = start
            return True
        self._counts[key] = self._counts.get(key, 0) + 1
        self._wholes[whole] = self._wholes.get(whole, 0) + 1
        self._previous = whole
        return False

    def _repeats(self, whole: str) -> bool:
        """Whether this unit, label and all, once more is a loop: it is long or just came before."""
        return whole in self._wholes and (whole.count(" ") + 1 >= LONG_UNIT_WORDS or whole == self._previous)

    # -- showing -------------------------------------------------------------------------------

    def _show(self, final: bool) -> str:
        end = len(self.text) if self.cut is None else self.cut
        if self.cut is None and not final:
            end = self._hold()
        if end <= self._shown:
            return ""
        out, self._shown = self.text[self._shown : end], end
        return out

    def _hold(self) -> int:
        """The earliest point a later piece could still cut at: the start of a unit that may become
        a repeat, or of a run's third cycle in the making."""
        hold = len(self.text)
        tail = self.text[self._word_scan :]
        if tail.strip():  # the last word is unfinished, so not read yet
            hold = self._word_scan + len(tail) - len(tail.lstrip())
        i = len(self._words) - 1
        for p in range(1, min(MAX_PERIOD, i) + 1):
            if self._runs[p] >= p:  # two cycles done: the third starts after them
                third = i - (self._runs[p] + p) + 1 + 2 * p
                if third <= i:
                    hold = min(hold, self._word_at[third])
        if self._in_code:  # an open code block may become the same block again
            content = self.text[self._block_start :].split("\n", 1)[-1]
            head, _, last = content.rpartition("\n")
            if last.strip() and (last.strip().startswith(FENCES) or any(f.startswith(last.strip()) for f in FENCES)):
                content = head  # the closing fence, on its way
            partial = whole = " ".join(_code_words(content))
            start = self._block_start
        else:
            raw = self.text[self._unit_start :]
            item = LIST_MARKER.sub("", raw.lstrip())
            whole = "" if _MARKER_SO_FAR.match(raw) else " ".join(_WORD.findall(item.lower()))
            # a few words without a colon yet may still turn out to be a label ("Tripod: ..."): the
            # text the unit is counted by is not known yet
            maybe_label = not _LABEL.match(item) and len(_WORD.findall(item.split(":", 1)[0])) <= 6
            partial = "" if not whole or maybe_label else " ".join(_unit_words(raw))
            start = self._unit_start
        if any(k.startswith(partial) for k, n in self._counts.items() if n >= 2) or any(
            w.startswith(whole) for w in self._wholes if self._repeats(w)
        ):
            hold = min(hold, start)
        return hold


class ChunkStream:
    """Text chunks made from an engine's stream (``chunks``) by :meth:`_run`; closing it closes
    ``chunks`` (the generation stops). The streams the SDK returns build on it."""

    def __init__(self, chunks: Iterator[str], end: Any = None):
        self._chunks = chunks
        #: how the engine ended the answer (a :class:`~auto_model.backends.base.StreamEnd`, filled in
        #: once the stream is over; None where the stream does not come from an engine)
        self.end = end if end is not None else getattr(chunks, "end", None)
        self._pieces = self._run()

    def _run(self) -> Generator[str, None, None]:  # pragma: no cover - each stream has its own
        raise NotImplementedError

    def close_source(self) -> None:
        close = getattr(self._chunks, "close", None)
        if callable(close):
            close()

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self.close_source()


class CutStream(ChunkStream):
    """The text chunks of one answer, ended where it starts to loop (with ``cut_loops``); closing
    it closes ``chunks`` (an engine's stream: the generation stops). Once it has ended,
    :attr:`looped` says whether it was cut."""

    def __init__(self, chunks: Iterator[str], cut_loops: bool = True, end: Any = None):
        self._guard = LoopGuard() if cut_loops else None
        super().__init__(chunks, end)

    @property
    def looped(self) -> bool:
        return self._guard is not None and self._guard.looped

    def _run(self) -> Generator[str, None, None]:
        guard = self._guard
        try:
            for piece in self._chunks:
                out = piece if guard is None else guard.feed(piece)
                if out:
                    yield out
                if guard is not None and guard.looped:
                    return
            tail = "" if guard is None else guard.flush()
            if tail:
                yield tail
        finally:
            self.close_source()


def cut_loop(text: str) -> tuple[str, bool]:
    """``text`` cut where it starts to loop (trailing white space removed), and whether it did."""
    guard = LoopGuard()
    guard.feed(text)
    guard.flush()
    return (guard.answer().rstrip(), True) if guard.looped else (text, False)


__all__ = [
    "ChunkStream",
    "CutStream",
    "LoopGuard",
    "cut_loop",
    "MIN_UNIT_WORDS",
    "LONG_UNIT_WORDS",
    "MAX_PERIOD",
    "MIN_RUN_WORDS",
]
