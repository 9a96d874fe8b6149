"""What the transformers engine adds to ``model.generate`` to answer as the other engines do: a
sampler that draws every row of a batch from its own seeded stream (:class:`RowSeededSampler`),
OpenAI's frequency and presence penalties (:class:`OutputPenalty`), and a stop on stop strings and
loops that reads the answer, not the vocabulary (:class:`AnswerStop`); and how requests are grouped
into one call (:func:`sampling_key`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from auto_model.backends.base import SamplingParams
from auto_model.loops import LoopGuard

#: sampling arguments that only transformers' own sampler applies (``do_sample=True``): requests
#: that carry one keep that sampler, whose one random stream per call needs one call per seed
_SAMPLER_ARGUMENTS = frozenset(
    {"do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}
)


def samples_per_row(sampling: SamplingParams) -> bool:
    """Whether a sampled request goes through :class:`RowSeededSampler` (batched whatever its seed)."""
    return sampling.temperature > 0 and not _SAMPLER_ARGUMENTS & set(sampling.extra)


def global_seed(sampling: SamplingParams) -> int | None:
    """The seed torch's own generator is set to for a request's ``generate`` call: its seed where it
    samples with transformers' sampler (see :func:`samples_per_row`), else None."""
    return None if sampling.temperature == 0 or samples_per_row(sampling) else sampling.seed


class RowSeededSampler:
    """A transformers logits processor that samples every row of a batch from its own seeded stream.

    transformers' sampler draws the whole batch from one random stream, so a seeded request's
    answer would depend on the batch it shares; giving each seed its own call would split batches.
    Here generation runs greedily over ``log_softmax(logits / temperature)``, cut to the top-p
    nucleus, plus Gumbel noise drawn from the row's own generator: the argmax of that is an exact
    sample of the tempered, nucleus-cut distribution (the Gumbel-max trick), and the noise of a
    row depends on its seed and step alone.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            probs = ordered.exp()
            before = probs.cumsum(dim=-1) - probs  # the mass of the likelier tokens
            ordered = ordered.masked_fill(before >= self.top_p, float("-inf"))  # the first token always stays
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        vocab = logits.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
        return logits + gumbel


class OutputPenalty:
    """A transformers logits processor for OpenAI's and vLLM's frequency and presence penalties:
    each token's logit is lowered by ``frequency`` per time the answer already holds it, and by
    ``presence`` once it holds it at all. Only the answer counts (tokens from ``start`` on), not
    the prompt; transformers has no such processor of its own."""

    def __init__(self, start: int, frequency: float = 0.0, presence: float = 0.0):
        self.start, self.frequency, self.presence = start, float(frequency), float(presence)
        self.active = bool(self.frequency or self.presence)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        answer = input_ids[:, self.start :]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class AnswerStop:
    """A transformers stopping criterion that ends each row once its answer contains one of
    ``stops``, or (``cut_loops``) where it starts to loop (:class:`~auto_model.loops.LoopGuard`).

    Each unfinished row's text is decoded once a step for both. It reads the answer's text, so its
    cost grows with the answer, not with the vocabulary: transformers' own ``stop_strings`` matches
    every stop string against every token of the vocabulary before the first step (a
    20,000-character stop string took minutes)."""

    def __init__(self, tokenizer: Any, start: int, rows: int, stops: Sequence[str], cut_loops: bool):
        self.tokenizer, self.start, self.stops = tokenizer, start, tuple(stops)
        self.guards = [LoopGuard() for _ in range(rows)] if cut_loops else None
        self.done = [False] * rows

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        for r in range(len(self.done)):
            if self.done[r]:
                continue
            text = self.tokenizer.decode(input_ids[r, self.start :], skip_special_tokens=True)
            if self.guards is not None:
                self.guards[r].follow(text)
            self.done[r] = any(stop in text for stop in self.stops) or bool(self.guards and self.guards[r].looped)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def turn_taking_streamer(tokenizer: Any, cancelled: threading.Event, keep_rng: bool = False) -> Any:
    """A ``TextIteratorStreamer`` (the answer only, special tokens skipped) for a ``generate`` call
    that makes each token only while the streamer's reader waits for one: once a token's text is
    out, generation stands still until the reader asks for the next. So an engine that lets other
    requests go first between two chunks of a stream (:class:`auto_model.engine.Turns`) runs them
    while the stream waits, never beside it. A wait ends early once ``cancelled`` is set, or at
    :meth:`stop` (the reader has left). ``keep_rng``: the call draws from torch's own generator
    (:func:`global_seed`); it gets its generator's state back after each wait, whatever the
    requests that ran meanwhile drew."""
    return _turn_taking_class()(tokenizer, cancelled, keep_rng)


@functools.cache
def _turn_taking_class() -> type:
    import torch
    from transformers import TextIteratorStreamer

    class TurnTakingStreamer(TextIteratorStreamer):
        def __init__(self, tokenizer: Any, cancelled: threading.Event, keep_rng: bool):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.cancelled, self.keep_rng = cancelled, keep_rng
            self.asked = threading.Semaphore(0)
            self.read = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:  # the generating thread
            super().on_finalized_text(text, stream_end)
            if stream_end:
                return
            state = torch.get_rng_state() if self.keep_rng else None
            while not self.asked.acquire(timeout=0.5) and not self.cancelled.is_set():
                pass
            if state is not None:
                torch.set_rng_state(state)

        def __next__(self) -> str:  # the reader's thread
            if self.read:
                self.asked.release()  # the reader asks for the next token
            text: str = super().__next__()
            self.read = True
            return text

        def stop(self) -> None:
            """The reader has left: generation no longer waits for it."""
            self.asked.release()

    return TurnTakingStreamer


def sample_seed(seed: int, j: int) -> int:
    """The seed of a request's ``j``-th sample: its own seed for the first, then derived from it."""
    if j == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def sampling_key(sampling: SamplingParams) -> str:
    """What requests batched in one ``generate`` call share (their samples' seeds aside)."""
    return json.dumps(
        [
            sampling.n,
            sampling.temperature,
            sampling.top_p,
            sampling.max_new_tokens,
            list(sampling.stop),
            None if samples_per_row(sampling) else sampling.seed,
            sampling.extra,
        ],
        sort_keys=True,
        default=repr,
    )


__all__ = [
    "AnswerStop",
    "OutputPenalty",
    "RowSeededSampler",
    "global_seed",
    "sample_seed",
    "samples_per_row",
    "sampling_key",
    "turn_taking_streamer",
]
