"""Who is asking, and may they: API keys, page sessions, a single-sign-on proxy, rate limits.

``Identify`` (plain ASGI, before any route) works out the principal of every request once:

- ``Authorization: Bearer TOKEN`` naming an active key (any ``auth`` mode but ``none``);
- the page's session cookie, started at ``/signin`` with a key (``auth: keys``);
- the identity and groups headers of a single-sign-on proxy, believed only from an address in
  ``trusted_proxies`` (``auth: proxy``);
- everyone, as ``anonymous`` with every role (``auth: none``, loopback only).

It refuses an unidentified request before its body is read (401 for programs, a redirect to
the sign-in page for a browser's ``GET``), except health checks, the sign-in page and static
files, and limits each principal (or, unidentified, each address) to ``rate_limit_per_minute``.
Routes then say which role they need with ``Depends(require(...))``; forms that a cookie
authenticates also need their CSRF token.

Keys and sessions live in the state store; the server keeps a copy refreshed every second
(``Directory``), so a revoked key stops working within about a second, and a request never
waits for the database.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import HTTPException, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from backorder.config import Role, Settings
from backorder.state import ActiveKey, Session, StateStore, token_hash

log = logging.getLogger("backorder.serve")

SESSION_COOKIE = "backorder_session"
CSRF_COOKIE = "backorder_csrf"
CSRF_FIELD = "csrf_token"
# Open to anyone: probes, the sign-in page and what it needs to render.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/signin", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz"})  # probes are never rate limited
_RANK = {"viewer": 1, "planner": 2, "admin": 3}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Via = Literal["key", "session", "proxy", "none"]


@dataclass(frozen=True)
class Principal:
    """An identified caller. ``role`` None: a proxy user none of whose groups has a role."""

    name: str
    role: Role | None
    via: Via
    csrf_token: str | None = None  # what a cookie-authenticated form must send back

    @property
    def ambient(self) -> bool:
        """Authenticated by something the browser sends on its own (so forms need CSRF). Not
        ``none``: it identifies nobody, so a forged form gains nothing a direct one would not
        (and ``none`` only listens on loopback, behind the trusted-hosts check)."""
        return self.via in ("session", "proxy")


def allows(role: Role | None, needed: Role) -> bool:
    """viewer < planner < admin; ``metrics`` reads /metrics only, which admin may too."""
    if role is None:
        return False
    if needed == "metrics":
        return role in ("metrics", "admin")
    return role != "metrics" and _RANK[role] >= _RANK[needed]


class Directory:
    """The server's copy of the active keys and sessions, refreshed from the state store every
    ``refresh_seconds``; last-use times are written back in one batch per refresh."""

    def __init__(self, store: StateStore, refresh_seconds: float = 1.0) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._keys: dict[str, ActiveKey] = {}
        self._sessions: dict[str, Session] = {}
        self._used: dict[str, datetime] = {}
        self._ended: set[str] = set()  # signed out here since the last refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        keys, sessions = self.store.active_keys(), self.store.active_sessions()
        # Replace whole dicts: readers on the event loop never see a half-built one.
        self._keys = keys
        self._sessions = {h: s for h, s in sessions.items() if h not in self._ended}
        self._ended = set()
        used, self._used = self._used, {}
        if used:
            self.store.record_use(used)

    def start(self) -> None:
        self.refresh()

        def poll() -> None:
            while not self._stop.wait(self.refresh_seconds):
                try:
                    self.refresh()
                except Exception:  # the store blinked: keep the last copy, say so, retry
                    log.warning("could not refresh keys from the state store", exc_info=True)

        self._thread = threading.Thread(target=poll, name="key-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            used, self._used = self._used, {}
            if used:
                self.store.record_use(used)
        finally:
            self.store.dispose()

    def key(self, token: str) -> ActiveKey | None:
        found = self._keys.get(token_hash(token))
        if found is not None:
            self._used[found.name] = datetime.now(UTC)
        return found

    def session(self, token: str) -> Session | None:
        found = self._sessions.get(token_hash(token))
        if found is None or found.expires_at <= datetime.now(UTC):
            return None
        self._used[found.key_name] = datetime.now(UTC)
        return found

    def sign_in(self, key_token: str, hours: float) -> tuple[str, Session] | None:
        """A new session for an active key (None for an unknown or revoked one)."""
        key = self.key(key_token)
        if key is None:
            return None
        token, csrf = self.store.create_session(key.name, key.role, hours)
        session = Session(
            key_name=key.name,
            role=key.role,
            csrf_token=csrf,
            expires_at=datetime.fromtimestamp(time.time() + hours * 3600, UTC),
        )
        self._sessions = {**self._sessions, token_hash(token): session}
        return token, session

    def sign_out(self, token: str) -> None:
        hashed = token_hash(token)
        self._ended.add(hashed)
        self._sessions = {h: s for h, s in self._sessions.items() if h != hashed}
        self.store.end_session(token)


class RateLimiter:
    """A token bucket per caller: ``per_minute`` requests a minute, bursts up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def wait_seconds(self, caller: str) -> float:
        """0 if the caller may go now (and charge it), else seconds until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.get(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.per_second)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > 50_000:
                self._forget_idle(now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self.per_second

    def _forget_idle(self, now: float) -> None:
        """Full buckets carry no information: drop them, so many addresses cannot fill memory."""
        full = self.capacity / self.per_second
        self._buckets = {c: (t, a) for c, (t, a) in self._buckets.items() if now - a < full}


class TrustedProxies:
    def __init__(self, entries: list[str]) -> None:
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def __contains__(self, address: str | None) -> bool:
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def came_over_tls(scope: Scope, proxies: TrustedProxies) -> bool:
    if scope.get("scheme") == "https":
        return True
    client = scope.get("client")
    if client and client[0] in proxies:
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-proto":
                return value.split(b",")[0].strip().lower() == b"https"
    return False


def _cookies(raw: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in raw.decode("latin-1").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in found:
            found[name] = value
    return found


class Identify:
    """Works out who is asking (``scope["state"]["principal"]``), refuses the unidentified and
    the too-frequent. See the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings, directory: Directory | None) -> None:
        self.app = app
        self.mode = settings.auth
        self.directory = directory
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.user_header = settings.proxy_user_header.lower().encode("latin-1")
        self.groups_header = settings.proxy_groups_header.lower().encode("latin-1")
        self.group_roles = settings.proxy_group_roles
        self.limiter = (
            RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        principal = self._principal(scope, headers)
        scope.setdefault("state", {})["principal"] = principal
        path: str = scope["path"]
        if self.limiter is not None and path not in UNLIMITED_PATHS:
            client = scope.get("client")
            caller = (
                f"{principal.via}:{principal.name}" if principal else f"addr:{client and client[0]}"
            )
            wait = self.limiter.wait_seconds(caller)
            if wait > 0:
                await _refuse(
                    send,
                    429,
                    f"rate limit: more than {int(self.limiter.capacity)} requests a minute; "
                    f"retry in {math.ceil(wait)} s",
                    [(b"retry-after", str(math.ceil(wait)).encode())],
                )
                return
        if principal is None and not _is_open(path):
            await self._unidentified(scope, send, headers)
            return
        await self.app(scope, receive, send)

    def _principal(self, scope: Scope, headers: dict[bytes, bytes]) -> Principal | None:
        if self.mode == "none":
            return Principal("anonymous", "admin", "none")
        authorization = headers.get(b"authorization")
        if authorization is not None and self.directory is not None:
            scheme, _, token = authorization.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                key = self.directory.key(token.strip())
                # A wrong key is not an anonymous request: it stays unidentified (401).
                return Principal(key.name, key.role, "key") if key else None
        if self.mode == "proxy":
            return self._proxy_principal(scope, headers)
        cookie = headers.get(b"cookie")
        if cookie and self.directory is not None:
            session_token = _cookies(cookie).get(SESSION_COOKIE)
            session = self.directory.session(session_token) if session_token else None
            if session is not None:
                return Principal(session.key_name, session.role, "session", session.csrf_token)
        return None

    def _proxy_principal(self, scope: Scope, headers: dict[bytes, bytes]) -> Principal | None:
        user = headers.get(self.user_header)
        if not user:
            return None
        client = scope.get("client")
        if not client or client[0] not in self.proxies:
            log.warning(
                "identity header from an untrusted address ignored",
                extra={"client": client and client[0], "header": self.user_header.decode()},
            )
            return None
        groups = headers.get(self.groups_header, b"").decode("latin-1").split(",")
        roles = [self.group_roles[g.strip()] for g in groups if g.strip() in self.group_roles]
        role = max(roles, key=_role_order, default=None)
        csrf = _cookies(headers.get(b"cookie", b"")).get(CSRF_COOKIE)
        return Principal(user.decode("latin-1"), role, "proxy", csrf_token=csrf)

    async def _unidentified(self, scope: Scope, send: Send, headers: dict[bytes, bytes]) -> None:
        wants_page = scope["method"] == "GET" and b"text/html" in headers.get(b"accept", b"")
        if wants_page and self.mode == "keys":
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", b"/signin"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        message = (
            "not signed in: your single-sign-on proxy did not identify you"
            if self.mode == "proxy"
            else "not signed in: send Authorization: Bearer KEY (make a key with "
            "`backorder keys create NAME --role viewer`), or sign in at /signin"
        )
        await _refuse(send, 401, message, [(b"www-authenticate", b'Bearer realm="backorder"')])


