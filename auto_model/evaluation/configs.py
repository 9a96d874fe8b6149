"""Evaluation configurations: a model and how it is asked — its engine, the optimized prompt on or
off (or a prompt file, or a system prompt of your own), how many retrieved examples go with each
query, its route, decoding and checks — from ``--config NAME: key=value; ...`` specs or a TOML/JSON
file, checked before any engine loads (:func:`check_configs`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from auto_model.artifacts import PromptArtifact, load_prompt_artifact
from auto_model.constants import is_whole
from auto_model.errors import ArtifactError, InvalidRequestError
from auto_model.files import read_config_file
from auto_model.flags import parse_bool
from auto_model.options import GenerationOptions
from auto_model.retrieval import load_icl_pool
from auto_model.routing import ROUTES

#: A prompt path that names a packaged artifact.
PACKAGED_PREFIX = "packaged:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def engine_key(model: str, backend: str, base_url: str | None, dtype: str, prompt_format: str) -> tuple[Any, ...]:
    """What makes two engines the same: (model, backend, base_url, dtype, prompt_format)."""
    return (model, backend, base_url, dtype, prompt_format)


@dataclass(frozen=True)
class EvalConfig:
    """One way of asking a model.

    Attributes:
        name: how the configuration is called in the report (letters, digits, ``_.+-``).
        model: the model (default: the embedded default model).
        backend, base_url, dtype, prompt_format: as for :class:`~auto_model.AutoModel`.
        optimized_prompt: inject the model's optimized prompt (ignored when ``system_prompt`` or
            ``prompt_path`` is given).
        prompt_path: a prompt file: a ``.json`` artifact replaces the model's own artifact whole
            (its prompts, routes and routing); any other file is the system prompt;
            ``packaged:candidates/<file>`` names one shipped in ``optimized_prompts/``.
        system_prompt: a system prompt of your own.
        num_optimized_icl: retrieved examples per query (0: none; None, ``icl = "auto"`` in a spec: as
            many as the artifact gives each request's route).
        route: send every request down this route (``everyday`` or ``safety``); None: routed.
        icl_path: the example pool to retrieve from (default: the model's own).
        best_of: answer each item with the best of this many samples by ``reward_model`` (1: one
            greedy answer).
        reward_model: the reward model folder (``auto-model-rm train``) that chooses, for ``best_of``.
        temperature: the sampling temperature (default: 0, greedy; 0.7 with ``best_of`` > 1); sampled
            answers are seeded (seed 0), so a rerun is the same.
        optimized_decoding: apply the artifact's decoding settings (``decoding`` in a spec).
        cut_loops: cut answers where they start to loop (``cut_loops`` in a spec).
        check_answers: check answers with the artifact's answer check (``check_answers`` in a spec;
            a replaced answer is its refusal, ``finish_reason`` ``content_filter``). "The model alone"
            turns the three off.
    """

    name: str
    model: str | None = None
    backend: str = "auto"
    optimized_prompt: bool = True
    prompt_path: str | None = None
    system_prompt: str | None = None
    num_optimized_icl: int | None = 0
    base_url: str | None = None
    dtype: str = "auto"
    prompt_format: str = "auto"
    route: str | None = None
    icl_path: str | None = None
    best_of: int = 1
    reward_model: str | None = None
    temperature: float | None = None
    optimized_decoding: bool = True
    cut_loops: bool = True
    check_answers: bool = True

    def __post_init__(self) -> None:
        if self.route is not None and self.route not in ROUTES:
            raise InvalidRequestError(
                f"Configuration {self.name!r}: route must be one of {', '.join(ROUTES)}, got {self.route!r}."
            )
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidRequestError(f"Configuration name {self.name!r}: use letters, digits and _.+- only.")
        k = self.num_optimized_icl
        if k is not None and not is_whole(k, 0):
            raise InvalidRequestError(f"Configuration {self.name!r}: icl must be an integer >= 0 or auto, got {k!r}.")
        if self.system_prompt is not None and self.prompt_path is not None:
            raise InvalidRequestError(f"Configuration {self.name!r}: give system or prompt_path, not both.")
        if self.best_of > 1 and not self.reward_model:
            raise InvalidRequestError(f"Configuration {self.name!r}: best_of needs reward_model=PATH.")
        try:
            self.sampling(512)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"Configuration {self.name!r}: {exc}") from None
        if self.reward_model:
            from auto_model.rewards.reward_model import check_reward_model_folder

            check_reward_model_folder(self.reward_model, f"Configuration {self.name!r}: reward_model")

    def sampling(self, max_new_tokens: int) -> GenerationOptions:
        """How this configuration samples (the prompt and example fields are set per configuration)."""
        temperature = self.temperature if self.temperature is not None else 0.7 if self.best_of > 1 else 0.0
        sampled = temperature > 0
        return GenerationOptions(temperature=temperature, top_p=0.95 if sampled else 1.0,
                                 max_new_tokens=max_new_tokens, seed=0 if sampled else None,
                                 best_of=self.best_of)  # fmt: skip

    def engine_key(self, default_model: str) -> tuple[Any, ...]:
        return engine_key(self.model or default_model, self.backend, self.base_url, self.dtype, self.prompt_format)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SPEC_KEYS = {
    "model": "model",
    "backend": "backend",
    "prompt": "optimized_prompt",
    "prompt_path": "prompt_path",
    "system": "system_prompt",
    "icl": "num_optimized_icl",
    "base_url": "base_url",
    "dtype": "dtype",
    "prompt_format": "prompt_format",
    "route": "route",
    "icl_path": "icl_path",
    "best_of": "best_of",
    "reward_model": "reward_model",
    "temperature": "temperature",
    "decoding": "optimized_decoding",
    "cut_loops": "cut_loops",
    "check_answers": "check_answers",
}


def _coerce(name: str, key: str, value: Any) -> Any:
    field_name = _SPEC_KEYS.get(key, key)
    if field_name not in {f.name for f in fields(EvalConfig)} or field_name == "name":
        raise InvalidRequestError(f"Configuration {name!r}: unknown key {key!r}; use {', '.join(_SPEC_KEYS)}.")
    if field_name in ("optimized_prompt", "optimized_decoding", "cut_loops", "check_answers") and isinstance(
        value, str
    ):
        try:
            value = parse_bool(value)
        except ValueError:
            raise InvalidRequestError(f"Configuration {name!r}: {key} must be on or off, got {value!r}.") from None
    if field_name == "num_optimized_icl" and value == "auto":
        return field_name, None
    if field_name in ("num_optimized_icl", "best_of", "temperature") and isinstance(value, str):
        kind, what = (float, "a number") if field_name == "temperature" else (int, "an integer")
        try:
            value = kind(value)
        except ValueError:
            raise InvalidRequestError(f"Configuration {name!r}: {key} must be {what}, got {value!r}.") from None
    return field_name, value


def parse_config_spec(spec: str) -> EvalConfig:
    """``"name: model=...; prompt=off; icl=3"`` -> :class:`EvalConfig` (keys: model, backend,
    prompt, prompt_path, system, icl, base_url, dtype, prompt_format, route, icl_path, best_of,
    reward_model, temperature, decoding, cut_loops, check_answers)."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not name:
        raise InvalidRequestError(
            f"--config {spec!r}: write NAME: key=value; key=value (e.g. 'alone: prompt=off; icl=0')."
        )
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise InvalidRequestError(f"--config {name!r}: {part!r} is not key=value.")
        field_name, coerced = _coerce(name, key.strip(), value.strip())
        values[field_name] = coerced
    return EvalConfig(name, **values)


def load_config_file(path: str | Path) -> list[EvalConfig]:
    """Configurations from a JSON list, or a TOML/JSON ``{"config": [{name: ..., ...}, ...]}``."""
    data = read_config_file(path, "--configs")
    rows = data.get("config") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InvalidRequestError(f"--configs {path}: expected a list of configurations (TOML: [[config]] tables).")
    configs = []
    for row in rows:
        name = row.get("name")
        values = dict(_coerce(str(name), k, v) for k, v in row.items() if k != "name")
        configs.append(EvalConfig(name, **values))
    return configs


def default_configs(model: str | None = None, backend: str = "auto") -> list[EvalConfig]:
    """The comparison a user usually wants: the model alone (no prompt, no decoding settings, no loop
    cut, no answer check), with its optimized prompt, and with the prompt and 3 retrieved examples."""
    return [
        EvalConfig(
            "alone",
            model,
            backend,
            optimized_prompt=False,
            optimized_decoding=False,
            cut_loops=False,
            check_answers=False,
        ),
        EvalConfig("prompt", model, backend),
        EvalConfig("prompt+3icl", model, backend, num_optimized_icl=3),
    ]


def _prompt_file(path: str) -> str:
    if path.startswith(PACKAGED_PREFIX):
        inner = path[len(PACKAGED_PREFIX) :]
        resolved = Path(str(resources.files("auto_model").joinpath(f"optimized_prompts/{inner}")))
        if not resolved.is_file():
            raise ArtifactError(f"No packaged prompt {inner!r} in auto_model/optimized_prompts.")
        return str(resolved)
    return path


def check_configs(configs: Sequence[EvalConfig], max_new_tokens: int) -> dict[str, PromptArtifact]:
    """Check configurations before any engine loads; the prompt file of each that names one, loaded."""
    if not configs:
        raise InvalidRequestError("No configurations to evaluate; pass --config NAME: key=value; ...")
    names = [c.name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InvalidRequestError(f"Configuration names must differ; repeated: {', '.join(duplicated)}.")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    for config in configs:
        if config.icl_path:
            load_icl_pool(config.icl_path)  # a missing or bad pool fails here, before any engine loads
    return {c.name: load_prompt_artifact(_prompt_file(c.prompt_path)) for c in configs if c.prompt_path}


__all__ = [
    "EvalConfig",
    "PACKAGED_PREFIX",
    "check_configs",
    "default_configs",
    "engine_key",
    "load_config_file",
    "parse_config_spec",
]
