"""Typed errors. Every error the SDK raises derives from :class:`AutoModelError`.

Subclasses also inherit the matching built-in (``ValueError``, ``ImportError``, ...) so that
callers who catch the built-in keep working. Messages say what to do about the problem.
"""

from __future__ import annotations

from typing import Any, Sequence


class AutoModelError(Exception):
    """Root of every error raised by auto_model."""


class InvalidRequestError(AutoModelError, ValueError):
    """A request argument is out of range or of the wrong type."""


class MissingDependencyError(AutoModelError, ImportError):
    """An optional dependency is not installed; the message names the install command."""

    def __init__(self, package: str, extra: str | None = None, *, purpose: str = "", install: str | None = None):
        self.package = package
        self.extra = extra
        if install is None:
            install = f"pip install 'auto-model[{extra}]'" if extra else f"pip install {package}"
        self.install = install
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"'{package}' is required{what} but is not installed. Install it with: {install}")


class UnknownBackendError(AutoModelError, ValueError):
    """The requested backend does not exist or cannot serve this model."""

    def __init__(self, message: str, valid: Sequence[str] = ()):
        self.valid = list(valid)
        if self.valid:
            message = f"{message} Valid backends: {', '.join(self.valid)}."
        super().__init__(message)


class ModelNotFoundError(AutoModelError, FileNotFoundError):
    """A model name resolves to nothing: not a local path, not a packaged model, not on the Hub."""


class ArtifactError(AutoModelError, ValueError):
    """An optimized-prompt artifact or an ICL pool file is malformed or of an unknown version."""


class GenerationError(AutoModelError, RuntimeError):
    """The engine failed while generating."""

    def __init__(self, message: str, *, details: Any = None):
        self.details = details
        super().__init__(message)
