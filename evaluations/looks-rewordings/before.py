"""Write each shipped artifact with ``rewordings`` off (the router before this change) beside this file.

``python evaluations/looks-rewordings/before.py`` writes ``before-smollm2.json`` and ``before-gemma.json``
(not kept in git: they are the shipped artifacts with one routing setting changed).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for name, file in (("smollm2", "smollm2-135m-instruct.json"), ("gemma", "gemma-3-270m.json")):
    artifact = json.loads((ROOT / "auto_model" / "optimized_prompts" / file).read_text())
    artifact["routing"]["rewordings"] = False
    (HERE / f"before-{name}.json").write_text(json.dumps(artifact, ensure_ascii=False))
