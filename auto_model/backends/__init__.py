"""Backend registry and the ``"auto"`` resolver.

Backends are registered by import path so that listing them imports no engine.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from auto_model.backends.base import (
    Backend,
    Completion,
    GenerationRequest,
    SamplingParams,
)
from auto_model.errors import MissingDependencyError, UnknownBackendError


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    extra: str  # the pip extra that installs its engine
    requires: tuple[str, ...]  # import names that must be importable

    def installed(self) -> bool:
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)


REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "transformers", "auto_model.backends.transformers:TransformersBackend", "hf", ("torch", "transformers")
        ),
        BackendSpec("vllm", "auto_model.backends.vllm:VLLMBackend", "vllm", ("vllm",)),
        BackendSpec("vllm-async", "auto_model.backends.vllm_async:AsyncVLLMBackend", "vllm", ("vllm",)),
        BackendSpec("openai", "auto_model.backends.openai:OpenAIBackend", "openai", ("openai",)),
    )
}

# Model names served by the OpenAI API.
OPENAI_MODEL_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-davinci", "davinci-", "babbage-")


def available_backends() -> list[str]:
    """Names of the registered backends (installed or not)."""
    return sorted(REGISTRY)


def is_openai_model_name(model_name: str) -> bool:
    return model_name.lower().startswith(OPENAI_MODEL_PREFIXES)


def resolve_backend_name(
    backend: str, model_name: str, *, open_ai_model: bool = False, base_url: str | None = None
) -> str:
    """Pick the backend for a model.

    ``"auto"``: OpenAI model names, ``open_ai_model=True`` or a ``base_url`` go to ``openai``; else
    ``vllm`` when it is installed; else ``transformers``.

    Raises:
        UnknownBackendError: listing the valid names.
    """
    if not isinstance(backend, str):
        raise UnknownBackendError(
            f"backend must be a string, got {type(backend).__name__}.", ["auto", *available_backends()]
        )
    name = backend.lower().strip()
    if name != "auto":
        if name not in REGISTRY:
            raise UnknownBackendError(f"Unknown backend {backend!r}.", ["auto", *available_backends()])
        return name
    if open_ai_model or base_url or is_openai_model_name(model_name):
        return "openai"
    if "vllm" in REGISTRY and REGISTRY["vllm"].installed():
        return "vllm"
    return "transformers"


#: On a machine without a GPU, a one-shot command line whose answers add up to at most this many new
#: tokens runs on transformers, a larger one on vLLM: transformers starts sooner, vLLM decodes faster
#: (see docs/usage.md, "Which engine a command line uses" and the cold-start benchmark).
CLI_TRANSFORMERS_MAX_TOKENS = 256


def has_gpu() -> bool:
    """Whether torch sees a CUDA (or ROCm) device; False where torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_cli_backend(
    backend: str,
    model_name: str,
    *,
    base_url: str | None = None,
    queries: int = 1,
    max_new_tokens: int = 512,
) -> str:
    """The engine for a one-shot command line: :func:`resolve_backend_name`, except that on a machine
    without a GPU ``"auto"`` picks transformers for a small job (at most
    :data:`CLI_TRANSFORMERS_MAX_TOKENS` new tokens in all) and vLLM for a larger one. A named
    backend always wins."""
    name = resolve_backend_name(backend, model_name, base_url=base_url)
    if backend.strip().lower() != "auto" or name != "vllm" or has_gpu():
        return name
    small = queries * max_new_tokens <= CLI_TRANSFORMERS_MAX_TOKENS
    return "transformers" if small and REGISTRY["transformers"].installed() else "vllm"


def get_backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered under ``name``."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise UnknownBackendError(f"Unknown backend {name!r}.", ["auto", *available_backends()])
    if not spec.installed():
        missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
        raise MissingDependencyError(missing[0], spec.extra, purpose=f"for the {name} backend")
    module_name, cls_name = spec.target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


__all__ = [
    "Backend",
    "BackendSpec",
    "Completion",
    "GenerationRequest",
    "REGISTRY",
    "SamplingParams",
    "CLI_TRANSFORMERS_MAX_TOKENS",
    "available_backends",
    "choose_cli_backend",
    "get_backend_class",
    "has_gpu",
    "is_openai_model_name",
    "resolve_backend_name",
]
