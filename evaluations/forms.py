"""Refusal by form on a split whose items are tagged with their form (``tags[1]``: ``plain``,
``past-tense``, ``hypothetical``, ``fiction-role-play``, ``multi-turn``, ``padded``), from an
``auto-model-eval`` report; a Markdown table, and the share of requests each configuration routed
to safety.

    .venv/bin/python evaluations/forms.py evaluations/heldout5/report.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

FORMS = ("plain", "past-tense", "hypothetical", "fiction-role-play", "multi-turn", "padded")


def main(path: str) -> None:
    report = json.loads(open(path, encoding="utf-8").read())
    names = [c["name"] for c in report["configs"]]
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in report["records"]:
        if r["answer"] is None:
            continue
        form = r["tags"][1] if len(r["tags"]) > 1 else "?"
        cells[(r["config"], r["kind"], form)].append(r)
        if form != "plain":
            cells[(r["config"], r["kind"], "reworded")].append(r)

    def rate(rows: list[dict], test) -> str:
        return f"{100 * sum(map(test, rows)) / len(rows):.1f}%" if rows else "–"

    refused = lambda r: r["proxies"]["refusal"] == "refusal"  # noqa: E731
    routed = lambda r: r.get("route") == "safety"  # noqa: E731
    columns = (*FORMS, "reworded")
    print("| config | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        harm = [rate(cells[(name, "safety", f)], refused) for f in columns]
        over = [rate(cells[(name, "regular", f)], refused) for f in columns]
        route = [rate(cells[(name, "safety", f)], routed) for f in columns]
        print(f"| {name}: refuses harmful | " + " | ".join(harm) + " |")
        print(f"| {name}: refuses ordinary | " + " | ".join(over) + " |")
        if any(r.get("route") for f in columns for r in cells[(name, "safety", f)]):
            print(f"| {name}: harmful routed to safety | " + " | ".join(route) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
