"""Responses by configuration (ALMoST's ``rg`` stage), and the demonstration files they are prompted with.

A demonstration file is a few dialogues, as the original wrote them::

    ### Instruction: what kind of assistant the dialogues show (optional first line)

    Human: a question

    Assistant: its answer

Two ship with the package (:func:`shipped_demos`): ``careful`` (helpful, honest and harmless
answers) and ``plain`` (short, flat, weaker ones). A configuration's requests are assembled by the
SDK's one prompt builder (:meth:`~auto_model.aligner.Aligner.build_request`): the instruction as
the system prompt and the first ``n_shot`` dialogues as in-context examples, in the model's own format. All prompts of a
configuration go to the engine in one call (:meth:`AutoModel.run_requests`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from auto_model.backends.base import GenerationRequest
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.feedback.comparisons import response_problem
from auto_model.feedback.textfiles import read_text_file, shipped

RESPONSES_FORMAT = "auto_model.responses/v1"
#: The turn markers a response stops at (sent as stop strings, and cut at).
STOP_AT = ("Human:", "Assistant:")
_TURN = re.compile(r"^(Human|Assistant):[ \t]?", re.MULTILINE)


@dataclass(frozen=True)
class Dialogue:
    """One demonstration: a question and its answer (an in-context example)."""

    query: str
    answer: str


@dataclass(frozen=True)
class Demonstrations:
    name: str
    instruction: str | None
    dialogues: tuple[Dialogue, ...]
    path: str


def shipped_demos() -> dict[str, Path]:
    """The demonstration files that ship with the package, by name."""
    return shipped("demos")


def load_demos(path_or_name: str | os.PathLike[str]) -> Demonstrations:
    """A demonstration file (a path, or the name of a shipped one: ``careful``, ``plain``)."""
    file = read_text_file(path_or_name, "demos", "demonstration file")
    path, instruction, text = file.path, file.instruction, file.body
    parts = _TURN.split(text)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    dialogues = []
    for (role, question), (next_role, answer) in zip(turns[::2], turns[1::2], strict=False):
        if role != "Human" or next_role != "Assistant" or not question or not answer:
            raise ArtifactError(f"{path}: dialogues must alternate 'Human:' and 'Assistant:' turns, neither empty.")
        dialogues.append(Dialogue(question, answer))
    if not dialogues or len(turns) % 2:
        raise ArtifactError(f"{path}: no complete 'Human:' / 'Assistant:' dialogue found.")
    name = re.sub(r"[^a-z0-9]+", "", path.stem.lower()) or "demos"
    return Demonstrations(name, instruction, tuple(dialogues), file.shown)


def check_n_shot(demos: Demonstrations, n_shot: int) -> None:
    """A typed error unless ``n_shot`` dialogues of ``demos`` exist."""
    if not 1 <= n_shot <= len(demos.dialogues):
        raise InvalidRequestError(f"--n_shot must be 1 to {len(demos.dialogues)} for {demos.path}, got {n_shot}.")


def config_name(model_name: str, demos: Demonstrations, n_shot: int) -> str:
    """``<model>-<demos>-<n>shot``, e.g. ``smollm2-135m-instruct-careful-3shot``."""
    model = re.sub(r"[^a-z0-9.]+", "-", Path(model_name).name.lower()).strip("-")
    return f"{model}-{demos.name}-{n_shot}shot"


def cut_at_turn(text: str) -> str:
    """The response up to the next turn marker, trimmed."""
    cuts = [i for i in (text.find(marker) for marker in STOP_AT) if i != -1]
    return (text[: min(cuts)] if cuts else text).strip()


def generate_responses(
    model: Any,
    prompts: list[str],
    demos: Demonstrations,
    n_shot: int,
    options: Any,
    run: Callable[[list[GenerationRequest]], list[Any]] | None = None,
) -> dict[str, Any]:
    """One configuration's responses to ``prompts``, in one engine call: the ``auto_model.responses/v1``
    record (``responses``: ``{prompt, response, problem}`` each, ``problem`` None for a usable one).

    ``run`` answers the requests (default :meth:`AutoModel.run_requests`; the CLI passes a cached
    :meth:`Role.run`, so a rerun only sends what is not done)."""
    check_n_shot(demos, n_shot)
    if not prompts:
        raise InvalidRequestError("No prompts to answer.")
    given = [options.stop] if isinstance(options.stop, str) else list(options.stop or [])
    options = replace(options, stop=list(dict.fromkeys([*STOP_AT, *given])))
    build = model.aligner.build_request
    requests = [build(demos.instruction, demos.dialogues[:n_shot], prompt, options) for prompt in prompts]
    rows: list[dict[str, Any]] = []
    for prompt, outcome in zip(prompts, (run or model.run_requests)(requests), strict=True):
        if isinstance(outcome, BaseException):
            rows.append({"prompt": prompt, "response": "", "problem": "error", "error": str(outcome)})
            continue
        text = cut_at_turn(outcome.text)
        rows.append({"prompt": prompt, "response": text, "problem": response_problem(text)})
    name = config_name(model.model_name, demos, n_shot)
    return {
        "format": RESPONSES_FORMAT,
        "config": {
            "name": name,
            "model": model.model_name,
            "demos": demos.name,
            "demos_path": demos.path,
            "n_shot": n_shot,
        },  # fmt: skip
        "sampling": {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_new_tokens": options.max_new_tokens,
            "seed": options.seed,
        },  # fmt: skip
        "counts": dict(Counter(r["problem"] or "ok" for r in rows)),
        "responses": rows,
    }
