"""The app itself: ``create_app`` wires state, lifespan, middleware and the routers;
``serve`` runs it under uvicorn with JSON logs.

Routers get what they need from ``app.state`` through the dependencies in ``deps``. A guard
for a whole router (sign-in, a role) goes where the router is included, e.g.
``app.include_router(api_router, dependencies=[Depends(...)])``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from backorder.config import Settings
from backorder.errors import ConfigError, ModelNotFoundError
from backorder.logs import configure_json, json_log_config
from backorder.registry import Registry
from backorder.web.api import router as api_router
from backorder.web.apidocs import router as docs_router
from backorder.web.auth import Directory, Identify, TrustedProxies, is_loopback, require
from backorder.web.headers import SecurityHeaders, TrustedHosts
from backorder.web.holder import ModelHolder
from backorder.web.metrics import Metrics
from backorder.web.middleware import BodyLimit, Observe
from backorder.web.ops import router as ops_router
from backorder.web.page import router as page_router
from backorder.web.signin import router as signin_router
from backorder.web.workers import Workers

STATIC = Path(__file__).parent.parent / "static"
log = logging.getLogger("backorder.serve")


def create_app(settings: Settings, model_ref: str = "champion") -> FastAPI:
    metrics = Metrics()
    holder = ModelHolder(settings, model_ref, metrics)
    app = FastAPI(
        title="Backorder risk",
        version="1",
        description="Which SKUs are about to go on backorder, how likely that is, and why.",
        lifespan=lifespan,
        # Our own /docs page (apidocs): FastAPI's loads Swagger UI from a CDN with inline script.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.api_docs else None,
    )
    directory = None
    if settings.auth != "none":
        from backorder.state import StateStore  # SQLAlchemy: only when keys are in play

        directory = Directory(StateStore(settings.resolved_state_url))
    # The last added is the outermost. Plain ASGI: BaseHTTPMiddleware costs ~1 ms a request.
    app.add_middleware(BodyLimit)
    # Before the body is read: an unidentified or too-frequent caller costs next to nothing.
    app.add_middleware(Identify, settings=settings, directory=directory)
    app.add_middleware(TrustedHosts, hosts=settings.trusted_hosts)
    # Outside the refusals, so they are counted and logged too.
    app.add_middleware(Observe, metrics=metrics, holder=holder)
    # Outermost, so every answer carries the headers, Observe's own 500 included.
    app.add_middleware(SecurityHeaders)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.directory = directory
    app.state.trusted_proxies = TrustedProxies(settings.trusted_proxies)
    # Starlette types a handler as taking any Exception; this one is only given its own.
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    viewer = [Depends(require("viewer"))]
    app.include_router(api_router, dependencies=viewer)
    app.include_router(ops_router)  # health checks are open; /metrics says its own role
    app.include_router(page_router, dependencies=viewer)
    app.include_router(signin_router)
    if settings.api_docs:
        app.include_router(docs_router, dependencies=viewer)
    # Open to anyone (auth.OPEN_PREFIXES): the sign-in page needs its stylesheet.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    holder: ModelHolder = app.state.holder
    directory: Directory | None = app.state.directory
    if directory is not None:
        directory.store.prepare()  # migrations run on start
        directory.start()
    # Processes for heavy work. `serve` has them load the model before the port opens (their
    # imports overlap the model load here); an app run in-process (tests) starts each on its
    # first job.
    warm = getattr(app.state, "warm_workers", False)
    workers = app.state.workers = Workers(settings, prepare=warm)
    try:
        holder.refresh()  # fail at start-up, loudly, rather than serve 503s forever
    except ModelNotFoundError as exc:
        if not settings.serve_wait_for_model:
            raise
        log.warning("no model to serve yet; waiting for one", extra={"reason": str(exc)})
    holder.start_watching(settings.serve_reload_seconds)
    await workers.start(holder.current.version if holder.current else None, wait=warm)
    try:
        yield
    finally:
        holder.stop()
        await workers.close()
        if directory is not None:
            directory.stop()


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the validation errors; every rejected record counts in the metrics."""
    metrics: Metrics = request.app.state.metrics
    errors = exc.errors()
    n_bad = len({tuple(e["loc"][:3]) for e in errors if e["loc"][:2] == ("body", "records")})
    metrics.rejected.labels("api").inc(max(n_bad, 1))
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


def serve(settings: Settings, host: str, port: int, model_ref: str) -> None:
    import uvicorn  # only the serving process needs the server

    if settings.auth == "none" and not is_loopback(host):
        raise ConfigError(
            f"auth: none is only allowed on loopback, not --host {host}; "
            "use auth: keys (the default) or proxy"
        )
    configure_json()
    # Light requests run on the event loop; a thread holding the GIL (a model reload, a sync
    # route) hands it back after 1 ms instead of 5.
    sys.setswitchinterval(0.001)
    if not settings.serve_wait_for_model:
        # A missing model is a one-line error here, not a traceback from the server's start-up
        # (and before a first key is made for a server that cannot start).
        Registry(settings).resolve(model_ref)
    if settings.auth == "keys" and is_loopback(host):
        _welcome(settings, f"http://{host}:{port}")
    app = create_app(settings, model_ref)
    app.state.warm_workers = True
    uvicorn.run(app, host=host, port=port, log_config=json_log_config(), access_log=False)


def _welcome(settings: Settings, url: str) -> None:
    """Tell the person at the terminal how to get in; the first time, make them a key.

    The first time, plain text on stdout (the logs are JSON on stderr). Only on loopback: a
    shared server's keys are made on purpose, with ``backorder keys create``.
    """
    from backorder.state import StateStore

    store = StateStore.open(settings)
    try:
        if store.keys():
            log.info(
                "sign in with an API key (new ones: backorder keys create NAME --role planner)",
                extra={"url": url},
            )
            return
        token = store.create_key("local-admin", "admin")
    finally:
        store.dispose()
    print(
        f"No API keys yet, so this made an admin key named 'local-admin'. "
        f"Open {url} and sign in with:",
        flush=True,
    )
    print(token, flush=True)
