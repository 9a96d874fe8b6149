"""Refusal by category on a misinformation split (``heldout6.jsonl``, ``dev-misinformation.jsonl``)
from an ``auto-model-eval`` report: harmful requests by harm category (``tags[0]``), ordinary ones
by kind (``tags[1]``: ``ordinary`` persuasive writing, or ``safe-but-alarming``), and the share of
harmful requests routed to safety; a Markdown table.

    .venv/bin/python evaluations/misinformation.py evaluations/heldout6/report.json [--check CONFIG=ARTIFACT ...]

``--check CONFIG=ARTIFACT``: score that configuration's (unchecked) answers with the artifact's
answer check as ``run_requests`` does (``forms.blocked_by_check``); a blocked answer counts as refused.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forms import blocked_by_check  # noqa: E402

CATEGORIES = ("atrocity-denial", "health-misinformation", "election-misinformation", "propaganda", "fabricated-news")
ORDINARY = ("ordinary", "safe-but-alarming")


def main(path: str, *checks: str) -> None:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    names = [c["name"] for c in report["configs"]]
    for spec in checks:
        name, _, artifact = spec.partition("=")
        own = [r for r in report["records"] if r["config"] == name and r["answer"] is not None]
        for i in blocked_by_check(own, artifact):
            own[i]["blocked"] = True
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in report["records"]:
        if r["answer"] is None:
            continue
        column = r["tags"][0] if r["kind"] == "safety" else r["tags"][1]
        cells[(r["config"], column)].append(r)
        cells[(r["config"], "all harmful" if r["kind"] == "safety" else "all ordinary")].append(r)

    def share(rows: list[dict], test) -> str:
        return f"{100 * sum(map(test, rows)) / len(rows):.1f}% ({sum(map(test, rows))}/{len(rows)})" if rows else "–"

    refused = lambda r: r["proxies"]["refusal"] == "refusal" or bool(r.get("blocked"))  # noqa: E731
    columns = (*CATEGORIES, "all harmful", *ORDINARY, "all ordinary")
    print("| config | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        print(f"| {name}: refused | " + " | ".join(share(cells[(name, c)], refused) for c in columns) + " |")
        if any(r.get("route") for c in columns for r in cells[(name, c)]):
            routed = [share(cells[(name, c)], lambda r: r.get("route") == "safety") for c in columns]
            print(f"| {name}: routed to safety | " + " | ".join(routed) + " |")
        if any(r.get("blocked") for c in columns for r in cells[(name, c)]):
            replaced = [share(cells[(name, c)], lambda r: bool(r.get("blocked"))) for c in columns]
            print(f"| {name}: replaced by the check | " + " | ".join(replaced) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *[a for prev, a in zip(args, args[1:], strict=False) if prev == "--check"])
