"""Atomic file writes (a reader sees the old file or the complete new one, never half of either),
reading JSONL files of queries, and reading JSON/TOML config files."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def read_query_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file of queries. A line that is not
    JSON, or not an object with a non-empty ``query``, raises ArtifactError naming ``file:line``."""
    from auto_model.errors import ArtifactError

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}:{number}: not valid JSON ({exc.msg}).") from exc
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            raise ArtifactError(f"{path}:{number}: expected an object with a non-empty 'query'.")
        yield number, row


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
