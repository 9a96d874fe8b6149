"""3. Overhead per request: prompt assembly + retrieval (query embedding + FAISS), p50/p99.

Measured on :meth:`AutoModel.format_prompt`, which does everything ``generate`` does before the
engine: system prompt, example retrieval, chat-template rendering. The embedding of the query is
timed on its own (the retriever's embedding step is wrapped), so the facade's own cost is the rest.
A lone query is embedded by the retriever's traced encoder; its time beside ``encode`` is a note. Two pools: the
packaged one, and a synthetic pool of 100,000 examples, which the retriever searches with an IVF
index (above ``EXACT_SEARCH_MAX``); its exact search is timed beside it for comparison.

The synthetic pool's vectors are 1,000 real MiniLM embeddings of generated questions, each with 100
noisy copies (renormalised), written to a private embedding cache: embedding 100,000 texts would
take minutes and is a one-time cost that the retriever caches anyway.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    Ratio,
    Record,
    finish,
    log,
    parser,
    percentile,
    queries,
    smoke_done,
    timed,
)

SYNTHETIC_SIZE = 100_000
TOPICS = ["cooking", "taxes", "gardening", "Python", "history", "travel", "sleep", "chemistry", "running", "music"]


def _synthetic_pool(size: int, embedder: Any, cache_dir: Path, timer: _EmbeddingTimer) -> Any:
    import numpy as np

    from auto_model.retrieval import ICLExample

    pool = [
        ICLExample(
            f"Question {i} about {TOPICS[i % len(TOPICS)]}: how does case {i // len(TOPICS)} work?",
            f"<START>An answer to question {i}.<END>",
        )
        for i in range(size)
    ]
    base_n = min(1000, size)
    base = embedder.encode(
        [ex.query for ex in pool[:base_n]],
        batch_size=64,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype("float32")
    rng = np.random.default_rng(0)
    vectors = base[np.arange(size) % base_n] + rng.normal(0, 0.02, (size, base.shape[1])).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    retriever = timer.retriever(pool, embedder=embedder, cache_dir=cache_dir)
    np.save(
        cache_dir / f"{retriever.cache_key()}.npy", np.ascontiguousarray(vectors, dtype="float32"), allow_pickle=False
    )
    return retriever


class _EmbeddingTimer:
    """Adds up the time the retrievers it made spend embedding queries."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def retriever(self, *args: Any, **kwargs: Any) -> Any:
        """An :class:`ICLRetriever` whose :meth:`embed` is timed."""
        from auto_model.retrieval import ICLRetriever

        timer = self

        class TimedRetriever(ICLRetriever):
            def embed(self, texts: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return super().embed(texts)
                finally:
                    timer.seconds += time.perf_counter() - t0

        return TimedRetriever(*args, **kwargs)


def _embedding_alone(retriever: Any, embedder: Any, qs: list[str]) -> str:
    """p50 of one query's embedding: the traced encoder vs. sentence-transformers' encode."""
    single = retriever.single_encoder()
    if single is None:
        return "lone queries: the embedder could not be traced; encode is used"
    traced, plain = [], []
    for q in qs:
        traced.append(timed(functools.partial(single, q))[1])
        plain.append(
            timed(
                functools.partial(
                    embedder.encode, [q], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
                )
            )[1]
        )
    return (
        f"one query's embedding alone, p50: traced encoder {percentile(traced, 50) * 1e3:.2f} ms, "
        f"sentence-transformers encode {percentile(plain, 50) * 1e3:.2f} ms"
    )


def _routing_overhead(model: Any, qs: list[str], rounds: int) -> tuple[float, str]:
    """What routing adds to a single query's retrieval, the embedding aside (it is shared): p50 of
    the routed search (the safety score: the vote over the routing set and the classifier; then the
    route's own search) minus p50 of the plain search of the full pool, in ms."""
    retriever, router = model.retriever, model.router
    vectors = retriever.embed(qs)
    router.search(qs[:2], 3, vectors=vectors[:2])  # the route parts built and embedded
    plain, routed = [], []
    for _ in range(rounds):
        for i, q in enumerate(qs):
            v = vectors[i : i + 1]
            plain.append(timed(functools.partial(retriever.search_embedded, v, 3))[1])
            routed.append(timed(functools.partial(router.search, [q], 3, vectors=v))[1])
    added = (percentile(routed, 50) - percentile(plain, 50)) * 1e3
    safety = sum(r.name == "safety" for r in router.route(qs))
    note = (f"routing: plain search p50 {percentile(plain, 50) * 1e3:.3f} ms, routed search p50 "
            f"{percentile(routed, 50) * 1e3:.3f} ms ({safety} of {len(qs)} queries routed to safety)")  # fmt: skip
    return added, note


def _measure(
    model: Any, timer: _EmbeddingTimer, qs: list[str], batch: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Per-request seconds (total, and without the embedding) over ``rounds`` passes of ``qs``."""
    totals, facade = [], []
    for _ in range(rounds):
        for start in range(0, len(qs), batch):
            part = qs[start : start + batch]
            timer.seconds = 0.0
            t0 = time.perf_counter()
            model.format_prompt(part if batch > 1 else part[0])
            dt = time.perf_counter() - t0
            totals += [dt / len(part)] * len(part)
            facade += [(dt - timer.seconds) / len(part)] * len(part)
    return totals, facade


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=SYNTHETIC_SIZE)
    p.add_argument("--rounds", type=int, default=5, help="passes over the queries per mode")
    args = p.parse_args(argv)
    qs = queries(args.queries)
    if args.smoke:
        plan = f"{len(qs)} queries x {args.rounds} rounds, packaged pool and {args.synthetic:,} synthetic"
        return smoke_done("overhead", plan, needs=("faiss", "sentence_transformers"))

    from auto_model import AutoModel

    # The engine is not used: format_prompt stops before it. transformers is the quickest to load.
    model = AutoModel(backend="transformers")
    embedder = model.retriever.embedder
    timer = _EmbeddingTimer()
    rows: list[list[Any]] = []
    results: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        packaged = timer.retriever(model.icl_pool, embedder=embedder, cache_dir=Path(tmp))
        t0 = time.perf_counter()
        synthetic = _synthetic_pool(args.synthetic, embedder, Path(tmp), timer)
        log(f"overhead: synthetic pool of {args.synthetic:,} vectors ready in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        synthetic.index  # noqa: B018  (build: IVF training and adding the vectors)
        build_s = time.perf_counter() - t0
        log(f"overhead: {'exact' if synthetic.exact else 'IVF'} index built in {build_s:.1f} s")
        for pool_name, retriever in (
            (f"packaged ({len(model.icl_pool)})", packaged),
            (f"synthetic ({args.synthetic:,})", synthetic),
        ):
            model.retriever = retriever
            _measure(model, timer, qs[:8], 8, 1)  # warm-up (and the traced encoder built)
            _measure(model, timer, qs[:8], 1, 1)
            for mode, batch in (("single", 1), ("batch", len(qs))):
                total, facade = _measure(model, timer, qs, batch, args.rounds)
                results[(pool_name, mode)] = (total, facade)
                rows.append(
                    [
                        pool_name,
                        mode,
                        percentile(facade, 50) * 1e3,
                        percentile(facade, 99) * 1e3,
                        percentile(total, 50) * 1e3,
                        percentile(total, 99) * 1e3,
                    ]
                )
        search_rows = _search_only(synthetic, embedder, qs)
        embed_note = _embedding_alone(packaged, embedder, qs)
        model.retriever = packaged
        routing_ms, routing_note = _routing_overhead(model, qs, args.rounds)
    model.close()

    single_facade = [results[k][1] for k in results if k[1] == "single"]
    single_total = [results[k][0] for k in results if k[1] == "single"]
    worst_facade = max(percentile(f, 50) for f in single_facade) * 1e3
    worst_total = max(percentile(t, 50) for t in single_total) * 1e3
    notes = [
        "synthetic pool index: "
        + ("exact" if synthetic.exact else f"IVF, {synthetic.index.nlist} cells, nprobe {synthetic.index.nprobe}")
        + f", built in {build_s:.1f} s (then cached)",
        *search_rows,
        embed_note,
        routing_note,
        "ms per request; batch mode = one format_prompt call for all queries, divided by their number",
    ]
    record = Record(
        "overhead",
        "3. Overhead per request: prompt assembly + retrieval (CPU)",
        {"queries": len(qs), "rounds": args.rounds, "synthetic_pool": args.synthetic, "k": 3},
        ["pool", "mode", "facade p50 ms", "facade p99 ms", "with embedding p50 ms", "with embedding p99 ms"],
        rows,
        [
            Ratio(
                "facade overhead without the embedding, single query, p50 (worst pool)", worst_facade, 1.0, False, " ms"
            ),
            Ratio("overhead with the embedding, single query, p50 (worst pool)", worst_total, 10.0, False, " ms"),
            Ratio("routing on top of retrieval, single query, p50 (packaged pool)", routing_ms, 1.0, False, " ms"),
        ],
        notes,
    )
    return finish(record, args)


def _search_only(retriever: Any, embedder: Any, qs: list[str]) -> list[str]:
    """FAISS search alone on the synthetic pool: the retriever's IVF index vs. exact search."""
    import faiss

    vectors = embedder.encode(qs, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).astype(
        "float32"
    )
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(retriever.pool_embeddings())
    lines = []
    found: dict[str, list[set[int]]] = {}
    for name, index in (("retriever's index", retriever.index), ("exact flat index", exact)):
        times = []
        for v in vectors:
            t0 = time.perf_counter()
            _, ids = index.search(v[None, :], 3)
            times.append(time.perf_counter() - t0)
            found.setdefault(name, []).append(set(ids[0].tolist()))
        lines.append(
            f"FAISS search alone, {name}: p50 {percentile(times, 50) * 1e3:.3f} ms, "
            f"p99 {percentile(times, 99) * 1e3:.3f} ms"
        )
    pairs = zip(found["retriever's index"], found["exact flat index"], strict=True)
    recall = sum(len(a & b) for a, b in pairs) / (3 * len(qs))
    lines.append(f"top-3 recall of the retriever's index against exact search: {recall:.1%}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
