"""Data parallelism: each batch spread over several replicas of one engine.

:class:`ReplicatedBackend` is a backend whose batches are cut into chunks that the replicas take
from one queue as they become free; answers go back in input order, and each request's
``on_completion`` fires as its chunk returns, so a caller's cache or output file holds every
finished answer. A replica that goes away (its process killed, its node lost, its server down)
loses only the chunk it was working on: those requests go back on the queue for the others, and
the run goes on; only when every replica is gone do the rest fail, each with a typed error.

Replicas are

* **Ray actors** (:func:`ray_replicas`): one engine (transformers or vLLM) per actor, spread over
  the nodes of a Ray cluster (``AutoModel(..., replicas=N, ray_address=...)``). Requests and
  answers cross as plain dicts; the driver renders prompts with the model's own tokenizer, which
  the first replica sends over (tokenizer files only, no weights);
* **servers** (:func:`server_replicas`): several OpenAI-compatible servers, e.g. one vLLM server
  per node (``AutoModel(..., base_url=[url1, url2])``).

Per-replica figures (requests, tokens, busy seconds, throughput) are in :meth:`ReplicatedBackend.stats`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from auto_model import errors
from auto_model.backends.base import Backend, Completion, CompletionCallback, GenerationRequest, Outcome, SamplingParams
from auto_model.constants import is_whole
from auto_model.errors import EngineConnectionError, GenerationError, InvalidRequestError, MissingDependencyError

logger = logging.getLogger(__name__)

#: Requests per chunk at most: large enough for an engine to batch, small enough that a lost replica
#: costs little and the replicas finish together.
MAX_CHUNK = 64


class ReplicaLost(EngineConnectionError):
    """A replica went away while it held requests (they are sent to the others)."""


class Replica(Protocol):
    name: str
    node: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """Answers in order; raises :class:`ReplicaLost` when the replica is gone."""
        ...

    def close(self) -> None: ...


@dataclass
class ReplicaStats:
    name: str
    node: str
    requests: int = 0
    failed: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # time spent in engine calls
    alive: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests_per_s"] = round(self.requests / self.seconds, 3) if self.seconds else None
        data["tokens_per_s"] = round(self.completion_tokens / self.seconds, 1) if self.seconds else None
        return data


class ReplicatedBackend(Backend):
    """One engine's batches spread over ``replicas`` (see the module docstring).

    Args:
        replicas: the replicas (:func:`ray_replicas`, :func:`server_replicas`).
        model_id, prompt_style, tokenizer: what the replicas serve and how its prompts are rendered.
        supports_chat, supports_json_schema, decoding_settings: the replicas' engine's capabilities.
        chunk_size: requests per chunk (default: half a batch's share of each replica, at most 64).
        on_close: called once the replicas are closed (e.g. to leave the Ray cluster).
    """

    name = "replicas"
    thread_safe = True

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        model_id: str,
        prompt_style: Any,
        tokenizer: Any = None,
        supports_chat: bool = False,
        supports_json_schema: bool = False,
        decoding_settings: frozenset[str] | Sequence[str] = frozenset(),
        chunk_size: int | None = None,
        on_close: Any = None,
    ):
        if not replicas:
            raise InvalidRequestError("A replicated engine needs at least one replica.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidRequestError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
        self.replicas = list(replicas)
        self.model_id = model_id
        self.prompt_style = prompt_style
        self.tokenizer = tokenizer
        self.supports_chat = supports_chat  # type: ignore[misc]
        self.supports_json_schema = supports_json_schema  # type: ignore[misc]
        self.decoding_settings = frozenset(decoding_settings)
        self.chunk_size = chunk_size
        self._stats = [ReplicaStats(r.name, r.node) for r in self.replicas]
        self._stats_lock = threading.Lock()  # concurrent batches share the replicas and their figures
        self._on_close = on_close
        self._closed = False

    def __repr__(self) -> str:
        return f"ReplicatedBackend(model_id={self.model_id!r}, replicas={[r.name for r in self.replicas]})"

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: requests answered, failures, completion tokens, busy seconds, throughput, alive."""
        with self._stats_lock:
            return [s.to_dict() for s in self._stats]

    def _chunk(self, n: int, alive: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, min(MAX_CHUNK, math.ceil(n / (2 * max(1, alive)))))

    def generate(
        self, requests: Sequence[GenerationRequest], *, on_completion: CompletionCallback | None = None
    ) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)
        if not requests:
            return []
        alive = [i for i, s in enumerate(self._stats) if s.alive]
        if not alive:
            raise EngineConnectionError("Every replica of this engine is gone; start a new AutoModel.")
        size = self._chunk(len(requests), len(alive))
        queue: deque[list[int]] = deque(
            list(range(s, min(s + size, len(requests)))) for s in range(0, len(requests), size)
        )
        cond = threading.Condition()
        in_flight = [0]
        deliver_lock = threading.Lock()

        def deliver(i: int, outcome: Outcome) -> None:
            with deliver_lock:  # callbacks run one at a time, in completion order
                results[i] = outcome
                if on_completion is not None:
                    on_completion(i, outcome)

        def work(r: int) -> None:
            replica, stats = self.replicas[r], self._stats[r]
            while True:
                with cond:
                    while not queue and in_flight[0]:
                        cond.wait()  # a chunk may come back from a replica that goes away
                    if not queue:
                        return
                    chunk = queue.popleft()
                    in_flight[0] += 1
                t0 = time.perf_counter()
                try:
                    outcomes = replica.generate([requests[i] for i in chunk])
                except ReplicaLost as exc:
                    outcomes = [exc] * len(chunk)
                except Exception as exc:  # the replica's engine failed as a whole: this chunk fails, typed
                    failure = exc if isinstance(exc, GenerationError) else GenerationError(f"{replica.name}: {exc}")
                    outcomes = [failure] * len(chunk)
                lost = [i for i, o in zip(chunk, outcomes, strict=True) if isinstance(o, ReplicaLost)]
                answered = [(i, o) for i, o in zip(chunk, outcomes, strict=True) if not isinstance(o, ReplicaLost)]
                with self._stats_lock:
                    stats.seconds += time.perf_counter() - t0
                    stats.requests += len(answered)
                    done = [o for _, o in answered if isinstance(o, Completion)]
                    stats.completion_tokens += sum(o.completion_tokens for o in done)
                    stats.failed += len(answered) - len(done)
                    if lost:
                        stats.alive = False
                for i, outcome in answered:
                    deliver(i, outcome)
                with cond:
                    in_flight[0] -= 1
                    if lost:
                        logger.warning("%s went away; its %d unfinished requests go to the others", replica.name,
                                       len(lost))  # fmt: skip
                        if any(s.alive for s in self._stats):
                            queue.append(lost)
                        else:
                            orphans = lost + [i for c in queue for i in c]
                            queue.clear()
                            for i in orphans:
                                deliver(i, ReplicaLost(f"Every replica is gone ({replica.name} was the last)."))
                    cond.notify_all()
                if lost:
                    return

        threads = [threading.Thread(target=work, args=(r,), name=f"auto-model-replica-{r}") for r in alive]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for replica in self.replicas:
            try:
                replica.close()
            except Exception:  # noqa: BLE001 (a replica that is already gone)
                logger.debug("closing %s failed", replica.name, exc_info=True)
        if self._on_close is not None:
            self._on_close()


