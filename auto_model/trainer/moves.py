"""The search's moves that need no writer model: what a small model's search can change by itself.

A candidate of the search is what a route of an artifact holds: its system prompt, its decoding
settings, how many examples a request retrieves, and the example pool's edits. Besides the LLM
rewrite of the prompt (``"rewrite"``, :mod:`auto_model.trainer.search`), each move changes one
thing, chosen with the search's seeded random generator:

* ``"decoding"`` — moves one decoding setting one step along :data:`DECODING_GRID`;
* ``"examples"`` — one example more or fewer per request, drops a pool example that was retrieved
  for the level's queries, adds an example from a candidate bank (:func:`load_example_bank`), or
  replaces the one with the other;
* ``"sentences"`` — adds a sentence from a bank of guidelines written for the project
  (``templates/guidelines.txt``), drops a sentence, or swaps two neighbouring sentences;
* ``"shorten"`` — shortens the answer of one pool example that the level's requests retrieve to
  its first sentences and list items (:func:`shortened`, at most :data:`SHORT_WORDS` words): the
  examples are most of what every request pays for, and their length sets the answers'. The
  shorter example replaces the pool's under the same query (an artifact's ``pool.add``).

These are pure functions of a candidate; the search scores what they make like any candidate.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError
from auto_model.loops import FENCES, LIST_MARKER

MOVES = ("rewrite", "decoding", "examples", "sentences", "shorten")
#: the values a move may take each decoding setting to, one step at a time
DECODING_GRID: dict[str, tuple[float, ...]] = {
    "frequency_penalty": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    "presence_penalty": (0.0, 0.2, 0.4, 0.6),
    "repetition_penalty": (1.0, 1.05, 1.1, 1.15, 1.2),
    "no_repeat_ngram_size": (0, 6, 5, 4),
}
#: the most examples a request may get from a move
MAX_EXAMPLES = 5
_SENTENCE_END = r"(?<=[.!?])\s+(?=\S)"
_SENTENCE = re.compile(f"{_SENTENCE_END}|\\n+")
#: the most words a shortened example's answer keeps
SHORT_WORDS = 60
_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "dr.", "mr.", "mrs.", "ms.", "st.", "approx."})


@dataclass(frozen=True)
class Candidate:
    """What a route holds: its prompt, decoding settings, examples per request and pool edits."""

    prompt: str
    decoding: tuple[tuple[str, float], ...] = ()
    examples: int = 3
    drop: tuple[str, ...] = ()  # queries of pool examples left out
    add: tuple[str, ...] = ()  # queries of bank examples added

    @property
    def settings(self) -> dict[str, float]:
        return dict(self.decoding)

    def with_decoding(self, settings: dict[str, float]) -> Candidate:
        return replace(self, decoding=tuple(sorted((k, v) for k, v in settings.items())))


@dataclass(frozen=True)
class Move:
    """A changed candidate and what changed (``note``, for the tree)."""

    kind: str
    candidate: Candidate
    note: str


def decoding_moves(candidate: Candidate, supported: frozenset[str] | set[str]) -> list[Move]:
    """Every one-step move of one decoding setting (those the engine has) along the grid."""
    moves = []
    settings = candidate.settings
    for name, grid in DECODING_GRID.items():
        if name not in supported:
            continue
        current = settings.get(name, grid[0])
        at = min(range(len(grid)), key=lambda i: abs(grid[i] - current))
        for step in (-1, 1):
            if 0 <= at + step < len(grid) and grid[at + step] != current:
                value = grid[at + step]
                new = {**settings, name: value}
                if value == grid[0]:
                    del new[name]  # the grid's first value is the engine's own default
                moves.append(Move("decoding", candidate.with_decoding(new), f"{name} {current:g} -> {value:g}"))
    return moves


def example_moves(
    candidate: Candidate, retrieved: Sequence[str], bank: Sequence[str], min_examples: int = 0
) -> list[Move]:
    """One example more or fewer per request (never fewer than ``min_examples``: a base model needs
    one to answer at all); dropping one of the ``retrieved`` pool examples (their queries: what the
    level's requests got); adding one of the ``bank``'s; replacing one by another."""
    moves = []
    k = candidate.examples
    if k > min_examples:
        moves.append(Move("examples", replace(candidate, examples=k - 1), f"examples per request {k} -> {k - 1}"))
    if k < MAX_EXAMPLES:
        moves.append(Move("examples", replace(candidate, examples=k + 1), f"examples per request {k} -> {k + 1}"))
    added = set(candidate.add)
    droppable = [q for q in dict.fromkeys(retrieved) if q not in candidate.drop]
    fresh = [q for q in bank if q not in added]
    for query in droppable:
        if query in added:  # a bank example that was added: taking it out again
            moves.append(Move("examples", replace(candidate, add=tuple(q for q in candidate.add if q != query)),
                              f"removed the added example {query!r}"))  # fmt: skip
        else:
            moves.append(Move("examples", replace(candidate, drop=(*candidate.drop, query)), f"dropped {query!r}"))
    for query in fresh:
        moves.append(Move("examples", replace(candidate, add=(*candidate.add, query)), f"added {query!r}"))
    for old in droppable[:2]:
        for new in fresh[:2]:
            if old not in added:
                swapped = replace(candidate, drop=(*candidate.drop, old), add=(*candidate.add, new))
                moves.append(Move("examples", swapped, f"replaced {old!r} by {new!r}"))
    return moves


def sentences(prompt: str) -> list[str]:
    """A prompt's sentences (and lines), in order."""
    return [s.strip() for s in _SENTENCE.split(prompt) if s.strip()]


def _pieces(prompt: str) -> tuple[list[str], list[str]]:
    """A prompt's sentences and the white space after each (its paragraphs and lines kept)."""
    parts = re.split(f"({_SENTENCE.pattern})", prompt.strip())
    return parts[0::2], [*parts[1::2], ""]


def _join(parts: Sequence[str], gaps: Sequence[str]) -> str:
    return "".join(p + g for p, g in zip(parts, gaps, strict=True)).strip()


def sentence_moves(candidate: Candidate, bank: Sequence[str]) -> list[Move]:
    """Adding a guideline the prompt lacks (at its end), dropping a sentence, swapping two
    neighbouring sentences; the prompt's paragraphs and lines stay as they are."""
    parts, gaps = _pieces(candidate.prompt)
    moves = []
    have = {p.strip().lower() for p in parts}
    for line in bank:
        if line.lower() not in have:
            moves.append(Move("sentences", replace(candidate, prompt=f"{candidate.prompt.strip()} {line}"),
                              f"added: {line}"))  # fmt: skip
    if len(parts) > 1:
        for i, part in enumerate(parts):
            # the spaces on either side of the sentence become one, the wider (a paragraph break stays)
            if i == 0:
                keep_gaps = gaps[1:]
            elif i == len(parts) - 1:
                keep_gaps = [*gaps[: i - 1], ""]
            else:
                wider = max(gaps[i - 1], gaps[i], key=lambda g: (g.count("\n"), len(g)))
                keep_gaps = [*gaps[: i - 1], wider, *gaps[i + 1 :]]
            rest = parts[:i] + parts[i + 1 :]
            moves.append(Move("sentences", replace(candidate, prompt=_join(rest, keep_gaps)), f"dropped: {part}"))
        for i in range(len(parts) - 1):
            swapped = [*parts[:i], parts[i + 1], parts[i], *parts[i + 2 :]]
            moves.append(Move("sentences", replace(candidate, prompt=_join(swapped, gaps)),
                              f"swapped sentences {i + 1} and {i + 2}"))  # fmt: skip
    return moves


def _units(body: str) -> list[str]:
    """An answer's pieces in order, each whole: a paragraph's sentences, a list item (with its
    indented lines), a fenced code block with the line before it; each with its line break."""
    units: list[str] = []
    fenced = False
    for line in body.splitlines(keepends=True):
        opens = line.lstrip().startswith(FENCES)
        if units and (fenced or line[:1] in (" ", "\t") and line.strip()) or (opens and fenced):
            units[-1] += line  # inside a code block, or a list item's indented continuation
        elif not line.strip() or LIST_MARKER.match(line) or opens:
            units.append(line)
        else:
            parts: list[str] = []
            for part in re.split(_SENTENCE_END, line.rstrip("\n")):
                if parts and parts[-1].rsplit(" ", 1)[-1].lower() in _ABBREVIATIONS:
                    parts[-1] += f" {part}"  # "e.g. a ..." is one sentence
                else:
                    parts.append(part)
            units += [f"{part} " for part in parts[:-1]] + [parts[-1] + line[len(line.rstrip("\n")) :]]
        if opens:
            fenced = not fenced
    return units


def _opens(unit: str, follows: str) -> bool:
    """Whether ``unit``, an answer's last kept piece, leads into something cut (``follows``: the
    first piece cut): it ends with a colon, is a heading, or is prose before a list, code or table."""
    text = unit.strip()
    if text.endswith(":") or text.startswith("#") or (text.startswith("**") and text.endswith("**")):
        return True
    blocks = (*FENCES, "|")  # code, a table
    prose = not LIST_MARKER.match(unit) and not text.startswith(blocks)
    return prose and bool(follows) and (LIST_MARKER.match(follows) is not None or follows.lstrip().startswith(blocks))


def shortened(example: Any, max_words: int = SHORT_WORDS) -> Any | None:
    """``example`` (an :class:`~auto_model.retrieval.ICLExample`) with its answer cut to its first
    whole sentences, list items and code blocks that fit in ``max_words`` words, ending where one
    ends (never on a line that opens a list, ``...:``); None when it is already that short, when
    what fits is under a third of ``max_words`` (a title, a greeting), or when the cut would keep
    nine tenths of it or more."""
    from auto_model.prompting import format_answer

    body = example.body
    words = len(body.split())
    if words <= max_words:
        return None
    units = _units(body)
    kept: list[str] = []
    count = 0
    for unit in units:
        if count + len(unit.split()) > max_words:
            break
        kept.append(unit)
        count += len(unit.split())
    rest = [u for u in units[len(kept) :] if u.strip()]
    follows = rest[0] if rest else ""
    # a last line that opens what was cut (a list, code, a table), or a heading, goes with it
    while kept and (not kept[-1].strip() or _opens(kept[-1], follows)):
        unit = kept.pop()
        follows = unit if unit.strip() else follows
    count = sum(len(unit.split()) for unit in kept)
    if count < max_words // 3 or count >= 0.9 * words:
        return None
    return replace(example, answer=format_answer("".join(kept).strip()))


def shorten_moves(candidate: Candidate, retrieved: Sequence[str], short: Collection[str]) -> list[Move]:
    """Shortening one of the ``retrieved`` pool examples (their queries: what the level's requests
    got) that has a shorter version (``short``: the queries of :func:`shortened` examples), by
    adding that version, which replaces the pool's under its query."""
    added = set(candidate.add)
    return [
        Move("shorten", replace(candidate, add=(*candidate.add, query)), f"shortened {query!r}")
        for query in dict.fromkeys(retrieved)
        if query in short and query not in added and query not in candidate.drop
    ]


class ExampleSources:
    """Where the example moves find examples to add: the ``bank`` (by query; the ones nearest to a
    level's queries, by the model's embedder) and the shorter versions of the route's pool examples
    (:func:`shortened`, with ``shorten`` on). ``model()`` gives the model (its pool and embedder),
    asked only when one of them is needed; each source is built once, on first use."""

    def __init__(self, bank: Sequence[Any], route: str | None, shorten: bool, model: Callable[[], Any]):
        self.route, self.shorten, self._model = route, shorten, model
        self.bank = {ex.query: ex for ex in bank}
        self._bank_index: Any = None
        self._shortened: dict[str, Any] | None = None

    def short(self) -> dict[str, Any]:
        """The shorter versions of the route's pool examples, by query (none unless ``shorten``)."""
        if self._shortened is None:
            from auto_model.routing import example_route

            self._shortened = {}
            if self.shorten:
                for example in self._model().icl_pool:
                    short = shortened(example)
                    if short is not None and self.route in (None, example_route(example)):
                        self._shortened[example.query] = short
        return self._shortened

    def added(self, candidate: Candidate) -> tuple[Any, ...]:
        """The examples ``candidate`` adds to the pool (its ``add`` queries): shorter versions of pool
        examples and the bank's."""
        short = self.short()
        return tuple(short[q] if q in short else self.bank[q] for q in candidate.add)

    def near(self, queries: Sequence[str], per_query: int = 2) -> list[str]:
        """The bank's examples nearest to ``queries``: the ones an added example would be retrieved for."""
        if not self.bank:
            return []
        if self._bank_index is None:
            from auto_model.retrieval import ICLRetriever

            self._bank_index = ICLRetriever(list(self.bank.values()), self._model().aligner.embedding_model)
        found = self._bank_index.search_embedded(self._bank_index.embed(list(queries)), per_query)
        return list(dict.fromkeys(ex.query for row in found for _, ex in row))


def pick(moves: Sequence[Move], n: int, rng: random.Random) -> list[Move]:
    """``n`` of ``moves`` (all of them if there are no more), seeded: each pick first draws a kind of
    change (the note's first word: ``added``, ``dropped``, a setting's name, ...), then one move of
    that kind, so that a long list of one kind (a bank's examples) does not crowd out the others."""
    moves = list(moves)
    if len(moves) <= n:
        return moves
    groups: dict[str, list[Move]] = {}
    for move in moves:
        groups.setdefault(move.note.split(" ")[0].rstrip(":"), []).append(move)
    chosen: list[Move] = []
    while len(chosen) < n:
        kind = rng.choice(sorted(k for k, group in groups.items() if group))
        chosen.append(groups[kind].pop(rng.randrange(len(groups[kind]))))
    return chosen


def guideline_bank(path: str | Path | None = None) -> list[str]:
    """The guideline sentences the ``sentences`` move adds from: one a line (the packaged ones by default)."""
    if path is None:
        text = resources.files("auto_model.trainer").joinpath("templates/guidelines.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


#: answers longer than this many words do not go into the example bank (the examples set the length)
BANK_MAX_WORDS = 120
BANK_MIN_WORDS = 12


def load_example_bank(path: str | Path, route: str) -> list[Any]:
    """The examples the ``examples`` move may add, for ``route``: an ICL pool file (its examples of
    the route, as they are), or the responses of ``auto-model-feedback --mode rg`` filtered by the
    metrics: no problem flagged, no loop, no refusal (for the everyday route; a refusal for
    safety), between :data:`BANK_MIN_WORDS` and :data:`BANK_MAX_WORDS` words."""
    from auto_model.prompting import format_answer
    from auto_model.retrieval import ICLExample, parse_icl_pool
    from auto_model.rewards.proxies import length_words, loops, refusal_kind
    from auto_model.routing import SAFETY, SAFETY_TAG, example_route

    source = Path(path).expanduser()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"--example-bank {path}: not a readable JSON file ({exc}).") from exc
    if isinstance(data, dict) and isinstance(data.get("responses"), list):
        examples = []
        for row in data["responses"]:
            query, answer = row.get("prompt"), row.get("response")
            if not isinstance(query, str) or not isinstance(answer, str) or row.get("problem"):
                continue
            refuses = refusal_kind(answer) == "refusal"
            if (
                loops(answer)
                or refuses != (route == SAFETY)
                or not BANK_MIN_WORDS <= length_words(answer) <= BANK_MAX_WORDS
            ):
                continue
            tags = (SAFETY_TAG, "bank") if route == SAFETY else ("bank",)
            examples.append(ICLExample(query.strip(), format_answer(answer.strip()), tags))
    else:
        examples = parse_icl_pool(data, str(source))
    found = [ex for ex in examples if example_route(ex) == route]
    if not found:
        raise ArtifactError(f"--example-bank {path} holds no usable example for the {route} route.")
    return found


__all__ = [
    "ExampleSources",
    "MOVES",
    "DECODING_GRID",
    "Candidate",
    "Move",
    "decoding_moves",
    "example_moves",
    "sentence_moves",
    "sentences",
    "SHORT_WORDS",
    "shortened",
    "shorten_moves",
    "pick",
    "guideline_bank",
    "load_example_bank",
]
