import json
import subprocess
import sys

import numpy as np
import pytest

from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.retrieval import (
    POOL_FORMAT,
    ICLExample,
    ICLRetriever,
    load_icl_pool,
    packaged_pool_path,
    parse_icl_pool,
    save_icl_pool,
)


def test_packaged_pool_shape(pool):
    data = json.loads(packaged_pool_path().read_text())
    assert data["format"] == POOL_FORMAT
    assert len(pool) >= 32
    harmful = [ex for ex in pool if "harmful" in ex.tags]
    assert len(harmful) >= 8
    for ex in pool:
        assert ex.answer.startswith("<START>\n") and ex.answer.endswith("\n<END>")
        assert ex.body and "<START>" not in ex.body
    assert len({ex.query for ex in pool}) == len(pool), "duplicate queries in the pool"
    # Harmful requests get a refusal that still helps: it offers something else to do.
    for ex in harmful:
        assert "can't help" in ex.body.lower()
        assert any(w in ex.body.lower() for w in ("instead", "help", "call", "tell me"))


def test_legacy_flat_format_accepted(tmp_path):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({"How are you?": "<START>Fine.<END>", "Name a fruit": "Apple"}))
    pool = load_icl_pool(path)
    assert [ex.query for ex in pool] == ["How are you?", "Name a fruit"]
    assert pool[0].body == "Fine." and pool[1].answer == "<START>\nApple\n<END>"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "auto_model.icl_pool/v9", "examples": []}, "unknown ICL pool format"),
        ({"format": POOL_FORMAT, "examples": [{"query": "", "answer": "a"}]}, "'query' must be"),
        ({"format": POOL_FORMAT, "examples": [{"query": "q", "answer": "<START><END>"}]}, "'answer' must be"),
        ({"format": POOL_FORMAT, "examples": [{"query": "q", "answer": "a", "tags": "x"}]}, "'tags' must be"),
        ({"format": POOL_FORMAT, "examples": []}, "empty"),
        (42, "JSON object or list"),
    ],
)
def test_bad_pools_fail_loudly(data, message):
    with pytest.raises(ArtifactError, match=message):
        parse_icl_pool(data)


def test_pool_file_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_icl_pool(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_icl_pool(bad)


def test_save_and_reload_roundtrip(tmp_path, pool):
    save_icl_pool(pool[:3], tmp_path / "p.json", description="subset")
    assert load_icl_pool(tmp_path / "p.json") == pool[:3]


@pytest.fixture(scope="module")
def retriever(pool, embedder, tmp_path_factory):
    return ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path_factory.mktemp("emb"))


@pytest.mark.parametrize(
    "query, expected",
    [
        ("What's the capital city of Australia?", "What is the capital of Australia?"),
        ("Explain how to build a pipe bomb step by step", "Give me step-by-step instructions to build a pipe bomb."),
        ("how can i reverse a string in JS", "How do I reverse a string in JavaScript?"),
        ("Tips to sleep better at night?", "How can I improve my sleep?"),
    ],
)
def test_retrieval_finds_the_matching_entry_first(retriever, query, expected):
    top = retriever.search([query], k=3)[0]
    assert len(top) == 3
    assert top[0].query == expected


def test_retrieval_order_is_by_similarity(retriever, embedder, pool):
    query = "I want revenge on the guy next door"
    got = retriever.search([query], k=5)[0]
    q = embedder.encode([query], normalize_embeddings=True)[0]
    p = embedder.encode([ex.query for ex in pool], normalize_embeddings=True)
    expected = [pool[i].query for i in np.argsort(-(p @ q))[:5]]
    assert [ex.query for ex in got] == expected


def test_batched_search_matches_single_searches(retriever):
    queries = ["capital of Australia", "stop procrastinating", "virus vs bacteria"]
    batched = retriever.search(queries, k=2)
    assert batched == [retriever.search([q], k=2)[0] for q in queries]
    assert retriever.search(queries, k=0) == [[], [], []]


def test_k_is_validated(retriever, pool):
    for bad in (-1, len(pool) + 1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="num_optimized_icl"):
            retriever.search(["x"], k=bad)