def stats_table(stats: Sequence[dict[str, Any]]) -> str:
    """:meth:`ReplicatedBackend.stats` as a few lines of text (what the batch commands print)."""
    lines = [
        f"{'replica':44s} {'requests':>8s} {'failed':>6s} {'tokens':>7s} {'busy s':>7s} {'req/s':>6s} {'tok/s':>7s}"
    ]
    for s in stats:
        name = s["name"] + ("" if s["alive"] else " (gone)")
        rate = "–" if s["requests_per_s"] is None else f"{s['requests_per_s']:.2f}"
        tokens = "–" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"
        lines.append(f"{name:44s} {s['requests']:8d} {s['failed']:6d} {s['completion_tokens']:7d} "
                     f"{s['seconds']:7.1f} {rate:>6s} {tokens:>7s}")  # fmt: skip
    return "\n".join(lines)


# -- replicas that are OpenAI-compatible servers ------------------------------------------------


class ServerReplica:
    """One OpenAI-compatible server (an :class:`~auto_model.backends.openai.OpenAIBackend`)."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.name = self.node = str(backend.base_url)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        outcomes = self.backend.generate(requests)
        # A server that cannot be reached (after the client's retries) is gone: its requests move on.
        return [ReplicaLost(str(o)) if type(o) is EngineConnectionError else o for o in outcomes]

    def close(self) -> None:
        self.backend.close()


def server_replicas(model_name: str, base_urls: Sequence[str], **options: Any) -> ReplicatedBackend:
    """One OpenAI-compatible server per URL, serving ``model_name``; ``options`` as for the openai backend."""
    from auto_model.backends.openai import OpenAIBackend

    backends = [OpenAIBackend(model_name, base_url=url, **options) for url in base_urls]
    first = backends[0]
    return ReplicatedBackend(
        [ServerReplica(b) for b in backends],
        model_id=first.model_id,
        prompt_style=first.prompt_style,
        supports_chat=True,
        supports_json_schema=True,
        decoding_settings=frozenset.intersection(*(b.decoding_settings for b in backends)),
    )


# -- replicas that are Ray actors ---------------------------------------------------------------


def request_to_dict(request: GenerationRequest) -> dict[str, Any]:
    sampling = asdict(request.sampling)
    sampling["stop"] = list(sampling["stop"])
    return {"prompt": request.prompt, "sampling": sampling, "query": request.query}


def request_from_dict(data: dict[str, Any]) -> GenerationRequest:
    sampling = dict(data["sampling"])
    sampling["stop"] = tuple(sampling["stop"])
    return GenerationRequest(data["prompt"], SamplingParams(**sampling), query=data.get("query"))


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, BaseException):
        return {"error": type(outcome).__name__, "message": str(outcome)}
    data = {k: getattr(outcome, k) for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")}
    data["latency_s"] = outcome.latency_s
    data["samples"] = [outcome_to_dict(s) for s in outcome.samples]
    return data


def outcome_from_dict(data: dict[str, Any]) -> Outcome:
    if "error" in data:
        cls = getattr(errors, data["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, GenerationError | InvalidRequestError)):
            cls = GenerationError
        return cls(data["message"])
    samples = tuple(outcome_from_dict(s) for s in data.get("samples") or ())
    return Completion(data["text"], data["finish_reason"], data["prompt_tokens"], data["completion_tokens"],
                      data.get("latency_s"), samples=samples)  # type: ignore[arg-type]  # fmt: skip


class EngineActor:
    """What runs inside each Ray actor: one engine (a registered backend) and plain-data calls."""

    def __init__(self, backend_name: str, model_name: str, options: dict[str, Any]):
        from auto_model.backends import get_backend_class
        from auto_model.resolve import resolve_model

        self.backend = get_backend_class(backend_name)(resolve_model(model_name), **options)

    def info(self) -> dict[str, Any]:
        import ray

        backend = self.backend
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "model_id": backend.model_id,
            "prompt_style": backend.prompt_style,
            "supports_chat": backend.supports_chat,
            "supports_json_schema": backend.supports_json_schema,
            "decoding_settings": sorted(backend.decoding_settings),
        }

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer's files (what ``save_pretrained`` writes), for the driver to render prompts with."""
        tokenizer = self.backend.tokenizer
        if tokenizer is None:
            return {}
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}

    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outcomes = self.backend.generate([request_from_dict(r) for r in requests])
        return [outcome_to_dict(o) for o in outcomes]

    def close(self) -> None:
        self.backend.close()


