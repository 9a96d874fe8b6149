"""In-context example pool and retrieval (sentence-transformers embeddings + a FAISS index).

The pool is versioned JSON (``"format": "auto_model.icl_pool/v1"``); the legacy flat
``{query: answer}`` file is accepted too. Pool embeddings are cached on disk, keyed by the pool's
content hash and the embedder, so a second process answers its first query without re-embedding.

Pools up to :data:`EXACT_SEARCH_MAX` examples are searched exactly (a flat inner-product index).
Larger pools get an inverted-file index (IVF: k-means cells, a few searched per query), which answers
in well under a millisecond at 100,000 examples where exact search takes several; it is built once
and cached next to the embeddings, in FAISS's own file format.

A single query (the common case of ``generate`` on one string) is embedded by a traced, frozen copy
of the embedder on CPU (:class:`SingleTextEncoder`): for one short text, most of eager PyTorch's
time is per-operation overhead, and the frozen graph gives the same vector in about two thirds of
the time. Batches go through sentence-transformers' ``encode``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model import constants
from auto_model.errors import ArtifactError, InvalidRequestError, MissingDependencyError
from auto_model.files import atomic_open, atomic_write_text
from auto_model.logs import drop_records, engine_progress_bars
from auto_model.prompting import END, START, format_answer, strip_markers

logger = logging.getLogger(__name__)

POOL_FORMAT = "auto_model.icl_pool/v1"
_EMBED_CACHE_FORMAT = "auto_model.embeddings/v1"

#: Pools up to this many examples are searched exactly; larger ones with an IVF index.
EXACT_SEARCH_MAX = 20_000


@dataclass(frozen=True)
class ICLExample:
    """One in-context example: a query and the answer to imitate (kept in ``<START>…<END>``)."""

    query: str
    answer: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def body(self) -> str:
        """The answer without its markers."""
        return strip_markers(self.answer)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "answer": self.answer, "tags": list(self.tags)}


def packaged_pool_path() -> Path:
    """The ICL pool shipped inside the wheel."""
    return Path(str(resources.files("auto_model").joinpath("data/ICL_examples.json")))


def _example(raw: Any, where: str) -> ICLExample:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: expected an object with 'query' and 'answer', got {type(raw).__name__}.")
    query, answer, tags = raw.get("query"), raw.get("answer"), raw.get("tags", [])
    if not isinstance(query, str) or not query.strip():
        raise ArtifactError(f"{where}: 'query' must be a non-empty string.")
    if not isinstance(answer, str) or not strip_markers(answer):
        raise ArtifactError(f"{where}: 'answer' must be a non-empty string.")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ArtifactError(f"{where}: 'tags' must be a list of strings.")
    return ICLExample(query.strip(), format_answer(answer), tuple(tags))


def parse_icl_pool(data: Any, source: str = "<pool>") -> list[ICLExample]:
    """Validate pool JSON (versioned, or the legacy flat ``{query: answer}``) into examples."""
    if isinstance(data, dict) and "format" in data:
        if data["format"] != POOL_FORMAT:
            raise ArtifactError(
                f"{source}: unknown ICL pool format {data['format']!r}; this version reads {POOL_FORMAT!r}. "
                "Upgrade auto-model or convert the file."
            )
        items = data.get("examples")
        if not isinstance(items, list):
            raise ArtifactError(f"{source}: 'examples' must be a list.")
        examples = [_example(item, f"{source} examples[{i}]") for i, item in enumerate(items)]
    elif isinstance(data, dict):  # the legacy flat {query: answer}
        examples = [_example({"query": q, "answer": a}, f"{source} [{q[:40]!r}]") for q, a in data.items()]
    elif isinstance(data, list):
        examples = [_example(item, f"{source} [{i}]") for i, item in enumerate(data)]
    else:
        raise ArtifactError(f"{source}: an ICL pool is a JSON object or list, got {type(data).__name__}.")
    if not examples:
        raise ArtifactError(f"{source}: the ICL pool is empty.")
    return examples


def load_icl_pool(path: str | os.PathLike[str] | None = None) -> list[ICLExample]:
    """Load an ICL pool: the packaged one by default, or a user's JSON file."""
    path = Path(path).expanduser() if path is not None else packaged_pool_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"ICL pool {path} does not exist; pass icl_path= an existing JSON file.") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"ICL pool {path} is not valid JSON: {exc}") from exc
    return parse_icl_pool(data, str(path))