def _role_order(role: Role) -> int:
    return _RANK.get(role, 0)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _refuse(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps({"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def principal_of(request: Request) -> Principal | None:
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    return principal


def require(role: Role) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A dependency: the caller has ``role`` (403 otherwise), and a form that a cookie
    authenticates carries its CSRF token."""

    async def guard(request: Request) -> Principal:
        principal = principal_of(request)
        if principal is None:  # Identify lets only open paths through unidentified
            raise HTTPException(
                401, "not signed in", headers={"WWW-Authenticate": 'Bearer realm="backorder"'}
            )
        if not allows(principal.role, role):
            has = f"role {principal.role}" if principal.role else "no role"
            raise HTTPException(403, f"{principal.name} has {has}; {request.url.path} needs {role}")
        if principal.ambient and request.method not in _SAFE_METHODS and not _is_json(request):
            await check_csrf(request, principal)
        return principal

    return guard


def _is_json(request: Request) -> bool:
    """Another site can make a browser send a form, or text, but not JSON: that needs a CORS
    preflight, which this server never approves. So a JSON body needs no CSRF token."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


async def check_csrf(request: Request, principal: Principal) -> None:
    """Forms carry the CSRF token as a field (scripts may send ``X-CSRF-Token`` instead). Any
    other body (text, or none) must bring the header: browsers send those cross-site too."""
    sent = request.headers.get("x-csrf-token")
    if sent is None and "form" in request.headers.get("content-type", ""):
        # The same limits as the upload's own read (uploads.py): the parsed form is cached.
        sent = str((await request.form(max_files=1, max_fields=50)).get(CSRF_FIELD, ""))
    if (
        not sent
        or not principal.csrf_token
        or not hmac.compare_digest(sent.encode(), principal.csrf_token.encode())
    ):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def set_csrf_cookie(response: Response, token: str, *, tls: bool) -> None:
    """The double-submit CSRF cookie of the sign-in form (and of auth none/proxy forms)."""
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", secure=tls, path="/")