@dataclass
class RayReplica:
    actor: Any
    name: str
    node: str
    pid: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        import ray

        try:
            out = ray.get(self.actor.generate.remote([request_to_dict(r) for r in requests]))
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as exc:
            raise ReplicaLost(f"{self.name} went away: {type(exc).__name__}") from exc
        return [outcome_from_dict(d) for d in out]

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        finally:
            ray.kill(self.actor)


def connect_ray(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``"auto"``: the one this machine belongs to; None:
    ``RAY_ADDRESS``, else a new single-node cluster), quietly. True when this call started Ray."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError("ray", "ray", purpose="for replicas on a Ray cluster") from exc
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,  # the replicas' engine logs stay in the cluster's log folder
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    return True


def ray_replicas(
    backend_name: str,
    model_name: str,
    replicas: int,
    *,
    ray_address: str | None = None,
    cpus_per_replica: float = 1,
    gpus_per_replica: float = 0,
    chunk_size: int | None = None,
    **options: Any,
) -> ReplicatedBackend:
    """``replicas`` engines, one per Ray actor, spread over the cluster's nodes; ``options`` go to each
    engine as they would to one (``dtype``, ``batch_size``, ...)."""
    if not is_whole(replicas, 1):
        raise InvalidRequestError(f"replicas must be an integer >= 1, got {replicas!r}.")
    started = connect_ray(ray_address)
    import ray

    try:
        needed = {k: replicas * each for k, each in (("CPU", cpus_per_replica), ("GPU", gpus_per_replica)) if each}
        deadline = time.monotonic() + 5  # replicas just closed give their resources back within a second or two
        free = ray.available_resources()
        while any(free.get(k, 0) + 1e-9 < n for k, n in needed.items()) and time.monotonic() < deadline:
            time.sleep(0.5)
            free = ray.available_resources()
        for kind, each in (("CPU", cpus_per_replica), ("GPU", gpus_per_replica)):
            if each and free.get(kind, 0) + 1e-9 < replicas * each:
                raise InvalidRequestError(
                    f"The Ray cluster has {free.get(kind, 0):g} free {kind}s, and {replicas} replicas of {each:g} "
                    f"{kind} each need {replicas * each:g}: add nodes, or ask for fewer replicas (or a smaller "
                    f"cpus_per_replica)."
                )
        actor_class: Any = ray.remote(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, max_restarts=0)(EngineActor)
        spread = actor_class.options(scheduling_strategy="SPREAD")
        actors: list[Any] = [spread.remote(backend_name, model_name, options) for _ in range(replicas)]
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:
            raise GenerationError(f"A replica could not load {model_name!r}: {exc}") from exc
        members = [RayReplica(a, f"replica {i} (node {info['ip']}, pid {info['pid']})", info["node"], info["pid"])
                   for i, (a, info) in enumerate(zip(actors, infos, strict=True))]  # fmt: skip
        tokenizer = _tokenizer(ray.get(actors[0].tokenizer_files.remote()))
    except BaseException:
        if started:
            ray.shutdown()
        raise
    first = infos[0]
    return ReplicatedBackend(
        members,
        model_id=first["model_id"],
        prompt_style=first["prompt_style"],
        tokenizer=tokenizer,
        supports_chat=first["supports_chat"],
        supports_json_schema=first["supports_json_schema"],
        decoding_settings=first.get("decoding_settings", ()),
        chunk_size=chunk_size,
        on_close=ray.shutdown if started else None,
    )


def _tokenizer(files: dict[str, bytes]) -> Any:
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, blob in files.items():
            (Path(folder) / name).write_bytes(blob)
        return AutoTokenizer.from_pretrained(folder)
