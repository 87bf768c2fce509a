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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from backorder.config import Settings
from backorder.errors import ModelNotFoundError
from backorder.logs import configure_json, json_log_config
from backorder.registry import Registry
from backorder.web.api import router as api_router
from backorder.web.holder import ModelHolder
from backorder.web.metrics import Metrics
from backorder.web.middleware import BodyLimit, Observe
from backorder.web.ops import router as ops_router
from backorder.web.page import router as page_router
from backorder.web.workers import Workers

log = logging.getLogger("backorder.serve")


def create_app(settings: Settings, model_ref: str = "champion") -> FastAPI:
    metrics = Metrics()
    holder = ModelHolder(settings, model_ref, metrics)
    app = FastAPI(
        title="Backorder risk",
        version="1",
        description="Which SKUs are about to go on backorder, how likely that is, and why.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit)
    # Outermost, so refusals are counted and logged too. Plain ASGI: Starlette's
    # BaseHTTPMiddleware costs about a millisecond a request.
    app.add_middleware(Observe, metrics=metrics, holder=holder)
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    # Starlette types a handler as taking any Exception; this one is only given its own.
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.include_router(api_router)
    app.include_router(ops_router)
    app.include_router(page_router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    holder: ModelHolder = app.state.holder
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
    # Light requests run on the event loop; a thread holding the GIL (a model reload, a sync
    # route) hands it back after 1 ms instead of 5.
    sys.setswitchinterval(0.001)
    if not settings.serve_wait_for_model:
        # A missing model is a one-line error here, not a traceback from the server's start-up.
        Registry(settings).resolve(model_ref)
    app = create_app(settings, model_ref)
    app.state.warm_workers = True
    uvicorn.run(app, host=host, port=port, log_config=json_log_config(), access_log=False)
