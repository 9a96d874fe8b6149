"""Refusal by form on a split whose items are tagged with their form (``tags[1]``: ``plain``,
``past-tense``, ``hypothetical``, ``fiction-role-play``, ``multi-turn``, ``padded``), from an
``auto-model-eval`` report; a Markdown table, and the share of requests each configuration routed
to safety.

    .venv/bin/python evaluations/forms.py evaluations/heldout5/report.json [--check CONFIG=ARTIFACT ...]

``--check CONFIG=ARTIFACT``: the answers of that configuration as the SDK returns them with the
artifact's answer check (``auto_model.answer_check``): an answer it blocks is the refusal (so it
counts as refused), and rows say how many answers the check replaced. The report's answers are
the configuration's with ``check_answers = false``; scoring them here is what ``run_requests``
does to a non-streamed answer (the same scores, the same threshold).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

FORMS = ("plain", "past-tense", "hypothetical", "fiction-role-play", "multi-turn", "padded")


def asked(record: dict) -> str:
    """What the SDK's answer check reads a record's answer beside (its conversation's user turns)."""
    from auto_model.routing import conversation_text

    turns = [m["content"] for m in record.get("messages") or () if m["role"] == "user"]
    return conversation_text(record["query"], turns[:-1])


def blocked_by_check(records: list[dict], artifact: str) -> set[int]:
    """The indices of ``records`` whose answers the artifact's answer check replaces (at their routes' thresholds)."""
    from auto_model.answer_check import AnswerCheck
    from auto_model.artifacts import load_prompt_artifact
    from auto_model.retrieval import ICLRetriever, load_icl_pool

    check = AnswerCheck.from_dict(load_prompt_artifact(artifact).answer_check)
    rows = [i for i, r in enumerate(records) if r["answer"] and r["answer"].strip()]
    embed = ICLRetriever(load_icl_pool()).embed
    scores = check.scores([records[i]["answer"] for i in rows], embed, [asked(records[i]) for i in rows])
    return {
        i for i, s in zip(rows, scores, strict=True) if check.replaces(records[i]["answer"], s, records[i].get("route"))
    }


def main(path: str, *checks: str) -> None:
    report = json.loads(open(path, encoding="utf-8").read())
    names = [c["name"] for c in report["configs"]]
    for spec in checks:
        name, _, artifact = spec.partition("=")
        own = [r for r in report["records"] if r["config"] == name and r["answer"] is not None]
        for i in blocked_by_check(own, artifact):
            own[i]["blocked"] = True
            own[i]["proxies"] = {**own[i]["proxies"], "refusal": "refusal"}
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
        if any(r.get("blocked") for f in columns for k in ("safety", "regular") for r in cells[(name, k, f)]):
            for kind, what in (("safety", "harmful"), ("regular", "ordinary")):
                shares = [rate(cells[(name, kind, f)], lambda r: bool(r.get("blocked"))) for f in columns]
                print(f"| {name}: {what} answers replaced by the check | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *[a for prev, a in zip(args, args[1:], strict=False) if prev == "--check"])
