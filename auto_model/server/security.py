"""What keeps web pages and other clients' keys out of ``auto-model serve``.

Web pages: an ASGI middleware in front of the app (:class:`BrowserGuard`).

- **Host** (a server without keys): the ``Host`` header must name a loopback address
  (``localhost``, ``127.0.0.1``, ``::1``) or one of the names the server was bound to, so that a page
  on a rebound DNS name cannot reach it. A server with keys is protected by its keys.
- **Cross-origin requests**: a request to ``/v1`` with an ``Origin`` other than the server's own
  (``null`` included), or that the browser marks ``Sec-Fetch-Site`` ``cross-site`` or
  ``same-site``, is refused (403), whatever its method; the server sends no CORS headers either.
- **JSON only**: a ``POST`` whose ``Content-Type`` is not ``application/json`` gets a 415 (a page's
  ``text/plain`` form or ``fetch`` needs no preflight; JSON does).
- **Headers on every response**: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy`` that lets the playground run
  its own script and talk to its own server only.

Keys (:class:`KeyPolicy`, from ``--api-key`` or a key file, :func:`load_key_file`): each key says
whether its requests may switch their alignment or turn the answer check off, and how many
requests a minute it may send (:class:`RateLimiter`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from auto_model.constants import is_whole
from auto_model.errors import InvalidRequestError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: the names a server without keys answers to, besides the host it was bound to
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
)


def _hostname(netloc: str) -> str | None:
    """``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1`` (None when unreadable)."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


class BrowserGuard:
    """The middleware. ``check_host``: refuse a ``Host`` outside ``hosts`` and the loopback names
    (a server without keys)."""

    def __init__(self, app: Any, *, check_host: bool, hosts: Iterable[str] = ()):
        self.app, self.check_host = app, check_host
        self.hosts = {h.strip("[]").lower() for h in (*LOOPBACK_HOSTS, *hosts) if h}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self.refusal(scope["method"], scope["path"], headers)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        if refused is None:
            await self.app(scope, receive, with_headers)
            return
        status, code, text = refused
        body = json.dumps({"error": {"message": text, "type": "invalid_request_error", "param": None, "code": code}})
        await with_headers({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body.encode()})

    def refusal(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """(status, code, message) for a request this server refuses, or None."""
        host = headers.get("host", "")
        if self.check_host and (_hostname(host) or "").lower() not in self.hosts:
            return (
                403,
                "host_not_allowed",
                (
                    f"This server answers to {', '.join(sorted(self.hosts))} only; serve with an API key "
                    "(--api-key) to answer to other names."
                ),
            )
        if path.startswith("/v1"):
            origin = headers.get("origin")
            foreign = origin is not None and urlsplit(origin).netloc.lower() != host.lower()
            if foreign or headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                return 403, "cross_origin", "Requests from other web pages are refused; call the API from code."
        if method == "POST" and headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "unsupported_media_type", "Send the request body as JSON ('Content-Type: application/json')."
        return None


# -- keys and what each may do ---------------------------------------------------------------------


def check_key(key: Any) -> None:
    """Refuse a key that cannot travel as one (a comma would make it two keys in ``AUTO_MODEL_API_KEYS``),
    without showing it."""
    if not isinstance(key, str) or not key or "," in key or key != key.strip() or not key.isprintable():
        raise InvalidRequestError("An API key may not hold commas, white space at its ends or control characters, "
                                  "nor be empty.")  # fmt: skip


@dataclass(frozen=True)
class KeyPolicy:
    """One API key and what its requests may do.

    Attributes:
        key: the key, as clients send it (``Authorization: Bearer KEY``).
        name: what the operator calls it (in errors and logs; never the key itself).
        override: may switch its request's alignment (``"auto_model": {"optimized_prompt": ...}``).
        unchecked: may turn the answer check off (``"auto_model": {"check_answers": false}``).
        per_minute: the most requests a minute (a 429 with ``Retry-After`` beyond); None: no limit.
    """

    key: str
    name: str = "key"
    override: bool = False
    unchecked: bool = False
    per_minute: int | None = None

    def __post_init__(self) -> None:
        check_key(self.key)
        for flag in ("override", "unchecked"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(f"Key {self.name!r}: {flag} must be true or false.")
        rate = self.per_minute
        if rate is not None and not is_whole(rate, 1):
            raise InvalidRequestError(f"Key {self.name!r}: requests_per_minute must be an integer >= 1, got {rate!r}.")


#: what a key file's entries may say
_KEY_FIELDS = {"key", "name", "may", "requests_per_minute"}
_PERMISSIONS = {"override_alignment": "override", "skip_answer_check": "unchecked"}


def load_key_file(path: str | Path) -> list[KeyPolicy]:
    """The keys of a key file: JSON, ``{"keys": [{"key": "sk-...", "name": "app", "may":
    ["override_alignment", "skip_answer_check"], "requests_per_minute": 60}, ...]}`` (``name``,
    ``may`` and ``requests_per_minute`` optional). A bad file is an :class:`InvalidRequestError`
    that says where, and never shows a key."""
    where = f"Key file {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequestError(f"{where} cannot be read ({exc.strerror}).") from None
    except ValueError:
        raise InvalidRequestError(f"{where} is not valid JSON.") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidRequestError(f'{where} must be an object with a non-empty list "keys".')
    policies = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - _KEY_FIELDS or "key" not in entry:
            raise InvalidRequestError(f"{where}: keys[{i}] must be an object with \"key\" and some of "
                                      f"{', '.join(sorted(_KEY_FIELDS - {'key'}))}.")  # fmt: skip
        may = entry.get("may", [])
        if not isinstance(may, list) or set(may) - set(_PERMISSIONS):
            raise InvalidRequestError(f"{where}: keys[{i}].may must be a list of {', '.join(_PERMISSIONS)}.")
        flags = {_PERMISSIONS[p]: True for p in may}
        policies.append(KeyPolicy(entry["key"], str(entry.get("name", f"keys[{i}]")), per_minute=entry.get(
            "requests_per_minute"), **flags))  # fmt: skip
    if len({p.key for p in policies}) != len(policies):
        raise InvalidRequestError(f"{where}: a key is listed twice.")
    return policies


class RateLimiter:
    """Requests a minute per key: a token bucket of ``per_minute`` tokens, refilled evenly."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, when)

    def wait(self, policy: KeyPolicy) -> float:
        """0 if a request of ``policy``'s key may go now (and counts it); else the seconds until one may."""
        if policy.per_minute is None:
            return 0.0
        now = time.monotonic()
        tokens, when = self._buckets.get(policy.key, (float(policy.per_minute), now))
        tokens = min(float(policy.per_minute), tokens + (now - when) * policy.per_minute / 60)
        if tokens < 1:
            self._buckets[policy.key] = (tokens, now)
            return (1 - tokens) * 60 / policy.per_minute
        self._buckets[policy.key] = (tokens - 1, now)
        return 0.0
