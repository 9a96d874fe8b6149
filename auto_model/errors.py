"""Typed errors. Every error the SDK raises derives from :class:`AutoModelError`.

Subclasses also inherit the matching built-in (``ValueError``, ``ImportError``, ...) so that
callers who catch the built-in keep working. Messages say what to do about the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


class EngineTimeoutError(GenerationError, TimeoutError):
    """A remote engine did not answer within ``timeout`` seconds (after the client's retries)."""


class EngineConnectionError(GenerationError, ConnectionError):
    """A remote engine could not be reached, or dropped the connection (after the client's retries)."""


class EngineHTTPError(GenerationError):
    """A remote engine answered with an HTTP error status (after the client's retries).

    Attributes:
        status_code: the HTTP status, e.g. 429 (rate limited) or 500.
    """

    def __init__(self, message: str, *, status_code: int | None = None, details: Any = None):
        self.status_code = status_code
        super().__init__(message, details=details)


class AuthenticationError(EngineHTTPError, PermissionError):
    """The remote engine rejected the API key, or no key was given."""


class MalformedResponseError(GenerationError):
    """A remote engine answered, but not with a response that could be read (e.g. truncated JSON)."""


class EngineOutageError(GenerationError):
    """Every request of a step failed: the engine is down or unreachable. Nothing of the step was
    saved; a run continues from its last checkpoint (``--resume``) once the engine answers."""


class BatchGenerationError(GenerationError):
    """Some requests of a batch failed; nothing that finished is lost.

    Attributes:
        results: one slot per request, in input order: the result for requests that finished,
            ``None`` for those that failed.
        errors: ``{index: exception}`` for every failed request.

    Pass ``return_exceptions=True`` to :meth:`auto_model.AutoModel.generate` to get a list with the
    exceptions in the failed slots instead of this error.
    """

    def __init__(self, results: Sequence[Any], errors: dict[int, BaseException]):
        self.results = list(results)
        self.errors = dict(errors)
        first = min(self.errors)
        super().__init__(
            f"{len(self.errors)} of {len(self.results)} requests failed (first: request {first}: "
            f"{type(self.errors[first]).__name__}: {self.errors[first]}). The finished results are in "
            ".results and the failures in .errors; pass return_exceptions=True to get both in one list."
        )

    @property
    def succeeded(self) -> dict[int, Any]:
        """``{index: result}`` for every request that finished."""
        return {i: r for i, r in enumerate(self.results) if i not in self.errors}
