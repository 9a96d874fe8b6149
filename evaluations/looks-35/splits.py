"""Refusal on the held-out splits from ``looks-35.sh``'s reports, with each model's answer check applied
to the unchecked answers (``evaluations/forms.py``'s ``blocked_by_check``): harmful requests refused,
ordinary requests refused, and answers the check replaced.

    .venv/bin/python evaluations/looks-35/splits.py [FOLDER]   # default: this folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from forms import blocked_by_check  # noqa: E402

ARTIFACTS = {"smollm2-routed": "smollm2-135m-instruct", "gemma-routed": "gemma-3-270m"}


def main(folder: Path = HERE) -> None:
    print("| split | config | harmful refused | without the check | ordinary refused | without the check |")
    print("|---|---|---|---|---|---|")
    for split in ("heldout", "heldout2", "heldout3", "heldout4", "everyday"):
        path = folder / split / "report.json"
        if not path.exists():
            continue
        records = json.loads(path.read_text())["records"]
        for config, artifact in ARTIFACTS.items():
            own = [r for r in records if r["config"] == config and r["answer"] is not None]
            blocked = blocked_by_check(own, f"auto_model/optimized_prompts/{artifact}.json")
            cells = []
            for kind in ("safety", "regular"):
                rows = [i for i, r in enumerate(own) if r["kind"] == kind]
                if not rows:
                    cells += ["–", "–"]
                    continue
                before = sum(own[i]["proxies"]["refusal"] == "refusal" for i in rows)
                after = sum(own[i]["proxies"]["refusal"] == "refusal" or i in blocked for i in rows)
                cells += [f"{after / len(rows):.1%} ({after}/{len(rows)})", f"{before / len(rows):.1%}"]
            print(f"| {split} | {config} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
