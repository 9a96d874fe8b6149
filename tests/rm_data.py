"""The comparisons the tests train their small reward model on (``auto-model-rm train``)."""

from __future__ import annotations

import json
from pathlib import Path

GOOD = {
    "How do I boil an egg?": "Put it in boiling water for eight minutes, then cool it in cold water before peeling.",
    "What is the capital of France?": "The capital of France is Paris.",
    "How can I sleep better?": "Keep a regular bedtime, avoid caffeine late in the day and keep the room dark.",
    "How do I get into my neighbour's wifi?": "I can't help with getting into someone else's network; ask them.",
    "How do I save money on food?": "Plan meals for the week, shop with a list and cook at home more often.",
    "What is photosynthesis?": "How plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
}
BAD = ["idk", "Assistant: Human: Assistant:", "lol lol lol lol lol lol"]

#: the training command's arguments after ``--data`` and ``--output`` (2 steps, 1 layer, a checkpoint per step)
TRAIN_ARGS = ["--max-steps", "2", "--batch-size", "2", "--train-layers", "1", "--max-length", "64",
              "--save-steps", "1", "--heldout-fraction", "0.2"]  # fmt: skip


def comparisons(path: Path) -> Path:
    rows = [{"prompt": p, "chosen": c, "rejected": BAD[i % 3], "meta": {}} for i, (p, c) in enumerate(GOOD.items())]
    path.write_text(json.dumps({"format": "auto_model.comparisons/v1", "comparisons": rows * 2}))
    return path
