"""Optimized system-prompt artifacts: versioned JSON, one file per model, shipped in the wheel.

A file looks like::

    {
      "format": "auto_model.prompt/v3",
      "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "aliases": ["smollm2-135m-instruct"],
      "system_prompt": "...",                      # the everyday route's prompt
      "decoding": {"frequency_penalty": 0.6},      # every route's decoding settings
      "num_examples": 1,                           # the everyday route's retrieved examples
      "routes": {"safety": {"system_prompt": "...", "decoding": {...}, "num_examples": 3, "provenance": {...}}},
      "routing": {"threshold": 0.5, "neighbours": 8, "temperature": 0.05},
      "pool": {"drop": ["a pool query", ...], "add": [{"query": ..., "answer": ..., "tags": [...]}]},
      "answer_check": {"threshold": 0.8, "classifier": {...}, "lexical": {...}, "refusal": "...", "window": 200},
      "provenance": {"method": "drpo" | "curated" | ..., "created": "...", ...}
    }

``routes`` and ``routing`` are what v2 adds (query-adaptive alignment, see
:mod:`auto_model.routing`); ``decoding`` (the model's decoding settings, see
:data:`~auto_model.backends.base.DECODING_SETTINGS`; a route's own override the artifact's) and
``num_examples`` (how many examples a request retrieves when the caller does not say,
:data:`DEFAULT_NUM_EXAMPLES` where the artifact does not either) and ``pool`` (examples the model's
pool drops, by query, and adds, over the packaged pool; an added example with a pool example's
query replaces it, as a shortened answer does; :meth:`PromptArtifact.edit_pool`) are what
v3 adds; ``answer_check`` (the output rail, :class:`~auto_model.answer_check.AnswerCheck`) is what
v4 adds. A file is written in the oldest format that holds what it has, and v1 and v2 files load unchanged (every
route then gets their one prompt, no decoding setting, and 3 examples).

Lookup goes by exact id, then alias, then a normalised name (case and punctuation ignored, with or
without the organisation prefix). A model with no artifact gets the default alignment prompt and a
logged warning. A plain ``.txt`` file is accepted as a prompt too. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.backends.base import check_decoding
from auto_model.constants import is_whole
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.files import atomic_write_text
from auto_model.resolve import normalize_name
from auto_model.routing import EVERYDAY, ROUTES, RoutingSettings

logger = logging.getLogger(__name__)

PROMPT_FORMAT_V1 = "auto_model.prompt/v1"
PROMPT_FORMAT_V2 = "auto_model.prompt/v2"
PROMPT_FORMAT_V3 = "auto_model.prompt/v3"
PROMPT_FORMAT = "auto_model.prompt/v4"
_READABLE = (PROMPT_FORMAT_V1, PROMPT_FORMAT_V2, PROMPT_FORMAT_V3, PROMPT_FORMAT)
_V3_OR_LATER = (PROMPT_FORMAT_V3, PROMPT_FORMAT)
DEFAULT_ARTIFACT_ID = "default"
#: retrieved examples per request where neither the caller nor the artifact says
DEFAULT_NUM_EXAMPLES = 3
#: the most examples an artifact may ask for
MAX_NUM_EXAMPLES = 32


@dataclass(frozen=True)
class PromptArtifact:
    """An optimized (or curated, or user-supplied) system prompt and where it came from.

    Attributes:
        model_id: the model it was made for (``"default"`` for the fallback, None for a user file).
        system_prompt: the prompt text.
        method: how it was made: ``"drpo"``, ``"curated"``, ``"user"``...
        aliases: other names of the same model.
        provenance: free-form details (date, base model, search settings, scores).
        source: the file it was read from.
        routes: route name -> its own prompt (``{"safety": ...}``); a route not named here uses
            ``system_prompt``.
        route_provenance: route name -> how its prompt was made.
        routing: routing settings (threshold, neighbours, temperature); None: the defaults.
        decoding: decoding settings for every route (``{"frequency_penalty": 0.6}``).
        route_decoding: route name -> its own decoding settings (they override ``decoding``).
        num_examples: retrieved examples per request on the everyday route (and on routes without
            their own); None: :data:`DEFAULT_NUM_EXAMPLES`.
        route_examples: route name -> its own number of examples.
        pool_drop: queries of the packaged pool's examples this model does without.
        pool_add: examples this model's pool has besides the packaged pool's (``ICLExample``).
        answer_check: how its answers are checked (the :class:`~auto_model.answer_check.AnswerCheck`
            fields); None: they are not.
    """

    model_id: str | None
    system_prompt: str
    method: str
    aliases: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    routes: dict[str, str] = field(default_factory=dict)
    route_provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    routing: dict[str, Any] | None = None
    decoding: dict[str, Any] = field(default_factory=dict)
    route_decoding: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_examples: int | None = None
    route_examples: dict[str, int] = field(default_factory=dict)
    pool_drop: tuple[str, ...] = ()
    pool_add: tuple[Any, ...] = ()
    answer_check: dict[str, Any] | None = None

    def edit_pool(self, pool: Sequence[Any]) -> list[Any]:
        """``pool`` (examples) with this artifact's edits: its dropped queries left out, its added
        examples after the rest, except that one with the query of a kept example takes that
        example's place (the later of two added with one query wins)."""
        drop = set(self.pool_drop)
        added = {ex.query: ex for ex in self.pool_add if ex.query not in drop}
        kept = [added.pop(ex.query, ex) for ex in pool if ex.query not in drop]
        return kept + list(added.values())

    def examples_for(self, route: str | None) -> int:
        """How many examples a request down ``route`` retrieves when its caller does not say."""
        own = self.route_examples.get(route or "")
        if own is not None:
            return own
        return DEFAULT_NUM_EXAMPLES if self.num_examples is None else self.num_examples

    def prompt_for(self, route: str | None) -> str:
        """The system prompt of ``route`` (its own, or the artifact's main prompt)."""
        return self.routes.get(route or "", self.system_prompt)

    def decoding_for(self, route: str | None) -> dict[str, Any]:
        """The decoding settings of ``route``: the artifact's, with the route's own over them."""
        return {**self.decoding, **self.route_decoding.get(route or "", {})}

    @property
    def id(self) -> str | None:
        return self.model_id

    @property
    def text(self) -> str:
        return self.system_prompt

    def names(self) -> set[str]:
        return {n for n in (self.model_id, *self.aliases) if n}

    def to_dict(self) -> dict[str, Any]:
        fmt = PROMPT_FORMAT_V2 if self.routes or self.routing else PROMPT_FORMAT_V1
        v3 = (self.decoding or self.route_decoding or self.num_examples is not None or self.route_examples
              or self.pool_drop or self.pool_add)  # fmt: skip
        data: dict[str, Any] = {
            "format": PROMPT_FORMAT if self.answer_check else PROMPT_FORMAT_V3 if v3 else fmt,
            "model_id": self.model_id,
            "aliases": list(self.aliases),
            "system_prompt": self.system_prompt,
        }
        if self.decoding:
            data["decoding"] = dict(self.decoding)
        if self.num_examples is not None:
            data["num_examples"] = self.num_examples
        if self.routes or self.route_decoding or self.route_examples:
            data["routes"] = {}
            for name in dict.fromkeys([*self.routes, *self.route_decoding, *self.route_examples]):
                entry: dict[str, Any] = {"system_prompt": self.prompt_for(name)}
                if name in self.route_decoding:
                    entry["decoding"] = dict(self.route_decoding[name])
                if name in self.route_examples:
                    entry["num_examples"] = self.route_examples[name]
                if name in self.route_provenance:
                    entry["provenance"] = self.route_provenance[name]
                data["routes"][name] = entry
        if self.routing:
            data["routing"] = dict(self.routing)
        if self.pool_drop or self.pool_add:
            data["pool"] = {"drop": list(self.pool_drop), "add": [ex.to_dict() for ex in self.pool_add]}
        if self.answer_check:
            data["answer_check"] = dict(self.answer_check)
        data["provenance"] = {"method": self.method, **{k: v for k, v in self.provenance.items() if k != "method"}}
        return data


