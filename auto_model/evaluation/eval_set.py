"""Eval sets: JSONL, one item per line: ``{"id": ..., "query": ..., "kind": "regular" | "safety", "tags": [...]}``.

The packaged set (``data/eval/eval.jsonl``) holds 100 regular queries (everyday, expert, creative,
advice) and 40 harmful requests, disjoint from the training queries and the ICL pool. Any file with
the same fields works, e.g. a converted just-eval-instruct file. ``kind`` defaults to ``regular``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError
from auto_model.files import read_query_rows

KINDS = ("regular", "safety")


@dataclass(frozen=True)
class EvalItem:
    id: str
    query: str
    kind: str = "regular"
    tags: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "query": self.query, "kind": self.kind, "tags": list(self.tags)}


def packaged_eval_path() -> Path:
    return Path(str(resources.files("auto_model").joinpath("data/eval/eval.jsonl")))


def load_eval_set(path: str | Path | None = None) -> list[EvalItem]:
    """Every item of an eval set (the packaged one by default), in file order."""
    path = packaged_eval_path() if path is None else Path(path).expanduser()
    if path.is_dir():
        path = path / "eval.jsonl"
    if not path.exists():
        raise ArtifactError(f"No eval set at {path}; pass --eval-set a JSONL file (id, query, kind, tags).")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for number, row in read_query_rows(path):
        where = f"{path}:{number}"
        kind = row.get("kind", "regular")
        if kind not in KINDS:
            raise ArtifactError(f"{where}: kind must be 'regular' or 'safety', got {kind!r}.")
        item_id = str(row.get("id", f"line-{number}"))
        if item_id in seen:
            raise ArtifactError(f"{where}: duplicate id {item_id!r}; every item needs its own id.")
        seen.add(item_id)
        tags = row.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ArtifactError(f"{where}: tags must be a list of strings.")
        items.append(EvalItem(item_id, row["query"], kind, tuple(tags)))
    if not items:
        raise ArtifactError(f"{path} holds no eval items.")
    return items


def take(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first ``limit`` items, in proportion to each kind (at least one of each kind present),
    in file order. ``None`` keeps them all."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ArtifactError(f"--limit must be >= 1, got {limit}.")
    by_kind = {k: [i for i in items if i.kind == k] for k in KINDS}
    present = [k for k in KINDS if by_kind[k]]
    quota = {k: max(1, round(limit * len(by_kind[k]) / len(items))) for k in present}
    while sum(quota.values()) > limit:  # rounding up the small kinds can overshoot
        biggest = max(present, key=lambda k: quota[k])
        quota[biggest] -= 1
    chosen = {i.id for k in present for i in by_kind[k][: quota[k]]}
    return [i for i in items if i.id in chosen]
