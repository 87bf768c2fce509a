"""The app itself: ``create_app`` wires state, lifespan, middleware and the routers;
``serve`` runs it under uvicorn with JSON logs.

Routers get what they need from ``app.state`` through the dependencies in ``deps``. A guard
for a whole router (sign-in, a role) goes where the router is included, e.g.
``app.include_router(api_router, dependencies=[Depends(...)])``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from backorder.config import Settings
from backorder.errors import ModelNotFoundError
from backorder.logs import configure_json, json_log_config
from backorder.registry import Registry
from backorder.web.api import router as api_router
from backorder.web.apidocs import router as docs_router
from backorder.web.headers import SecurityHeaders, TrustedHosts
from backorder.web.holder import ModelHolder
from backorder.web.metrics import Metrics
from backorder.web.middleware import BodyLimit, Observe
from backorder.web.ops import router as ops_router
from backorder.web.page import router as page_router

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
    # The last added is the outermost. Plain ASGI: BaseHTTPMiddleware costs ~1 ms a request.
    app.add_middleware(BodyLimit)
    app.add_middleware(TrustedHosts, hosts=settings.trusted_hosts)
    # Outside the refusals, so they are counted and logged too.
    app.add_middleware(Observe, metrics=metrics, holder=holder)
    # Outermost, so every answer carries the headers, Observe's own 500 included.
    app.add_middleware(SecurityHeaders)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    # Starlette types a handler as taking any Exception; this one is only given its own.
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.include_router(api_router)
    app.include_router(ops_router)
    app.include_router(page_router)
    if settings.api_docs:
        app.include_router(docs_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    holder: ModelHolder = app.state.holder
    try:
        holder.refresh()  # fail at start-up, loudly, rather than serve 503s forever
    except ModelNotFoundError as exc:
        if not settings.serve_wait_for_model:
            raise
        log.warning("no model to serve yet; waiting for one", extra={"reason": str(exc)})
    holder.start_watching(settings.serve_reload_seconds)
    yield
    holder.stop()


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

    configure_json()
    if not settings.serve_wait_for_model:
        # A missing model is a one-line error here, not a traceback from the server's start-up.
        Registry(settings).resolve(model_ref)
    app = create_app(settings, model_ref)
    uvicorn.run(app, host=host, port=port, log_config=json_log_config(), access_log=False)
