"""The one place that reads ``AUTO_MODEL_*`` environment variables.

Values are read when asked for (not frozen at import) so that a process, or a test, can point
them elsewhere before building a model. The SDK never writes them; ``auto-model serve --workers``
hands its keys and options to its worker processes through ``AUTO_MODEL_API_KEYS``,
``AUTO_MODEL_UNCHECKED_KEYS``, ``AUTO_MODEL_METRICS_KEY``, ``AUTO_MODEL_UPSTREAM_API_KEY`` and the
server's options variable (never through a file), which the workers read with :func:`env_list` and
:func:`env_value`.

| variable                      | meaning                                          | default                        |
|-------------------------------|--------------------------------------------------|--------------------------------|
| ``AUTO_MODEL_CACHE``          | cache folder (materialised models, embeddings)   | ``$XDG_CACHE_HOME/auto_model`` |
| ``AUTO_MODEL_DEFAULT_MODEL``  | model used when none is named                    | SmolLM2-135M-Instruct          |
| ``AUTO_MODEL_EMBEDDING_MODEL``| sentence-transformers model for ICL retrieval    | all-MiniLM-L6-v2               |
| ``AUTO_MODEL_OFFLINE``        | never contact the Hugging Face Hub (``1``)       | ``HF_HUB_OFFLINE``             |
| ``AUTO_MODEL_DEBUG``          | command lines print tracebacks (``1``)           | unset                          |
| ``AUTO_MODEL_API_KEYS``       | ``auto-model serve``: keys, comma-separated      | unset                          |
| ``AUTO_MODEL_UNCHECKED_KEYS`` | keys that may turn the answer check off          | unset                          |
| ``AUTO_MODEL_KEY_FILE``       | ``auto-model serve``: a key file with policies   | unset                          |
| ``AUTO_MODEL_METRICS_KEY``    | the key ``/metrics`` asks for                    | unset                          |
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_bool(value: str | bool) -> bool:
    """``True``/``False`` for a boolean word (``true``/``false``, ``yes``/``no``, ``on``/``off``,
    ``1``/``0``, in any case; every command-line flag and environment variable reads them so);
    ValueError otherwise."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false (yes/no, on/off, 1/0), got {value!r}")


def is_whole(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (``True`` and ``False`` are not) within ``low`` and ``high``
    (each optional, both included): the one check behind every "must be an integer >= n" error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    number = int(value)
    return (low is None or number >= low) and (high is None or number <= high)


def env_value(name: str) -> str | None:
    """A variable's value, or None when it is unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def cache_dir() -> Path:
    """Root cache folder for auto_model (created on demand by callers)."""
    explicit = env_value("AUTO_MODEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env_value("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "auto_model"


def default_model() -> str:
    return env_value("AUTO_MODEL_DEFAULT_MODEL") or DEFAULT_MODEL


def default_embedding_model() -> str:
    return env_value("AUTO_MODEL_EMBEDDING_MODEL") or DEFAULT_EMBEDDING_MODEL


def _is_true(value: str | None) -> bool:
    """An environment flag: a true word of :func:`parse_bool`; anything else is off."""
    try:
        return value is not None and parse_bool(value)
    except ValueError:
        return False


def offline() -> bool:
    return _is_true(env_value("AUTO_MODEL_OFFLINE") or env_value("HF_HUB_OFFLINE"))


def env_list(name: str) -> list[str]:
    """A comma-separated variable (``AUTO_MODEL_API_KEYS``, ``AUTO_MODEL_UNCHECKED_KEYS``) as its
    items, each stripped, empty ones dropped."""
    return [item.strip() for item in (env_value(name) or "").split(",") if item.strip()]


def debug() -> bool:
    """Command lines print full tracebacks instead of one line (``AUTO_MODEL_DEBUG=1``)."""
    return _is_true(env_value("AUTO_MODEL_DEBUG"))
