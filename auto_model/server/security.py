"""What keeps web pages out of ``auto-model serve``: an ASGI middleware in front of the app.

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
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

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