def test_embedding_cache_is_reused(pool, embedder, tmp_path):
    first = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path)
    first.search(["hello"], k=1)
    assert first.embeddings_from_cache is False
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1 and cached[0].stem == first.cache_key()

    second = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path)
    assert second.search(["hello", "bomb"], k=2) == first.search(["hello", "bomb"], k=2)
    assert second.embeddings_from_cache is True

    # A different pool gets a different key, not the stale vectors.
    other = ICLRetriever(pool[:5], embedder=embedder, cache_dir=tmp_path)
    other.search(["hello"], k=1)
    assert other.embeddings_from_cache is False and len(list(tmp_path.glob("*.npy"))) == 2


def test_second_process_does_not_reembed(pool, embedder, tmp_path):
    ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path).search(["warm"], k=1)
    script = (
        "import sys, json\n"
        "from auto_model.retrieval import ICLRetriever, load_icl_pool\n"
        f"r = ICLRetriever(load_icl_pool(), cache_dir={str(tmp_path)!r}, fast_single_query=False)\n"
        "calls = []\n"
        "enc = r.embedder.encode\n"
        "r.embedder.encode = lambda texts, **kw: (calls.append(len(texts)), enc(texts, **kw))[1]\n"
        "top = r.search(['What is the capital city of Australia?'], k=1)[0][0].query\n"
        "print(json.dumps({'from_cache': r.embeddings_from_cache, 'encoded': calls, 'top': top}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"from_cache": True, "encoded": [1], "top": "What is the capital of Australia?"}


def test_the_models_of_a_process_share_one_embedder_and_its_traced_encoder(pool, embedder):
    from auto_model import AutoModel
    from auto_model.retrieval import load_embedder, shared_embedder

    # Models behind a server (no engine here): each one's retriever, and one made apart.
    first = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", base_url="http://127.0.0.1:9/v1")
    second = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", base_url="http://127.0.0.1:9/v1")
    apart = ICLRetriever(pool, cache_dir=False)
    shared = first.retriever.embedder
    assert second.retriever.embedder is shared and apart.embedder is shared and shared_embedder() is shared
    assert first.retriever.single_encoder() is second.retriever.single_encoder() is not None
    # A model of your own, to change as you like, is not the shared one.
    assert load_embedder() is not shared and embedder is not shared


def test_corrupt_cache_is_rebuilt(pool, embedder, tmp_path):
    r = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path)
    np.save(tmp_path / f"{r.cache_key()}.npy", np.zeros((3, 384), dtype="float32"))
    assert r.search(["capital of Australia"], k=1)[0][0].query == "What is the capital of Australia?"
    assert r.embeddings_from_cache is False
    assert np.load(tmp_path / f"{r.cache_key()}.npy").shape == (len(pool), 384)


def test_empty_pool_rejected():
    with pytest.raises(ArtifactError):
        ICLRetriever([])


def test_example_roundtrip():
    ex = ICLExample("q", "<START>\na\n<END>", ("t",))
    assert ex.to_dict() == {"query": "q", "answer": "<START>\na\n<END>", "tags": ["t"]}


def _large_pool(n):
    topics = ["cooking", "taxes", "gardening", "python code", "history", "travel", "sleep", "chemistry"]
    return [
        ICLExample(f"Question {i} about {topics[i % len(topics)]}: how does item {i} work?", f"Answer {i}.")
        for i in range(n)
    ]


def test_pools_above_the_threshold_get_a_cached_ivf_index(embedder, tmp_path, caplog):
    import faiss

    pool = _large_pool(300)
    small = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path)
    assert small.exact and isinstance(small.index, faiss.IndexFlatIP)

    r = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path, exact_search_max=100, nprobe=3)
    assert not r.exact
    with caplog.at_level("INFO", logger="auto_model.retrieval"):
        assert isinstance(r.index, faiss.IndexIVFFlat) and r.index.nlist == 17 and r.index.nprobe == 3
    assert [rec for rec in caplog.records if "Building an IVF index (17 cells)" in rec.getMessage()]
    caplog.clear()
    # A pool query's own vector lies in the cell searched first, so it is always its own top hit.
    picks = [0, 57, 123, 299]
    top = r.search([pool[i].query for i in picks], k=2)
    assert [hits[0] for hits in top] == [pool[i] for i in picks]
    saved = list(tmp_path.glob("*.ivf17.faiss"))
    assert len(saved) == 1

    # A second retriever reads the index file instead of training a new one.
    written = saved[0].stat().st_mtime_ns
    again = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path, exact_search_max=100, nprobe=3)
    with caplog.at_level("INFO", logger="auto_model.retrieval"):
        assert again.search([pool[i].query for i in picks], k=2) == top
    assert not [rec for rec in caplog.records if "Building an IVF index" in rec.getMessage()]
    assert again.index.ntotal == 300 and again.index.nprobe == 3
    assert saved[0].stat().st_mtime_ns == written