def parse_prompt_artifact(data: Any, source: str = "<artifact>") -> PromptArtifact:
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: a prompt artifact is a JSON object, got {type(data).__name__}.")
    fmt = data.get("format")
    if fmt not in _READABLE:
        raise ArtifactError(
            f"{source}: unknown prompt artifact format {fmt!r}; this version reads {' and '.join(_READABLE)}. "
            "Upgrade auto-model or re-export the artifact."
        )
    routes, route_provenance, routing = _routes(data, fmt, source)
    decoding, route_decoding = _decoding(data, fmt, source)
    num_examples, route_examples = _num_examples(data, fmt, source)
    pool_drop, pool_add = _pool_edits(data, fmt, source)
    answer_check = _answer_check(data, fmt, source)
    text = data.get("system_prompt")
    if not isinstance(text, str) or not text.strip():
        raise ArtifactError(f"{source}: 'system_prompt' must be a non-empty string.")
    if routes.get(EVERYDAY) == text.strip():  # the copy to_dict writes beside the route's settings: the main
        del routes[EVERYDAY]  # prompt is the everyday route's, and a later change to it changes the route too
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ArtifactError(f"{source}: 'aliases' must be a list of strings.")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ArtifactError(f"{source}: 'provenance' must be an object.")
    model_id = data.get("model_id")
    if model_id is not None and not isinstance(model_id, str):
        raise ArtifactError(f"{source}: 'model_id' must be a string.")
    return PromptArtifact(
        model_id=model_id,
        system_prompt=text.strip(),
        method=str(provenance.get("method", "unknown")),
        aliases=tuple(aliases),
        provenance=dict(provenance),
        source=source,
        routes=routes,
        route_provenance=route_provenance,
        routing=routing,
        decoding=decoding,
        route_decoding=route_decoding,
        num_examples=num_examples,
        route_examples=route_examples,
        pool_drop=pool_drop,
        pool_add=pool_add,
        answer_check=answer_check,
    )


