"""Request plumbing as plain ASGI middleware (Starlette's BaseHTTPMiddleware costs about a
millisecond a request): ``BodyLimit`` refuses large bodies with 413, ``Observe`` gives each
request an id, one JSON log line, and its count and latency in the metrics.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backorder.logs import log_context
from backorder.web.holder import ModelHolder
from backorder.web.metrics import Metrics

API_BODY_LIMIT = 1 << 20  # 1,000 records are ~0.6 MB of JSON
UPLOAD_LIMIT = 10 << 20
log = logging.getLogger("backorder.serve")


class BodyLimit:
    """Refuse bodies over the limit with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = UPLOAD_LIMIT + (64 << 10) if scope["path"] == "/upload" else API_BODY_LIMIT
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                refused = True
                raise _TooLarge(limit)
            return message

        started = False

        async def unless_refused(message: Message) -> None:
            # Whatever the app makes of the exception raised in `counted` (Starlette's form
            # parser and FastAPI's body reader turn it into a 400), the answer is our 413.
            nonlocal started
            if refused and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await _send_413(send, limit)


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit:,} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Observe:
    """Request id, one JSON log line, and request count and latency per route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, holder: ModelHolder) -> None:
        self.app = app
        self.metrics = metrics
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = given.decode("latin-1")[:100] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        serving = self.holder.current
        # Every line logged while handling this request carries its id and the model version.
        with log_context(request_id=request_id, model_version=serving and serving.version):
            await self._observe(scope, receive, send, request_id)

    async def _observe(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        status = 500
        started_response = False
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not started_response:
                await JSONResponse(
                    {"detail": "internal error", "request_id": request_id},
                    status_code=500,
                    headers={"x-request-id": request_id},
                )(scope, receive, send)
            status = 500
        elapsed = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, scope["method"], str(status)).inc()
        self.metrics.latency.labels(route, scope["method"], str(status)).observe(elapsed)
        log.info(
            "request",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
