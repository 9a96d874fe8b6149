"""Prefix caching for the transformers engine: the KV cache of prompt beginnings that requests share.

Every aligned request starts with its route's system prompt (and often the same in-context
examples), so most of a prompt's tokens are the same from one request to the next. vLLM keeps
their KV cache between requests itself; transformers computes every prompt from its first token.
:class:`PrefixCache` keeps the KV of recent prompts (batch 1, in full) and gives a batch a cache
that holds the beginning its rows share, so that ``model.generate`` computes only the rest:

- the rows' shared beginning is found (their longest common prefix, short of each row's last token);
- the longest beginning of it that a kept prompt also has is copied from that prompt's KV
  (attention is causal: the KV of a token depends on the tokens before it alone);
- the rest of the shared beginning is computed once, for one row, and kept for later requests;
- the batch's cache is that KV, repeated for each row; each row's own tokens follow it.

The batch's rows are then laid out as ``shared beginning | padding | own tokens`` (the padding
masked, position ids counted over the real tokens), which gives each token the position and the
keys it has without the cache. A kept prompt is a plain list of per-layer tensors: nothing is
written to disk, and nothing kept is changed in place.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: tokens of KV kept over all prompts (least recently used first out); about 46 KB a token for
#: SmolLM2-135M in float32, so 190 MB at most
MAX_KEPT_TOKENS = 4096
#: requests whose first this many tokens are the same are batched together (see PrefixCache.families)
FAMILY_TOKENS = 64
#: shared beginnings shorter than this are computed with the rest (a forward pass of its own costs more)
MIN_SHARED_TOKENS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def supports_prefix_cache(model: Any) -> bool:
    """Whether every layer of ``model``'s cache is a plain growing attention cache that can be cut and
    repeated: not a sliding-window one (Gemma 3's local layers keep only their window, and its greedy
    answers changed with the cache: 5 of 16 the same), a fixed-size, linear-attention or
    encoder-decoder one. Other models run without the prefix cache."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # a transformers without these classes: no prefix caching
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """The KV cache of recently computed prompt beginnings, for one model (see the module's doc).

    Args:
        model: a transformers causal language model.
        max_tokens: tokens of KV kept over all prompts.
        min_tokens: the shortest shared beginning worth a forward pass of its own.
    """

    def __init__(self, model: Any, max_tokens: int = MAX_KEPT_TOKENS, min_tokens: int = MIN_SHARED_TOKENS):
        import torch
        from transformers import DynamicCache

        self._torch, self._cache_class = torch, DynamicCache
        self.model, self.max_tokens, self.min_tokens = model, max_tokens, min_tokens
        self._device = model.get_input_embeddings().weight.device
        # only the last position's logits, where the model can skip the others (nothing reads them)
        self._logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._kept: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        #: tokens taken from kept prompts, and tokens computed for the shared beginnings, so far
        self.reused_tokens = self.computed_tokens = 0

    @property
    def kept(self) -> dict[tuple[int, ...], list[tuple[Any, Any]]]:
        """The prompts kept (their token ids, least recently used first) and their KV, per layer
        ``(keys, values)`` of shape ``[1, kv heads, tokens, head size]``; a copy of the mapping."""
        with self._lock:
            return dict(self._kept)

    @property
    def kept_tokens(self) -> int:
        """Tokens of KV kept, over all kept prompts (at most ``max_tokens``)."""
        return sum(len(key) for key in self._kept)

    def for_rows(self, rows: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """``(shared, cache)``: how many leading tokens every row of ``rows`` shares and finds in
        ``cache``, a transformers cache with one row per row of ``rows``; ``(0, None)`` where the
        rows share too little."""
        first = rows[0]
        shared = min(len(row) for row in rows) - 1  # each row keeps a token of its own to continue from
        for row in rows[1:]:
            shared = min(shared, common_prefix(first, row))
        if shared < self.min_tokens:
            return 0, None
        prefix = tuple(first[:shared])
        with self._lock:
            found, best = 0, None
            for key in self._kept:
                n = min(common_prefix(key, prefix), shared)
                if n > found:
                    found, best = n, key
            if best is None or found < self.min_tokens:
                found, layers = 0, None
            else:
                self._kept.move_to_end(best)
                layers = self._kept[best]
        if shared - found >= self.min_tokens or layers is None:
            layers = self._compute(prefix, found, layers)
            self.computed_tokens += shared - found
            self.reused_tokens += found
            self._keep(prefix, layers)
        else:  # the kept prompt holds nearly all of it: the few tokens left are computed with the rest
            shared = found
            self.reused_tokens += found
        return shared, self._batch_cache(layers, shared, len(rows))

    @staticmethod
    def families(rows: Sequence[Sequence[int]], items: Sequence[T]) -> list[list[T]]:
        """``items`` (one per row of ``rows``, in order) split into families whose rows begin with
        the same :data:`FAMILY_TOKENS` tokens (the same system prompt), each in the order given; the
        rows that begin like no other come last, together."""
        keyed: dict[tuple[int, ...], list[tuple[int, T]]] = {}
        for position, (row, item) in enumerate(zip(rows, items, strict=True)):
            key = tuple(row[:FAMILY_TOKENS]) if len(row) > FAMILY_TOKENS else ()
            keyed.setdefault(key, []).append((position, item))
        alike = [[item for _, item in family] for key, family in keyed.items() if key and len(family) > 1]
        rest = sorted(pair for key, family in keyed.items() if not key or len(family) == 1 for pair in family)
        return [*alike, [item for _, item in rest]] if rest else alike

    def _compute(self, prefix: tuple[int, ...], found: int, layers: list[tuple[Any, Any]] | None) -> list[Any]:
        """The KV of all of ``prefix``, computed for one row from the KV of its first ``found`` tokens."""
        torch = self._torch
        cache = self._cache_class()
        if layers is not None and found:
            cache = self._cache_class(ddp_cache_data=[(k[:, :, :found], v[:, :, :found]) for k, v in layers])
        ids = torch.tensor([prefix[found:]], device=self._device)
        with torch.inference_mode():
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, **self._logits)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _keep(self, prefix: tuple[int, ...], layers: list[tuple[Any, Any]]) -> None:
        if len(prefix) > self.max_tokens:
            return
        with self._lock:
            self._kept[prefix] = layers
            self._kept.move_to_end(prefix)
            total = self.kept_tokens
            while total > self.max_tokens:
                oldest, _ = self._kept.popitem(last=False)
                total -= len(oldest)

    def _batch_cache(self, layers: list[tuple[Any, Any]], shared: int, rows: int) -> Any:
        """A new cache of ``rows`` rows, each holding the first ``shared`` tokens of ``layers`` (the
        cache copies them in: what is kept is never written to)."""
        data = [
            (k[:, :, :shared].expand(rows, -1, -1, -1), v[:, :, :shared].expand(rows, -1, -1, -1)) for k, v in layers
        ]
        return self._cache_class(ddp_cache_data=data)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


__all__ = [
    "FAMILY_TOKENS",
    "MAX_KEPT_TOKENS",
    "MIN_SHARED_TOKENS",
    "PrefixCache",
    "common_prefix",
    "supports_prefix_cache",
]