def save_icl_pool(examples: Sequence[ICLExample], path: str | os.PathLike[str], **metadata: Any) -> None:
    """Write a pool in the versioned format (atomically)."""
    payload = {"format": POOL_FORMAT, **metadata, "examples": [ex.to_dict() for ex in examples]}
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def load_embedder(name: str | None = None, *, device: str | None = None) -> Any:
    """A sentence-transformers model, resolved offline first (the packaged MiniLM by default)."""
    from auto_model.resolve import resolve_model

    name = name or constants.default_embedding_model()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError("sentence-transformers", "retrieval", purpose="to embed ICL examples") from exc
    source = resolve_model(name)
    if source.kind == "gguf":
        raise InvalidRequestError(
            f"{name} is a GGUF file; an embedding model must be a sentence-transformers folder or Hub id."
        )
    with engine_progress_bars():
        return SentenceTransformer(source.path, device=device or "cpu", trust_remote_code=False)


#: The embedders this process's retrievers share, by name and device, while any of them holds one.
_SHARED_EMBEDDERS: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()
_SHARED_EMBEDDERS_LOCK = threading.Lock()


def shared_embedder(name: str | None = None, *, device: str | None = None) -> Any:
    """The embedder that this process's retrievers use for ``name`` on ``device``: loaded with
    :func:`load_embedder` once, then shared while any retriever holds it, and with it the work
    done per embedder (the traced single-query encoder, the routing set's embeddings). A second
    model in a process no longer loads and traces its own (about 2 s on 2 cores). Treat it as
    read-only; a model of your own to change comes from :func:`load_embedder`."""
    key = (name or constants.default_embedding_model(), device or "cpu")
    with _SHARED_EMBEDDERS_LOCK:
        found = _SHARED_EMBEDDERS.get(key)
        if found is None:
            found = load_embedder(key[0], device=key[1])
            try:
                _SHARED_EMBEDDERS[key] = found
            except TypeError:  # an embedder that cannot be weakly referenced: not shared
                pass
    return found


class SingleTextEncoder:
    """Embeds one text at a time with a traced, frozen copy of a sentence-transformers model (CPU).

    The copy is traced on a sample text and checked against the model itself on two texts of
    different lengths (largest difference at most ``tolerance``); a model that cannot be traced or
    does not match raises ``RuntimeError``, and the caller keeps using ``encode``. The frozen copy
    holds its own weights (about 90 MB for MiniLM).
    """

    SAMPLES = ("How do I make a cup of tea?", "Explain, step by step and with an example, how a bill becomes a law.")

    def __init__(self, model: Any, tolerance: float = 1e-4):
        import numpy as np
        import torch

        if getattr(model, "device", None) is None or model.device.type != "cpu":
            raise RuntimeError("the single-text encoder is for CPU embedders")
        # sentence-transformers 5.2 renamed tokenize to preprocess (the old name warns).
        self._features = getattr(model, "preprocess", None) or model.tokenize
        sample = self._features([self.SAMPLES[0]])
        self.keys = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
        constants_ = {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}
        keys = self.keys

        class Wrapped(torch.nn.Module):  # tensors in, the normalised sentence embedding out
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *tensors: Any) -> Any:
                out = self.model({**dict(zip(keys, tensors, strict=True)), **constants_})["sentence_embedding"]
                return torch.nn.functional.normalize(out, dim=-1)

        self._torch, self._model = torch, model
        try:
            # Tracing reads every attribute of the model, deprecated ones included: their notes are not for the user.
            with (
                warnings.catch_warnings(),
                torch.inference_mode(),
                drop_records("sentence_transformers", "has been deprecated"),
                drop_records("transformers", "was set in the config but it is unrecognized"),
            ):
                warnings.simplefilter("ignore")  # the tracer's notes on shapes it treats as constants
                # check_trace=False: the tracer's own check runs the model again on the sample; the
                # comparison below, on two texts of other lengths, is the one that counts.
                traced = torch.jit.trace(
                    Wrapped().eval(), tuple(sample[k] for k in keys), strict=False, check_trace=False
                )
                self._frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception as exc:  # any model the tracer cannot handle
            raise RuntimeError(f"the embedder cannot be traced: {type(exc).__name__}: {exc}") from exc
        for text in self.SAMPLES:
            expected = model.encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            diff = float(np.abs(self(text) - expected).max())
            if not diff <= tolerance:
                raise RuntimeError(f"the traced embedder differs from the model by {diff:g}")

    def __call__(self, text: str) -> Any:
        """A (1, dim) float32 array: the normalised embedding of ``text``."""
        import numpy as np

        # No profiling executor: it would re-specialise the graph for every new text length seen
        # (measured: the first pass over new lengths about 20% slower); the frozen graph is optimised already.
        with self._torch.inference_mode(), self._torch.jit.optimized_execution(False):
            features = self._features([text])
            vector = self._frozen(*(features[k] for k in self.keys))
        return np.ascontiguousarray(vector.float().numpy(), dtype="float32")


#: One traced encoder per embedder object (False: it cannot be traced), shared by its retrievers.
_SINGLE_ENCODERS: weakref.WeakKeyDictionary[Any, SingleTextEncoder | bool] = weakref.WeakKeyDictionary()
_SINGLE_LOCK = threading.Lock()


