"""Prompt generation (ALMoST's ``pg`` stage): new prompts written by a model from a few seed prompts.

A seed file is one prompt a line, with an optional first line describing the prompts wanted::

    ### Instruction: Questions and requests that people send to an AI assistant...
    How do I get my toddler to sleep through the night?
    ...

Each request shows the instruction and a random sample of seed prompts as ``Query:`` lines and lets
the model write the next ``Query:``, as plain text continued by the model (chat servers that take
only messages get the same text as one user turn). A new prompt is kept unless it is malformed or
too similar to one already there, seeds included (ROUGE-L F1 >= 0.5, with the ``rouge-score``
package, as the original did); rounds of requests go on until ``num_generation`` are kept or
``max_rounds`` have been sent. Every request has its own seed, so a rerun with the same ``--seed``
sends the same requests and the request cache answers the ones already done: a killed run resumes
where it stopped.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from auto_model.backends.base import Completion, GenerationRequest
from auto_model.errors import ArtifactError, InvalidRequestError, MissingDependencyError
from auto_model.feedback.textfiles import read_text_file, shipped

PROMPTS_FORMAT = "auto_model.prompts/v1"
#: The original's sampling for prompt generation.
PG_SAMPLING = {"temperature": 1.2, "top_p": 0.9, "max_new_tokens": 64}
SIMILARITY_THRESHOLD = 0.5
_MARKERS = re.compile(r"\b(Query|Human|Assistant|User|Instruction)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class Seeds:
    name: str
    instruction: str | None
    prompts: tuple[str, ...]
    path: str


def shipped_seeds() -> dict[str, Path]:
    """The seed prompt files that ship with the package, by name (``general``: 100 prompts)."""
    return shipped("seeds")


def load_seeds(path_or_name: str | os.PathLike[str]) -> Seeds:
    """A seed file (a path, or the name of a shipped one: ``general``), one prompt a line."""
    file = read_text_file(path_or_name, "seeds", "seed file (one prompt a line)")
    lines = [line.strip() for line in file.body.splitlines() if line.strip()]
    if len(lines) < 2:
        raise ArtifactError(f"{file.path}: a seed file needs at least two prompts, one a line.")
    return Seeds(file.path.stem, file.instruction, tuple(dict.fromkeys(lines)), file.shown)


def request_text(instruction: str | None, sample: Sequence[str]) -> str:
    """The text a model continues with its next prompt."""
    head = f"{instruction}\n\n" if instruction else ""
    return head + "".join(f"Query: {p}\n" for p in sample) + "Query:"


def malformed(text: str) -> str | None:
    """Why a generated prompt is unusable (``None`` if it is fine)."""
    if not text:
        return "empty"
    words = text.split()
    if len(words) < 3:
        return "too_short"
    if len(words) > 60:
        return "too_long"
    if _MARKERS.search(text):
        return "turn_marker"
    if sum(c.isalpha() for c in text) < 0.6 * len(text.replace(" ", "")):
        return "not_text"
    return None


class Similarity:
    """ROUGE-L F1 of a new prompt against every prompt kept so far (``rouge-score``'s scorer)."""

    def __init__(self, prompts: Sequence[str] = ()):
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise MissingDependencyError("rouge-score", "feedback", purpose="to drop near-duplicate prompts") from exc
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._kept = list(prompts)

    def add(self, text: str) -> None:
        self._kept.append(text)

    def highest(self, text: str) -> float:
        return max((self._scorer.score(old, text)["rougeL"].fmeasure for old in self._kept), default=0.0)


def check_generation(num_generation: int, max_rounds: int) -> None:
    """A typed error unless at least one prompt is wanted and one round allowed."""
    if num_generation < 1:
        raise InvalidRequestError(f"--num_generation must be at least 1, got {num_generation}.")
    if max_rounds < 1:
        raise InvalidRequestError(f"--max_rounds must be at least 1, got {max_rounds}.")


def generate_prompts(
    model: Any,
    run: Callable[[list[GenerationRequest]], list[Any]],
    seeds: Seeds,
    num_generation: int,
    options: Any,
    *,
    seed: int = 0,
    sample_size: int = 10,
    max_rounds: int = 20,
    on_round: Callable[[list[str], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Generate until ``num_generation`` new prompts are kept; the ``auto_model.prompts/v1`` record.

    ``run`` answers a list of requests in one engine call (e.g. :meth:`Role.run`, which caches).
    ``on_round(kept, record)`` is called after each round (to save what is kept so far)."""
    check_generation(num_generation, max_rounds)
    if not 1 <= sample_size <= len(seeds.prompts):
        raise InvalidRequestError(f"sample_size must be 1 to {len(seeds.prompts)}, got {sample_size}.")
    options = replace(options, stop=["\n"])
    similarity = Similarity(seeds.prompts)
    kept: list[str] = []
    dropped: Counter[str] = Counter()
    rng = random.Random(seed)
    record: dict[str, Any] = {}
    messages = model.aligner.prompt_format == "messages"
    for round_no in range(max_rounds):
        needed = num_generation - len(kept)
        # Twice the prompts still needed: on the embedded model a fifth were too similar to keep.
        size = min(max(2 * needed, 8), 256)
        requests = []
        for i in range(size):
            text = request_text(seeds.instruction, rng.sample(seeds.prompts, sample_size))
            s = replace(options, seed=seed * 1_000_003 + round_no * 1_000 + i)
            if messages:
                requests.append(model.aligner.build_request(None, [], text, s))
            else:
                requests.append(GenerationRequest(text, s.sampling()))
        for outcome in run(requests):
            if not isinstance(outcome, Completion):
                dropped["error"] += 1
                continue
            text = " ".join(outcome.text.strip().split("\n", 1)[0].split())
            problem = malformed(text)
            if problem is None and similarity.highest(text) >= SIMILARITY_THRESHOLD:
                problem = "too_similar"
            if problem is not None:
                dropped[problem] += 1
            elif len(kept) < num_generation:
                kept.append(text)
                similarity.add(text)
            else:
                dropped["surplus"] += 1
        record = {
            "format": PROMPTS_FORMAT,
            "seeds": {"name": seeds.name, "path": seeds.path, "count": len(seeds.prompts)},
            "model": model.model_name,
            "sampling": {**{k: getattr(options, k) for k in PG_SAMPLING}, "seed": seed, "sample_size": sample_size},
            "rounds": round_no + 1,
            "counts": {"kept": len(kept), "dropped": dict(sorted(dropped.items()))},
            "prompts": kept,
        }
        if on_round is not None:
            on_round(kept, record)
        if len(kept) >= num_generation:
            break
    return record
