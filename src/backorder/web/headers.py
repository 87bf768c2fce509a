"""What every answer says about itself, and which Host headers get one, as plain ASGI
middleware (Starlette's BaseHTTPMiddleware costs about a millisecond a request).

``SecurityHeaders`` adds a Content-Security-Policy without 'unsafe-inline' (the page, its
stylesheet and the API docs load only from the app), ``nosniff``, no referrer and no framing to
every answer, errors included; ``Strict-Transport-Security`` only to answers sent over TLS.
``TrustedHosts`` refuses a Host header not in ``settings.trusted_hosts`` with a 400: a page on
another site that rebinds its DNS name to 127.0.0.1 then reaches the server under its own name,
and is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 'self' for scripts, styles, fetches and images; data: images for the icons in Swagger UI's
# stylesheet. Nothing inline: the page's styles and the docs' start-up script are files.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",  # frame-ancestors for browsers that predate it
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
# Only over TLS: sent over plain HTTP it would be ignored, and on loopback it would make the
# browser insist on https for every port of 127.0.0.1.
HSTS = ("strict-transport-security", "max-age=31536000")


def _encoded(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class SecurityHeaders:
    """Add the security headers to every HTTP answer; a header the route set itself (a stricter
    or per-route policy) is left as it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Encoded once; per request only the names already set are looked at.
        self.plain = _encoded(SECURITY_HEADERS.items())
        self.tls = _encoded([*SECURITY_HEADERS.items(), HSTS])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.tls if scope.get("scheme") == "https" else self.plain

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(value: str) -> str | None:
    """The name in a Host header or a trusted_hosts entry: lower case, no port, no brackets
    around an IPv6 address, no trailing dot; None when it cannot be a host."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return value[1:end]
    if value.count(":") > 1:  # a bare IPv6 address: only in settings, never in a Host header
        return value
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


class TrustedHosts:
    """Answer only requests whose Host header names this server; others get a 400.

    Entries are names or addresses without a port (a port is ignored), ``*.example.com`` for
    any subdomain, or ``*`` for any host.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        names = {host_name(h) for h in hosts}
        self.any = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n and n.startswith("*."))
        self.names = frozenset(n for n in names if n and not n.startswith("*"))

    def allows(self, host: str | None) -> bool:
        if self.any:
            return True
        name = host_name(host) if host is not None else None
        if name is None:
            return False
        return name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers") or [] if k == b"host"), None)
        given = host.decode("latin-1") if host is not None else None
        if self.allows(given):
            await self.app(scope, receive, send)
            return
        await _send_400(send, given)


async def _send_400(send: Send, host: str | None) -> None:
    what = f"host {host[:100]!r}" if host is not None else "a request without a Host header"
    detail = f"{what} is not served here: the trusted_hosts setting lists the names it answers to"
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