def _answer_check(data: dict[str, Any], fmt: str, source: str) -> dict[str, Any] | None:
    """The v4 ``answer_check`` of an artifact, checked (kept as the object it is)."""
    if "answer_check" not in data:
        return None
    if fmt != PROMPT_FORMAT:
        raise ArtifactError(f"{source}: 'answer_check' needs format {PROMPT_FORMAT!r}.")
    from auto_model.answer_check import AnswerCheck

    try:
        AnswerCheck.from_dict(data["answer_check"], f"{source}: answer_check")
    except InvalidRequestError as exc:
        raise ArtifactError(str(exc)) from exc
    return dict(data["answer_check"])


def _pool_edits(data: dict[str, Any], fmt: str, source: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The v3 ``pool`` edits of an artifact, checked."""
    if "pool" not in data:
        return (), ()
    if fmt not in _V3_OR_LATER:
        raise ArtifactError(f"{source}: 'pool' needs format {PROMPT_FORMAT_V3!r} or later.")
    from auto_model.retrieval import parse_icl_pool

    pool = data["pool"]
    if not isinstance(pool, dict) or set(pool) - {"drop", "add"}:
        raise ArtifactError(f"{source}: 'pool' must be an object with 'drop' (queries) and 'add' (examples).")
    drop = pool.get("drop", [])
    if not isinstance(drop, list) or not all(isinstance(q, str) and q.strip() for q in drop):
        raise ArtifactError(f"{source}: pool.drop must be a list of the queries of the examples to leave out.")
    return tuple(drop), tuple(parse_icl_pool(pool.get("add", []), f"{source}: pool.add"))


def _num_examples(data: dict[str, Any], fmt: str, source: str) -> tuple[int | None, dict[str, int]]:
    """The v3 example counts of an artifact and its routes, checked."""
    routes = data.get("routes")
    entries: dict[str, Any] = routes if isinstance(routes, dict) else {}
    given = {"": data["num_examples"]} if "num_examples" in data else {}
    given |= {name: e["num_examples"] for name, e in entries.items() if isinstance(e, dict) and "num_examples" in e}
    if given and fmt not in _V3_OR_LATER:
        raise ArtifactError(f"{source}: 'num_examples' needs format {PROMPT_FORMAT_V3!r} or later.")
    for name, value in given.items():
        if not is_whole(value, 0, MAX_NUM_EXAMPLES):
            where = f"routes.{name}.num_examples" if name else "num_examples"
            raise ArtifactError(f"{source}: {where} must be an integer from 0 to {MAX_NUM_EXAMPLES}, got {value!r}.")
    top = given.pop("", None)
    return top, given


def _decoding(data: dict[str, Any], fmt: str, source: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The v3 fields of an artifact (its decoding settings and its routes'), checked."""
    routes = data.get("routes")
    route_entries: dict[str, Any] = routes if isinstance(routes, dict) else {}
    named = "decoding" in data or any(isinstance(e, dict) and "decoding" in e for e in route_entries.values())
    if fmt not in _V3_OR_LATER:
        if named:
            raise ArtifactError(f"{source}: 'decoding' needs format {PROMPT_FORMAT_V3!r} or later.")
        return {}, {}
    try:
        decoding = check_decoding(data.get("decoding", {}), f"{source}: decoding")
        per_route = {
            name: check_decoding(entry["decoding"], f"{source}: routes.{name}.decoding")
            for name, entry in route_entries.items()
            if isinstance(entry, dict) and "decoding" in entry
        }
    except InvalidRequestError as exc:
        raise ArtifactError(str(exc)) from None
    return decoding, per_route


def _routes(
    data: dict[str, Any], fmt: str, source: str
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any] | None]:
    """The v2 fields of an artifact, checked (a v1 file has none)."""

    if fmt == PROMPT_FORMAT_V1:
        extra = {"routes", "routing"} & set(data)
        if extra:
            raise ArtifactError(f"{source}: {sorted(extra)} need format {PROMPT_FORMAT_V2!r} or later.")
        return {}, {}, None
    raw = data.get("routes", {})
    if not isinstance(raw, dict):
        raise ArtifactError(f"{source}: 'routes' must be an object of route names to prompts.")
    routes, provenance = {}, {}
    for name, entry in raw.items():
        if name not in ROUTES:
            raise ArtifactError(f"{source}: unknown route {name!r}; routes are {', '.join(ROUTES)}.")
        text = entry.get("system_prompt") if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ArtifactError(f"{source}: route {name!r} needs a non-empty 'system_prompt'.")
        routes[name] = text.strip()
        if isinstance(entry.get("provenance"), dict):
            provenance[name] = dict(entry["provenance"])
    routing = data.get("routing")
    if routing is not None:
        if not isinstance(routing, dict):
            raise ArtifactError(f"{source}: 'routing' must be an object.")
        try:
            RoutingSettings.from_dict(routing, f"{source}: routing")
        except (TypeError, ValueError) as exc:
            raise ArtifactError(str(exc)) from None
    return routes, provenance, routing


