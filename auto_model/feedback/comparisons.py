"""Ranked comparisons from responses by configuration (ALMoST's ``cs`` stage), and the checks that
mark a response as bad.

A *configuration* is a model, a demonstration file and a number of shots, named
``<model>-<demos>-<n>shot`` (the name of its responses file). A *rubric* lists configurations best
first, by rules of thumb: a larger model answers better than a smaller one, more shots better than
fewer, better demonstrations better than worse. For each prompt, pairs (better, worse) follow the
rubric, nearest ranks first, and are kept only when:

- neither response is identical to the other;
- the better response is not bad (empty, looping, or leaking the next turn): a bad response is
  never *chosen*;
- the better response is not implausibly short: at least the prompt's mean response length minus
  half a standard deviation (the original's heuristic filter);
- the prompt has fewer than ``n - 1`` pairs already (``n``: its configurations with a response).

Every pair that is dropped is counted under the filter that dropped it.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from auto_model.errors import InvalidRequestError

COMPARISONS_FORMAT = "auto_model.comparisons/v1"
#: Markers of a dialogue's turns: a response that contains one has run into the next turn.
TURN_MARKERS = ("Human:", "Assistant:", "### Instruction", "\nQuery:", "\nUser:")
_CONFIG = re.compile(r"^(?P<model>.+)-(?P<demos>[^-]+)-(?P<shots>\d+)shot$")


def response_problem(text: Any) -> str | None:
    """Why a response is bad (``"empty"``, ``"turn-leak"`` or ``"looping"``), or None."""
    if not isinstance(text, str) or not text.strip():
        return "empty"
    if any(marker in text for marker in TURN_MARKERS):
        return "turn-leak"
    if _loops(text):
        return "looping"
    return None


def _loops(text: str, size: int = 6, repeats: int = 3) -> bool:
    """A run of ``size`` words that comes back ``repeats`` times or more, or a line repeated as often."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 10]
    if lines and Counter(lines).most_common(1)[0][1] >= repeats:
        return True
    words = text.lower().split()
    grams = Counter(tuple(words[i : i + size]) for i in range(len(words) - size + 1))
    return bool(grams) and grams.most_common(1)[0][1] >= repeats


@dataclass(frozen=True)
class Config:
    """A configuration's parts, read from its name (``<model>-<demos>-<n>shot``)."""

    name: str
    model: str | None = None
    demos: str | None = None
    shots: int | None = None

    @classmethod
    def parse(cls, name: str) -> Config:
        found = _CONFIG.match(name)
        if not found:
            return cls(name)
        return cls(name, found["model"], found["demos"], int(found["shots"]))


def rule(better: Config, worse: Config) -> str:
    """The rule of thumb a pair follows: what differs between its configurations (``model``,
    ``demos``, ``shots``, joined with ``+``), or ``rubric`` when their names do not say."""
    if better.model is None or worse.model is None:
        return "rubric"
    parts = [name for name in ("model", "demos", "shots") if getattr(better, name) != getattr(worse, name)]
    return "+".join(parts) or "rubric"


def compare(responses: Mapping[str, Mapping[str, str]], rubric: Sequence[str]) -> dict[str, Any]:
    """Comparisons from ``responses`` (configuration name -> {prompt: response}) ranked by ``rubric``
    (configuration names, best first): ``{"format", "rubric", "counts", "comparisons"}``, each
    comparison ``{prompt, chosen, rejected, meta: {chosen_config, rejected_config, rule}}``."""
    if len(rubric) < 2 or len(set(rubric)) != len(rubric):
        raise InvalidRequestError(
            f"--rubric needs two or more distinct configurations, best first; got {list(rubric)}."
        )
    missing = [name for name in rubric if name not in responses]
    if missing:
        raise InvalidRequestError(f"No responses for {', '.join(missing)}: run --mode rg for each configuration first.")
    configs = {name: Config.parse(name) for name in rubric}
    prompts = list(dict.fromkeys(p for name in rubric for p in responses[name]))
    counts: Counter[str] = Counter()
    comparisons = []
    for prompt in prompts:
        ranked = [name for name in rubric if prompt in responses[name]]
        texts = {name: responses[name][prompt] for name in ranked}
        lengths = [len(t.split()) if isinstance(t, str) else 0 for t in texts.values()]
        floor = statistics.fmean(lengths) - 0.5 * (statistics.pstdev(lengths) if len(lengths) > 1 else 0.0)
        pairs = sorted(((i, j) for i in range(len(ranked)) for j in range(i + 1, len(ranked))),
                       key=lambda pair: (pair[1] - pair[0], pair[0]))  # fmt: skip
        kept = 0
        for i, j in pairs:
            better, worse = ranked[i], ranked[j]
            counts["pairs"] += 1
            if kept >= len(ranked) - 1:
                counts["over_limit"] += 1
            elif texts[better] == texts[worse]:
                counts["identical"] += 1
            elif response_problem(texts[better]) is not None:
                counts["bad_chosen"] += 1
            elif len(texts[better].split()) < floor:
                counts["too_short"] += 1
            else:
                kept += 1
                counts["kept"] += 1
                counts[f"kept:{rule(configs[better], configs[worse])}"] += 1
                comparisons.append({
                    "prompt": prompt,
                    "chosen": texts[better],
                    "rejected": texts[worse],
                    "meta": {"chosen_config": better, "rejected_config": worse,
                             "rule": rule(configs[better], configs[worse])},
                })  # fmt: skip
    return {"format": COMPARISONS_FORMAT, "rubric": list(rubric), "counts": dict(sorted(counts.items())),
            "comparisons": comparisons}  # fmt: skip
