"""The plain-text inputs of synthetic feedback (seed prompts, demonstrations): a path, or the name of
a file that ships with the package, with an optional first line ``### Instruction: ...``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from auto_model.errors import InvalidRequestError

INSTRUCTION = "### Instruction:"


@dataclass(frozen=True)
class TextFile:
    path: Path  # where it was read
    shown: str  # how records name it: a shipped file by its place in the package, the same on every machine
    instruction: str | None
    body: str  # the text after the instruction line


def shipped(folder: str) -> dict[str, Path]:
    """The ``.txt`` files of ``auto_model/feedback/<folder>``, by name."""
    files = resources.files("auto_model.feedback").joinpath(folder)
    return {Path(str(f)).stem: Path(str(f)) for f in files.iterdir() if str(f).endswith(".txt")}


def read_text_file(path_or_name: str | os.PathLike[str], folder: str, what: str) -> TextFile:
    """Read a shipped file by name, or any file by path; a typed error naming the choices otherwise."""
    choices = shipped(folder)
    name = str(path_or_name)
    path = choices.get(name) or Path(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise InvalidRequestError(f"No {what} {name!r}: pass a path or one of {', '.join(sorted(choices))}.") from None
    instruction = None
    first, _, rest = text.lstrip().partition("\n")
    if first.startswith(INSTRUCTION):
        instruction, text = first[len(INSTRUCTION) :].strip() or None, rest
    shown = f"auto_model/feedback/{folder}/{path.name}" if name in choices else str(path)
    return TextFile(path, shown, instruction, text)