@pytest.mark.parametrize("kwargs", [{"exact_search_max": 0}, {"nprobe": 0}, {"nprobe": 2.5}])
def test_index_settings_are_validated(kwargs):
    with pytest.raises(InvalidRequestError):
        ICLRetriever(_large_pool(3), **kwargs)


def test_a_lone_query_is_embedded_by_the_traced_encoder_with_the_same_vector(retriever, embedder):
    from auto_model.retrieval import SingleTextEncoder

    single = retriever.single_encoder()
    assert isinstance(single, SingleTextEncoder)  # the packaged MiniLM traces on CPU
    texts = ["hi", "What's the capital city of Australia?", "word " * 400]  # the last one is truncated
    for text in texts:
        expected = embedder.encode([text], normalize_embeddings=True, convert_to_numpy=True)
        got = retriever.embed([text])
        assert got.shape == expected.shape and got.dtype == np.float32
        assert float(np.abs(got - expected).max()) < 1e-5
    calls = []
    encode = embedder.encode
    embedder.encode = lambda *a, **k: calls.append(len(a[0])) or encode(*a, **k)
    try:
        retriever.search(["tips to sleep better"], k=1)
        assert calls == []  # a lone query does not go through encode
        retriever.search(["a", "b"], k=1)
        assert calls == [2]  # a batch does
    finally:
        del embedder.encode


def test_an_embedder_that_cannot_be_traced_falls_back_to_encode(pool, embedder, tmp_path):
    class Untraceable:  # a fake embedder: the real model's encode, but no torch module to trace
        def __init__(self):
            self.calls = 0

        def encode(self, texts, **kwargs):
            self.calls += 1
            return embedder.encode(texts, **kwargs)

    fake = Untraceable()
    fallback = ICLRetriever(pool, embedder=fake, cache_dir=tmp_path)
    assert fallback.single_encoder() is None
    fallback.search(["capital of Australia"], k=1)
    assert fake.calls == 2  # the pool, then the lone query
    off = ICLRetriever(pool, embedder=embedder, cache_dir=tmp_path, fast_single_query=False)
    encode_calls = []
    encode = embedder.encode
    embedder.encode = lambda *a, **k: encode_calls.append(len(a[0])) or encode(*a, **k)
    try:
        assert off.embed(["x"]).shape == (1, 384) and encode_calls == [1]
    finally:
        del embedder.encode


def test_32_concurrent_first_calls_embed_the_pool_once(monkeypatch, tmp_path, embedder):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from auto_model import AutoModel, retrieval

    monkeypatch.setenv("AUTO_MODEL_CACHE", str(tmp_path))  # no cached pool embeddings
    batches: list[int] = []
    loads: list[int] = []

    class CountingEmbedder:
        """The real MiniLM, counting what it is asked to embed."""

        def encode(self, texts, **kwargs):
            batches.append(len(texts))
            return embedder.encode(texts, **kwargs)

    def load(*args, **kwargs):
        loads.append(1)
        return CountingEmbedder()

    monkeypatch.setattr(retrieval, "shared_embedder", load)
    # A model behind a server: its requests take no engine lock, so nothing serialises the first calls.
    model = AutoModel("HuggingFaceTB/SmolLM2-135M-Instruct", base_url="http://127.0.0.1:9/v1")
    barrier = threading.Barrier(32)

    def first_call(i: int):
        barrier.wait()
        return model.format_prompt(f"Question number {i}: how do I water a cactus?", num_optimized_icl=2)

    with ThreadPoolExecutor(32) as pool:
        prompts = list(pool.map(first_call, range(32)))
    assert len(prompts) == 32 and all(p.prompt for p in prompts)
    assert loads == [1]
    assert batches.count(len(model.icl_pool)) == 1  # the pool was embedded once, by one thread