class ICLRetriever:
    """Top-k most similar pool examples for each query.

    Args:
        pool: the examples to search.
        embedding_model: a sentence-transformers name or path (default: all-MiniLM-L6-v2, packaged);
            or pass ``embedder=`` an already-loaded model.
        cache_dir: where pool embeddings are cached (default: ``<AUTO_MODEL_CACHE>/embeddings``);
            ``False`` disables the cache.
        exact_search_max: pools up to this size are searched exactly; larger pools use an IVF
            index (approximate; ``nprobe`` cells of ``sqrt(pool size)`` are searched per query).
        nprobe: IVF cells searched per query (more: better recall, slower); default 16.
        fast_single_query: embed a lone query with :class:`SingleTextEncoder` (built on first
            use, about a second; CPU only); ``False`` always uses ``encode``.
        embeddings: the pool's embeddings, already computed with this embedder (one normalised
            row per example, in pool order): nothing is embedded or cached for the pool.

    Example:
        >>> retriever = ICLRetriever(load_icl_pool())  # doctest: +SKIP
        >>> [ex.query for ex in retriever.search(["How to make tea?"], k=2)[0]]  # doctest: +SKIP
    """

    def __init__(
        self,
        pool: Sequence[ICLExample],
        embedding_model: str | None = None,
        *,
        embedder: Any = None,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        exact_search_max: int = EXACT_SEARCH_MAX,
        nprobe: int = 16,
        fast_single_query: bool = True,
        embeddings: Any = None,
    ):
        for name, value in (("exact_search_max", exact_search_max), ("nprobe", nprobe)):
            if not constants.is_whole(value, 1):
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}.")
        if not pool:
            raise ArtifactError("The ICL pool is empty; retrieval needs at least one example.")
        self.pool = list(pool)
        if embeddings is not None and len(embeddings) != len(self.pool):
            raise InvalidRequestError(f"embeddings has {len(embeddings)} rows for a pool of {len(self.pool)} examples.")
        self._given_embeddings = embeddings
        self.embedding_model = embedding_model or constants.default_embedding_model()
        self._embedder = embedder
        if cache_dir is False:
            self._cache_dir: Path | None = None
        elif cache_dir is None or cache_dir is True:
            self._cache_dir = constants.cache_dir() / "embeddings"
        else:
            self._cache_dir = Path(cache_dir)
        self.exact_search_max = int(exact_search_max)
        self.nprobe = int(nprobe)
        self._index: Any = None
        # The embedder and the index are built on first use; concurrent first calls wait for one build.
        self._build_lock = threading.RLock()
        self.fast_single_query = bool(fast_single_query)
        self.embeddings_from_cache: bool | None = None  # set once the index is built

    @property
    def cache_dir(self) -> Path | bool:
        """Where pool embeddings are cached (False: they are not)."""
        return self._cache_dir if self._cache_dir is not None else False

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            with self._build_lock:
                if self._embedder is None:
                    self._embedder = shared_embedder(self.embedding_model)
        return self._embedder

    def __len__(self) -> int:
        return len(self.pool)

    def cache_key(self) -> str:
        """Hash of the pool's queries and the embedder: what the cached embeddings depend on."""
        digest = hashlib.sha256()
        digest.update(_EMBED_CACHE_FORMAT.encode())
        digest.update(self.embedding_model.encode())
        for ex in self.pool:
            digest.update(b"\x00" + ex.query.encode("utf-8"))
        return digest.hexdigest()[:32]

    def single_encoder(self) -> SingleTextEncoder | None:
        """The traced encoder for lone queries (built on first call, once per embedder), or None
        where the embedder cannot be traced."""
        embedder = self.embedder
        with _SINGLE_LOCK:
            try:
                found = _SINGLE_ENCODERS.get(embedder)
            except TypeError:  # an embedder that cannot be weakly referenced: not cached
                found = None
            if found is None:
                try:
                    found = SingleTextEncoder(embedder)
                except RuntimeError as exc:
                    logger.debug("Lone queries are embedded with encode: %s", exc)
                    found = False
                try:
                    _SINGLE_ENCODERS[embedder] = found
                except TypeError:
                    pass
        return found if isinstance(found, SingleTextEncoder) else None

    def embed(self, texts: Sequence[str]) -> Any:
        """The normalised float32 embeddings of ``texts``, as :meth:`search` embeds its queries
        (a lone text through the traced single-query encoder when it is on)."""
        import numpy as np

        if len(texts) == 1 and self.fast_single_query:
            single = self.single_encoder()
            if single is not None:
                return single(texts[0])
        vectors = self.embedder.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vectors, dtype="float32")

    def indexed_embeddings(self) -> Any:
        """The pool's embeddings as the index holds them: read back from an exact index (nothing is
        embedded again), else :meth:`pool_embeddings`."""
        index = self.index
        if self.exact:
            return index.reconstruct_n(0, index.ntotal)
        return self.pool_embeddings()

    def pool_embeddings(self) -> Any:
        """The pool's normalised float32 embeddings, one row per example: those given to the
        constructor, else from the cache when it holds them for this pool and embedder, else
        embedded (and cached)."""
        import numpy as np

        if self._given_embeddings is not None:
            return np.ascontiguousarray(self._given_embeddings, dtype="float32")

        path = self._cache_dir / f"{self.cache_key()}.npy" if self._cache_dir else None
        if path is not None and path.exists():
            try:
                vectors = np.load(path, allow_pickle=False)  # never unpickle a cache file
                if vectors.ndim == 2 and vectors.shape[0] == len(self.pool) and vectors.dtype == np.float32:
                    logger.debug("Loaded %d cached pool embeddings from %s", len(vectors), path)
                    self.embeddings_from_cache = True
                    return vectors
                logger.warning("Ignoring cached embeddings %s: shape %s does not fit the pool", path, vectors.shape)
            except (OSError, ValueError) as exc:
                logger.warning("Ignoring unreadable embedding cache %s: %s", path, exc)
        vectors = self.embed([ex.query for ex in self.pool])
        self.embeddings_from_cache = False
        if path is not None:
            with atomic_open(path, "wb") as fh:
                np.save(fh, vectors, allow_pickle=False)
            logger.debug("Cached %d pool embeddings in %s", len(vectors), path)
        return vectors

    @property
    def exact(self) -> bool:
        """True when the pool is small enough to be searched exactly."""
        return len(self.pool) <= self.exact_search_max

    @property
    def index(self) -> Any:
        """The FAISS index over the pool: flat (exact) for small pools, IVF above ``exact_search_max``."""
        if self._index is None:
            with self._build_lock:
                if self._index is None:
                    self._index = self._build_index()
        return self._index

    def _build_index(self) -> Any:
        try:
            import faiss
        except ImportError as exc:
            raise MissingDependencyError("faiss-cpu", "retrieval", purpose="to index ICL examples") from exc
        vectors = self.pool_embeddings()
        if self.exact:
            index = faiss.IndexFlatIP(vectors.shape[1])  # inner product of unit vectors = cosine
            index.add(vectors)
            return index
        return self._ivf_index(faiss, vectors)

    def _ivf_index(self, faiss: Any, vectors: Any) -> Any:
        cells = max(1, int(len(vectors) ** 0.5))
        path = self._cache_dir / f"{self.cache_key()}.ivf{cells}.faiss" if self._cache_dir else None
        index = None
        if path is not None and path.exists():
            try:
                index = faiss.read_index(str(path))  # FAISS's own format, not pickle
                if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
                    logger.warning("Ignoring cached index %s: it does not fit the pool", path)
                    index = None
            except RuntimeError as exc:
                logger.warning("Ignoring unreadable index cache %s: %s", path, exc)
                index = None
        if index is None:
            logger.info("Building an IVF index (%d cells) over %d pool examples", cells, len(vectors))
            quantizer = faiss.IndexFlatIP(vectors.shape[1])
            index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], cells, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.add(vectors)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                faiss.write_index(index, str(tmp))
                os.replace(tmp, path)
        index.nprobe = min(self.nprobe, cells)
        return index

    def search(self, queries: Sequence[str], k: int) -> list[list[ICLExample]]:
        """The ``k`` most similar examples for each query, most similar first (one batched search)."""
        if not constants.is_whole(k, 0, len(self.pool)):
            raise InvalidRequestError(
                f"num_optimized_icl must be an integer from 0 to {len(self.pool)} (the ICL pool size), got {k!r}."
            )
        if k == 0 or not queries:
            return [[] for _ in queries]
        return [[ex for _, ex in row] for row in self.search_embedded(self.embed(queries), int(k))]

    def search_embedded(self, vectors: Any, k: int) -> list[list[tuple[float, ICLExample]]]:
        """(similarity, example) for the ``k`` nearest examples of each already embedded query
        (rows of :meth:`embed`), most similar first: for callers that search several retrievers
        with one embedding."""
        k = min(int(k), len(self.pool))
        if k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.index.search(vectors, k)
        return [
            [(float(score), self.pool[i]) for score, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]


__all__ = [
    "END",
    "EXACT_SEARCH_MAX",
    "ICLExample",
    "ICLRetriever",
    "SingleTextEncoder",
    "POOL_FORMAT",
    "START",
    "load_embedder",
    "load_icl_pool",
    "packaged_pool_path",
    "parse_icl_pool",
    "save_icl_pool",
    "shared_embedder",
]
