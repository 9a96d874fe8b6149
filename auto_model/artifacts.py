"""Optimized system-prompt artifacts: versioned JSON, one file per model, shipped in the wheel.

A file looks like::

    {
      "format": "auto_model.prompt/v1",
      "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "aliases": ["smollm2-135m-instruct"],
      "system_prompt": "...",
      "provenance": {"method": "drpo" | "curated" | ..., "created": "...", ...}
    }

Lookup goes by exact id, then alias, then a normalised name (case and punctuation ignored, with or
without the organisation prefix). A model with no artifact gets the default alignment prompt and a
logged warning. A plain ``.txt`` file is accepted as a prompt too. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.errors import ArtifactError
from auto_model.files import atomic_write_text
from auto_model.resolve import normalize_name

logger = logging.getLogger(__name__)

PROMPT_FORMAT = "auto_model.prompt/v1"
DEFAULT_ARTIFACT_ID = "default"


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
    """

    model_id: str | None
    system_prompt: str
    method: str
    aliases: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def id(self) -> str | None:
        return self.model_id

    @property
    def text(self) -> str:
        return self.system_prompt

    def names(self) -> set[str]:
        return {n for n in (self.model_id, *self.aliases) if n}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROMPT_FORMAT,
            "model_id": self.model_id,
            "aliases": list(self.aliases),
            "system_prompt": self.system_prompt,
            "provenance": {"method": self.method, **{k: v for k, v in self.provenance.items() if k != "method"}},
        }


def parse_prompt_artifact(data: Any, source: str = "<artifact>") -> PromptArtifact:
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: a prompt artifact is a JSON object, got {type(data).__name__}.")
    fmt = data.get("format")
    if fmt != PROMPT_FORMAT:
        raise ArtifactError(
            f"{source}: unknown prompt artifact format {fmt!r}; this version reads {PROMPT_FORMAT!r}. "
            "Upgrade auto-model or re-export the artifact."
        )
    text = data.get("system_prompt")
    if not isinstance(text, str) or not text.strip():
        raise ArtifactError(f"{source}: 'system_prompt' must be a non-empty string.")
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
    )


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


def packaged_artifacts() -> list[PromptArtifact]:
    """Every artifact shipped in ``auto_model/optimized_prompts``."""
    folder = resources.files("auto_model").joinpath("optimized_prompts")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            found.append(
                parse_prompt_artifact(json.loads(entry.read_text(encoding="utf-8")), f"optimized_prompts/{entry.name}")
            )
    return found


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
