"""Eval sets: JSONL, one item per line: ``{"id": ..., "query": ..., "kind": "regular" | "safety", "tags": [...]}``.

An item may be a conversation: ``messages`` (``{"role": "user" | "assistant", "content": ...}``
turns, ending with a user turn) is then what is sent, and ``query`` is its last user turn.

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
    #: the whole conversation, when the item is one (its last turn is ``query``)
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def conversation(self) -> list[dict[str, str]] | None:
        """The item's turns as chat messages, or ``None`` for a single request."""
        if self.messages is None:
            return None
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "query": self.query, "kind": self.kind, "tags": list(self.tags)}
        if self.conversation is not None:
            row["messages"] = self.conversation
        return row


def _messages(row: dict[str, Any], where: str) -> tuple[tuple[str, str], ...] | None:
    messages = row.get("messages")
    if messages is None:
        return None
    turns = []
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str):
                turns.append((m["role"], m["content"]))
    if not turns or len(turns) != len(messages) or turns[-1] != ("user", row["query"]):
        raise ArtifactError(
            f"{where}: messages must be a list of user and assistant turns ({{'role': ..., 'content': ...}}) "
            "whose last turn is the user's query."
        )
    return tuple(turns)


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
        items.append(EvalItem(item_id, row["query"], kind, tuple(tags), _messages(row, where)))
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
