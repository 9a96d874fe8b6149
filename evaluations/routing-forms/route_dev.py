"""Where the router sends the development requests, by form (no engine: routing only).

``python evaluations/routing-forms/route_dev.py ARTIFACT.json [--no-segments] [--split NAME ...]``
prints, per split and form, the share of harmful and of ordinary requests that take the safety
route. The default splits are the development ones (``dev``, ``dev-forms``, ``everyday-dev``);
conversations (``messages``) are routed on their user turns as the SDK routes them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

from auto_model.artifacts import load_prompt_artifact
from auto_model.evaluation.eval_set import load_eval_set
from auto_model.retrieval import ICLRetriever, load_icl_pool
from auto_model.router import RoutedRetriever
from auto_model.routing import RoutingSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--no-segments", action="store_true", help="route on the last user turn alone")
    parser.add_argument("--split", action="append", default=None)
    args = parser.parse_args()
    artifact = load_prompt_artifact(args.artifact)
    settings = RoutingSettings.from_dict(artifact.routing)
    if args.no_segments:
        settings = dataclasses.replace(settings, segments=False)
    router = RoutedRetriever(ICLRetriever(artifact.edit_pool(load_icl_pool())), settings)
    for split in args.split or ["dev", "dev-forms", "everyday-dev"]:
        items = load_eval_set(f"auto_model/data/eval/{split}.jsonl")
        earlier = []
        for item in items:
            turns = [m["content"] for m in (item.conversation or ()) if m["role"] == "user"]
            earlier.append(turns[:-1])
        routes = router.route([i.query for i in items], earlier=earlier)
        table: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for item, route in zip(items, routes, strict=True):
            form = item.tags[-1] if split.startswith("dev-forms") else "plain"
            for key in (form, "all"):
                table[(item.kind, key)].append(route.name == "safety")
        for (kind, form), hits in sorted(table.items()):
            print(f"{split:13s} {kind:8s} {form:18s} {sum(hits):3d}/{len(hits):3d} = {sum(hits) / len(hits):6.1%}")


if __name__ == "__main__":
    main()
