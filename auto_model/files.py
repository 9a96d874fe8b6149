"""Files written and read the same way everywhere: atomic writes (a reader sees the old file or the
complete new one, never half of either), JSONL files of queries, and JSON/TOML config files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def _lines(path: Path, unreadable: type[Exception]) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line of a text file; ``unreadable`` (an error class)
    when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise unreadable(f"Cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def read_query_rows(path: str | os.PathLike[str], *, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file of queries.

    A line is an object with a non-empty ``query`` (other keys are kept), or a bare JSON string.
    A bad line raises :class:`~auto_model.errors.ArtifactError` naming ``file:line``; with
    ``skip_bad=True`` it is yielded as ``{"error": why}`` instead, so that one bad line never
    loses the good ones. An unreadable file raises ArtifactError.
    """
    from auto_model.errors import ArtifactError

    path = Path(path)
    for number, line in _lines(path, ArtifactError):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            error = f"not valid JSON ({exc.msg})"
        else:
            if isinstance(row, str):
                row = {"query": row}
            if isinstance(row, dict) and isinstance(row.get("query"), str) and row["query"].strip():
                yield number, row
                continue
            error = "expected a non-empty string or an object with a non-empty 'query'"
        if not skip_bad:
            raise ArtifactError(f"{path}:{number}: {error}.")
        yield number, {"error": error}


def read_jsonl_rows(path: str | os.PathLike[str], fields: Sequence[str]) -> list[dict[str, Any]]:
    """The objects of a JSONL file whose every line (blank ones aside) holds the string ``fields``
    (other keys are kept). A missing file is an InvalidRequestError, a bad line an ArtifactError
    naming ``file:line``."""
    from auto_model.errors import ArtifactError, InvalidRequestError

    path = Path(path)
    rows = []
    for number, line in _lines(path, InvalidRequestError):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}:{number}: not valid JSON ({exc.msg}).") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise ArtifactError(f"{path}:{number}: needs the string fields {', '.join(repr(f) for f in fields)}.")
        rows.append(row)
    return rows


def read_config_file(path: str | os.PathLike[str], option: str) -> Any:
    """The parsed content of a ``.toml`` or JSON config file given as ``option``; a missing or
    unreadable file raises InvalidRequestError naming the option."""
    from auto_model.errors import InvalidRequestError

    file = Path(path).expanduser()
    if not file.exists():
        raise InvalidRequestError(f"{option} {file} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise InvalidRequestError(f"{option} {file} cannot be read: {exc}") from None
