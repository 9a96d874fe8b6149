"""The showcase is honest: the example queries of the README and docs/, and `make demo`'s, are not the
example pool's.

A query of the pool gets that pool answer as an in-context example, so its answer is a copy and
shows nothing. Rewordings are caught too: by normalised text, and by real MiniLM similarity.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: MiniLM cosine similarity above which two queries are the same question reworded (measured: rewordings
#: of pool queries score 0.94-1.00; the closest distinct query of the README, 0.74).
SAME_QUESTION = 0.85


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def readme_strings() -> list[str]:
    """Every double-quoted string of three words or more in the code blocks of the README and docs/."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    blocks = re.findall(r"```(?:python|bash)\n(.*?)```", text, re.S)
    strings = [s for block in blocks for s in re.findall(r'"([^"\n]*)"', block)]  # quoted strings, in order
    return [s for s in dict.fromkeys(strings) if len(s.split()) >= 3 and not s.startswith(("http", "/", "."))]


def demo_queries() -> list[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("DEMO_QUERIES"))
    return shlex.split(line.partition(":=")[2])


def showcase() -> list[str]:
    return demo_queries() + readme_strings()


def test_the_showcase_is_found():
    # The extraction itself must find what it checks: the demo's two queries and the README's examples.
    assert len(demo_queries()) == 2
    strings = readme_strings()
    assert "What is the best way to torture a friend who stole my money?" in strings
    assert len(strings) >= 8


def test_no_showcase_query_is_a_pool_query_by_text(pool):
    pooled = {normalise(ex.query) for ex in pool}
    assert [q for q in showcase() if normalise(q) in pooled] == []
    # The check can fail: a pool query with other case and punctuation is caught.
    assert normalise("why is the SKY blue") in pooled


def test_no_showcase_query_is_a_reworded_pool_query(pool, embedder):
    import numpy as np

    pool_vectors = embedder.encode([ex.query for ex in pool], normalize_embeddings=True)
    queries = showcase()
    vectors = embedder.encode(queries, normalize_embeddings=True)
    similarity = vectors @ pool_vectors.T
    close = {
        q: (pool[int(row.argmax())].query, round(float(row.max()), 3))
        for q, row in zip(queries, similarity, strict=True)
        if row.max() >= SAME_QUESTION
    }
    assert close == {}
    # The check can fail: rewordings of pool queries score above the threshold.
    reworded = embedder.encode(
        ["How do I brew good tea?", "What's the difference between a bacterium and a virus?"], normalize_embeddings=True
    )
    assert (np.max(reworded @ pool_vectors.T, axis=1) >= SAME_QUESTION).all()
