"""Training queries: ``data/train/train.jsonl`` (one JSON object per line: id, query, category, tags)."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError
from auto_model.files import read_query_rows

CATEGORIES = ("everyday", "open-ended", "harmful")


def packaged_train_path() -> Path:
    return Path(str(resources.files("auto_model").joinpath("data/train/train.jsonl")))


def load_training_queries(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every training query, in file order. ``data_dir`` holds a ``train.jsonl`` (or is the file)."""
    path = packaged_train_path() if data_dir is None else Path(data_dir).expanduser()
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.exists():
        raise ArtifactError(f"No training data at {path}; pass --data-dir a folder with a train.jsonl.")
    rows = []
    for number, row in read_query_rows(path):
        row.setdefault("id", f"line-{number}")
        rows.append(row)
    if not rows:
        raise ArtifactError(f"{path} holds no training queries.")
    return rows


def sample_training_queries(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` queries in a random order fixed by ``seed`` (all of them, shuffled, if ``n`` >= the count)."""
    if n < 1:
        raise ValueError(f"num_training_examples must be >= 1, got {n}.")
    return random.Random(seed).sample(rows, min(n, len(rows)))