def with_decoding(
    extra: dict[str, Any], settings: dict[str, Any], supported: frozenset[str]
) -> tuple[dict[str, Any], list[str]]:
    """A request's sampling arguments with an artifact's decoding ``settings`` under them: the
    request's own win, and a setting the engine does not ``support`` is left out. Returns the
    arguments and the names left out."""
    merged, left_out = dict(extra), []
    for name, value in settings.items():
        if name in merged:
            continue
        if name in supported:
            merged[name] = value
        else:
            left_out.append(name)
    return merged, left_out


def load_prompt_artifact(path: str | os.PathLike[str]) -> PromptArtifact:
    """Load a prompt file: versioned ``.json``, or plain text (any other suffix)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"Prompt file {path} does not exist; pass prompt_path= an existing .json or .txt file."
        ) from exc
    if path.suffix.lower() != ".json":
        if not raw.strip():
            raise ArtifactError(f"Prompt file {path} is empty.")
        return PromptArtifact(model_id=None, system_prompt=raw.strip(), method="user", source=str(path))
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"Prompt file {path} is not valid JSON: {exc}") from exc
    return parse_prompt_artifact(data, str(path))


def save_prompt_artifact(artifact: PromptArtifact, path: str | os.PathLike[str]) -> Path:
    """Write an artifact as versioned JSON (atomically)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(artifact.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


#: The packaged artifacts as last read, with the files' names, sizes and times they were read from.
_PACKAGED: tuple[tuple[Any, ...], list[PromptArtifact]] = ((), [])
_PACKAGED_LOCK = threading.Lock()


def packaged_artifacts() -> list[PromptArtifact]:
    """Every artifact shipped in ``auto_model/optimized_prompts``: read and checked once per process
    (again when a file changes), then shared (artifacts are frozen). Each model used to read them
    all again: about 0.2 s per model, and most of a second on a busy machine."""
    global _PACKAGED
    folder = resources.files("auto_model").joinpath("optimized_prompts")
    entries = sorted((e for e in folder.iterdir() if e.name.endswith(".json")), key=lambda e: e.name)
    stamp = tuple((e.name, *_file_stamp(e)) for e in entries)
    with _PACKAGED_LOCK:
        if _PACKAGED[0] != stamp:
            found = [
                parse_prompt_artifact(json.loads(e.read_text(encoding="utf-8")), f"optimized_prompts/{e.name}")
                for e in entries
            ]
            _PACKAGED = (stamp, found)
        return list(_PACKAGED[1])


def _file_stamp(entry: Any) -> tuple[int, int]:
    """A packaged file's size and modification time (in a zip, where there are none: its size)."""
    try:
        info = os.stat(entry)
    except TypeError:  # not a file on disk
        return len(entry.read_bytes()), 0
    return info.st_size, info.st_mtime_ns


def default_artifact(artifacts: list[PromptArtifact] | None = None) -> PromptArtifact:
    for artifact in artifacts if artifacts is not None else packaged_artifacts():
        if artifact.model_id == DEFAULT_ARTIFACT_ID:
            return artifact
    raise ArtifactError(
        "The packaged default prompt (optimized_prompts/default.json) is missing; reinstall auto-model."
    )


def find_prompt_artifact(model_name: str, artifacts: list[PromptArtifact] | None = None) -> PromptArtifact | None:
    """The artifact for ``model_name`` by exact id, alias, or normalised name; None if there is none."""
    artifacts = artifacts if artifacts is not None else packaged_artifacts()
    candidates = [a for a in artifacts if a.model_id != DEFAULT_ARTIFACT_ID]
    for artifact in candidates:
        if model_name in artifact.names():
            return artifact
    wanted = {normalize_name(model_name), normalize_name(model_name.rstrip("/").rsplit("/", 1)[-1])}
    for artifact in candidates:
        names = artifact.names()
        normalised = {normalize_name(n) for n in names} | {normalize_name(n.rsplit("/", 1)[-1]) for n in names}
        if wanted & normalised:
            return artifact
    return None


def prompt_for_model(model_name: str, prompt_path: str | os.PathLike[str] | None = None) -> PromptArtifact:
    """The prompt a model instance uses: a user file if given, else its artifact, else the default."""
    if prompt_path is not None:
        return load_prompt_artifact(prompt_path)
    artifacts = packaged_artifacts()
    found = find_prompt_artifact(model_name, artifacts)
    if found is not None:
        return found
    logger.warning(
        "No optimized prompt ships for %r; using the default alignment prompt. "
        "Train one with `auto-model-train` or pass prompt_path=.",
        model_name,
    )
    return default_artifact(artifacts)
