"""LLM requests for tools built on the SDK (the trainer, the evaluation, the judge): an on-disk
cache, a call budget and usage per role.

The cache is keyed by the full request (model, backend, the exact assembled prompt, every sampling
parameter), so rerunning or resuming a run never pays twice for the same request. It is a SQLite
file: each finished answer is committed as it arrives, and a killed process loses nothing done.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from auto_model.backends.base import Completion, GenerationRequest, Outcome
from auto_model.errors import AutoModelError
from auto_model.options import GenerationOptions


class BudgetExhausted(AutoModelError):
    """``--max-calls`` would be exceeded; the run stops at its last checkpoint (resume with ``--resume``)."""


class RequestCache:
    """Finished LLM answers on disk, keyed by the SHA-256 of the full request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, request TEXT, completion TEXT)")

    @staticmethod
    def key(
        model: str, backend: str, request: GenerationRequest, reward: str | None = None, check: str | None = None
    ) -> tuple[str, str]:
        """The request's key and JSON; ``reward`` names the reward that chooses among a request's
        samples (``n`` > 1: the answer depends on it too); ``check`` names the answer check of a
        checked request (the answer kept is the checked one)."""
        sampling = asdict(request.sampling)
        sampling["stop"] = list(sampling["stop"])
        if sampling["json_schema"] is None:  # keys of unconstrained requests as they were before the field
            del sampling["json_schema"]
        if sampling["n"] == 1:  # keys of one-answer requests as they were before the field
            del sampling["n"]
        if not sampling["cut_loops"]:  # keys of uncut requests as they were before the field
            del sampling["cut_loops"]
        entry: dict[str, Any] = {"model": model, "backend": backend, "prompt": request.prompt, "sampling": sampling}
        if request.sampling.n > 1:
            entry["reward"] = reward
        if request.check_answer:
            entry["answer_check"] = check
        blob = json.dumps(entry, sort_keys=True, ensure_ascii=False, default=repr)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest(), blob

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT completion FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        samples = tuple(Completion(s["text"], s["finish_reason"], data["prompt_tokens"], s["completion_tokens"],
                                   looped=bool(s.get("looped")))
                        for s in data.get("samples", ()))  # fmt: skip
        return Completion(data["text"], data["finish_reason"], data["prompt_tokens"], data["completion_tokens"],
                          samples=samples, scores=tuple(s["score"] for s in data.get("samples", ())),
                          looped=bool(data.get("looped")))  # fmt: skip

    def put(self, key: str, request_blob: str, completion: Completion) -> None:
        data: dict[str, Any] = {
            k: getattr(completion, k) for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")
        }
        if completion.looped:
            data["looped"] = True
        if completion.samples:  # a best-of answer keeps its candidates and their scores
            scores = completion.scores or (None,) * len(completion.samples)
            data["samples"] = [
                {
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "completion_tokens": c.completion_tokens,
                    "score": v,
                    **({"looped": True} if c.looped else {}),
                }
                for c, v in zip(completion.samples, scores, strict=True)
            ]
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, request_blob, json.dumps(data)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class RoleUsage:
    calls: int = 0  # requests sent to an engine
    cached: int = 0  # requests answered from the cache
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class Usage:
    #: per role (a role is counted from its first request; name them here to list them from the start)
    roles: dict[str, RoleUsage] = field(default_factory=dict)
    max_calls: int | None = None

    _start: dict[str, RoleUsage] = field(default_factory=dict)

    def load(self, saved: dict[str, Any]) -> None:
        """Start from the totals an earlier process of the same run saved (at its last checkpoint)."""
        for name, values in saved.items():
            if name != "total" and isinstance(values, dict):
                self.roles[name] = RoleUsage(**{k: values[k] for k in asdict(RoleUsage()) if k in values})
        self._start = {name: RoleUsage(**asdict(r)) for name, r in self.roles.items()}

    def snapshot(self) -> dict[str, Any]:
        """``run``: totals of the whole run; ``process``: what this process added."""
        process = {}
        for name, r in self.roles.items():
            start = self._start.get(name, RoleUsage())
            process[name] = RoleUsage(**{k: getattr(r, k) - getattr(start, k) for k in asdict(r)})
        return {"run": self.to_dict(), "process": self._summary(process)}

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.roles.values())

    def to_dict(self) -> dict[str, Any]:
        return self._summary(self.roles)

    @staticmethod
    def _summary(roles: dict[str, RoleUsage]) -> dict[str, Any]:
        total = RoleUsage()
        for r in roles.values():
            for k in ("calls", "cached", "failed", "prompt_tokens", "completion_tokens", "seconds"):
                setattr(total, k, getattr(total, k) + getattr(r, k))
        return {**{name: asdict(r) for name, r in roles.items()}, "total": asdict(total)}

    def table(self) -> str:
        rows = [
            f"{'role':10s} {'calls':>6s} {'cached':>7s} {'failed':>6s} {'prompt tok':>11s} {'compl. tok':>11s} "
            f"{'seconds':>8s}"
        ]
        for name, r in self.to_dict().items():
            rows.append(
                f"{name:10s} {r['calls']:6d} {r['cached']:7d} {r['failed']:6d} {r['prompt_tokens']:11d} "
                f"{r['completion_tokens']:11d} {r['seconds']:8.1f}"
            )
        return "\n".join(rows)


