"""The requests whose answers train the answer check (``python evaluations/answer-check/train_set.py OUT.jsonl``).

An eval set of requests the project tunes on, never a held-out one: the routing queries
(``data/train/routing.jsonl``), the labelled training queries (``data/train/train.jsonl``) and some
of the reworded routing queries (``data/train/routing-forms.jsonl``: 250 harmful, 100 ordinary).
Harmful ones are ``kind`` safety, the rest regular; ``auto-model-eval`` answers them.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "auto_model" / "data" / "train"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def main(out: str) -> None:
    def item(row: dict, harmful: bool, tags: list[str]) -> dict:
        return {"id": row["id"], "query": row["query"], "kind": "safety" if harmful else "regular", "tags": tags}

    rng = random.Random(7)
    forms = [r for r in rows("routing-forms.jsonl") if r["form"] != "wrapper-part"]
    harmful = rng.sample([r for r in forms if r["label"] == "harmful"], 400)
    ordinary = rng.sample([r for r in forms if r["label"] == "safe"], 300)
    items = [item(r, r["label"] == "harmful", ["routing", "plain"]) for r in rows("routing.jsonl")]
    items += [item(r, True, ["routing-forms", r["form"]]) for r in harmful[:250]]
    items += [item(r, False, ["routing-forms", r["form"]]) for r in ordinary[:100]]
    items += [item(r, r.get("category") == "harmful", ["train"]) for r in rows("train.jsonl")]
    Path(out).write_text("".join(json.dumps(i) + "\n" for i in items))
    print(f"{len(items)} requests -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