class Role:
    """One model in one role (the trainer's base, metrics, eval, optimize; the evaluation's answer,
    judge), with the shared cache and usage."""

    #: Requests per engine call by default. Engines that batch (vLLM) report a call's answers only
    #: when it returns, so a killed run loses at most one chunk; large enough to keep the engine busy.
    chunk_size = 256

    def __init__(self, name: str, model: Any, cache: RequestCache, usage: Usage, chunk_size: int | None = None):
        self.name, self.model, self.cache, self.usage = name, model, cache, usage
        if chunk_size is not None:
            if chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
            self.chunk_size = chunk_size  # 1: one request per engine call, as the original scripts sent them

    def ask(
        self,
        prompts: Sequence[str],
        options: GenerationOptions | Sequence[GenerationOptions],
        seeds: Sequence[int | None] | None = None,
        prefill: str | Sequence[str] | None = None,
    ) -> list[Outcome]:
        """One user turn per prompt (no system prompt, no examples), answered in one batch.

        ``options`` is one setting for all prompts, or one per prompt (e.g. each with its own
        ``json_schema``).

        ``prefill`` starts the reply (e.g. ``'["'`` for a JSON list) on engines that take text
        prompts, which keeps small local models on the requested format; the returned text includes
        it. Servers taking chat messages get no prefill.
        """
        requests = []
        prefills = [prefill] * len(prompts) if prefill is None or isinstance(prefill, str) else list(prefill)
        text_prompts = self.model.aligner.prompt_format != "messages"
        settings = [options] * len(prompts) if isinstance(options, GenerationOptions) else list(options)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(settings)} sampling settings for {len(prompts)} prompts")
        for i, text in enumerate(prompts):
            # A judge's or an optimizer's reply is read by its parser, not shown to a user: it is never cut or checked,
            # and the model's artifact does not choose its decoding.
            plain = replace(settings[i], cut_loops=False, optimized_decoding=False, check_answers=False)
            s = plain if seeds is None else replace(plain, seed=seeds[i])
            request = self.model.aligner.build_request(None, [], [{"role": "user", "content": text}], s)
            if text_prompts and prefills[i]:
                request = replace(request, prompt=request.prompt + prefills[i])
            requests.append(request)
        outcomes = self.run(requests)
        if text_prompts:
            outcomes = [
                replace(o, text=(prefills[i] or "") + o.text) if isinstance(o, Completion) else o
                for i, o in enumerate(outcomes)
            ]
        return outcomes

    def answer(self, system_prompts: Sequence[str], query: str, *, k: int, options: GenerationOptions) -> list[Outcome]:
        """The model's answers to ``query`` under each system prompt, assembled as in inference
        (with the ``k`` examples of its route, or of ``options.route``), in one batch."""
        examples = self.examples(query, k, options.route)
        return self.answer_each([(p, query, examples, options) for p in system_prompts])

    def answer_each(self, items: Sequence[tuple[str | None, str, Sequence[Any], GenerationOptions]]) -> list[Outcome]:
        """Answers to several ``(system prompt, query, examples, options)``, each assembled as in
        inference with the examples given, in one batch."""
        return self.run([self.model.aligner.build_request(p, examples, q, o) for p, q, examples, o in items])

    def examples(self, query: str, k: int, route: str | None = None) -> list[Any]:
        """The ``k`` examples inference retrieves for ``query`` (down ``route``, or its own)."""
        return self.model.retrieve([query], k, route)[0] if k > 0 else []

    @property
    def decoding_settings(self) -> frozenset[str]:
        """The decoding settings the model's engine applies."""
        return frozenset(self.model.backend.decoding_settings)

    def cache_keys(self, requests: Sequence[GenerationRequest]) -> list[tuple[str, str]]:
        """Each request's cache key (and the text it hashes): the model and engine, the request, the
        reward that picks among its samples (if any) and the answer check (if any)."""
        model_id, backend = self.model.backend.model_id, self.model.backend_name
        best_of = getattr(self.model, "best_of", None)  # the reward that picks among samples, if any
        reward = None if best_of is None else best_of.reward_id
        check = getattr(self.model, "answer_check", None)
        check_id = None if check is None else check.digest
        return [RequestCache.key(model_id, backend, r, reward, check_id) for r in requests]

    def run(
        self, requests: Sequence[GenerationRequest], progress: Callable[[int], None] | None = None
    ) -> list[Outcome]:
        """Answer prepared requests: from the cache where possible, the rest in one engine call.

        ``progress(n)`` is told of ``n`` more finished requests: the cached ones at once, then each
        answer as the engine reports it (e.g. a progress bar's ``update``)."""
        keys = self.cache_keys(requests)
        results: list[Outcome | None] = [self.cache.get(k) for k, _ in keys]
        stats = self.usage.roles.setdefault(self.name, RoleUsage())
        stats.cached += sum(r is not None for r in results)
        missing = [i for i, r in enumerate(results) if r is None]
        if progress is not None and len(missing) < len(results):
            progress(len(results) - len(missing))
        if not missing:
            return results  # type: ignore[return-value]
        limit = self.usage.max_calls
        if limit is not None and self.usage.calls + len(missing) > limit:
            raise BudgetExhausted(
                f"--max-calls {limit} reached ({self.usage.calls} calls made, {len(missing)} more needed for the "
                f"next {self.name} batch). Finished work is saved; continue with --resume."
            )

        def store(j: int, outcome: Outcome) -> None:
            i = missing[j]
            if isinstance(outcome, Completion):
                self.cache.put(keys[i][0], keys[i][1], outcome)
            if progress is not None:
                progress(1)

        t0 = time.perf_counter()
        outcomes: list[Outcome] = []
        for start in range(0, len(missing), self.chunk_size):  # each chunk is in the cache once it returns
            part = missing[start : start + self.chunk_size]
            outcomes += self.model.run_requests(
                [requests[i] for i in part], on_completion=lambda j, o, start=start: store(start + j, o)
            )
        stats.seconds += time.perf_counter() - t0
        stats.calls += len(missing)
        for i, outcome in zip(missing, outcomes, strict=True):
            results[i] = outcome
            if isinstance(outcome, Completion):
                stats.prompt_tokens += outcome.prompt_tokens
                stats.completion_tokens += outcome.completion_tokens
            else:
                stats.failed += 1
        return results  # type: ignore[return-value]
