"""The web app and API: one SKU at a time with reasons, a what-if form, small batch uploads.

The champion is loaded once at start-up; a watcher thread asks the registry every
``serve_reload_seconds`` whether the alias moved and, if so, loads the new version beside the
old one and swaps a single reference. A request takes that reference once, so it is answered
entirely by one model, and no request waits for a load.
"""

from __future__ import annotations

import html
import io
import json
import logging
import sys
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backorder.api_schema import (
    ModelInfo,
    PredictionOut,
    PredictRequest,
    PredictResponse,
    ReasonOut,
    SkuRecord,
    records_frame,
)
from backorder.compiled import CompiledTreesUnavailable
from backorder.config import Settings
from backorder.contract import COLUMNS, FEATURE_COLUMNS, SKU
from backorder.errors import BackorderError, ModelNotFoundError
from backorder.explain import PLANNER_LABELS
from backorder.logs import configure_json, json_log_config, log_context
from backorder.predict import predict_file, score_with_reasons
from backorder.registry import LoadedModel, Registry

TEMPLATES = Path(__file__).with_name("templates")
API_BODY_LIMIT = 1 << 20  # 1,000 records are ~0.6 MB of JSON
UPLOAD_LIMIT = 10 << 20
PROBABILITY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
log = logging.getLogger("backorder.serve")

# A typical healthy SKU: the form's starting point (the median-ish row of the samples).
FORM_DEFAULTS: dict[str, Any] = {
    "national_inv": 15,
    "lead_time": 8,
    "in_transit_qty": 0,
    "forecast_3_month": 0,
    "forecast_6_month": 0,
    "forecast_9_month": 0,
    "sales_1_month": 0,
    "sales_3_month": 1,
    "sales_6_month": 2,
    "sales_9_month": 4,
    "min_bank": 0,
    "pieces_past_due": 0,
    "perf_6_month_avg": 0.85,
    "perf_12_month_avg": 0.83,
    "local_bo_qty": 0,
    "potential_issue": "No",
    "deck_risk": "No",
    "oe_constraint": "No",
    "ppap_risk": "No",
    "stop_auto_buy": "Yes",
    "rev_stop": "No",
}


# -- metrics -------------------------------------------------------------------------------------
class Metrics:
    """The app's Prometheus metrics, in their own registry (several apps can live in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "backorder_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "backorder_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.predictions = Counter(
            "backorder_predictions", "SKUs scored, by decision", ["decision"], registry=r
        )
        self.probability = Histogram(
            "backorder_predicted_probability",
            "Predicted backorder probabilities",
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "backorder_rejected_inputs", "Input records rejected, by source", ["source"], registry=r
        )
        self.model = Info("backorder_model", "The model answering requests", registry=r)
        self.model_loaded = Gauge(
            "backorder_model_loaded_timestamp_seconds",
            "When the serving model was loaded",
            registry=r,
        )
        self.model_trained = Gauge(
            "backorder_model_trained_timestamp_seconds",
            "When the serving model was trained",
            registry=r,
        )
        self.reload_failures = Counter(
            "backorder_model_reload_failures", "Failed attempts to load a new champion", registry=r
        )

    def observe_scores(self, probability: np.ndarray, flagged: np.ndarray) -> None:
        n_flagged = int(flagged.sum())
        if n_flagged:
            self.predictions.labels("backorder").inc(n_flagged)
        if len(flagged) - n_flagged:
            self.predictions.labels("no_backorder").inc(len(flagged) - n_flagged)
        for p in probability:
            self.probability.observe(float(p))


# -- the model, hot-swappable --------------------------------------------------------------------
class ModelHolder:
    """Holds the serving model; ``refresh`` loads a newly promoted one and swaps it in."""

    def __init__(self, settings: Settings, ref: str, metrics: Metrics) -> None:
        self.settings = settings
        self.ref = ref
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the version ``ref`` points to if it is not the one serving; True if swapped."""
        with self._lock:
            registry = Registry(self.settings)
            version = registry.resolve(self.ref)
            if self.current is not None and self.current.version == version:
                return False
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CompiledTreesUnavailable)
                model = registry.load_for_scoring(version, say=log.info)
            for warning in caught:
                log.warning(str(warning.message), extra={"model_version": version})
            warm = records_frame([SkuRecord(**FORM_DEFAULTS)])
            score_with_reasons(model, warm, self.settings)  # first request pays no lazy set-up
            previous = self.current.version if self.current else None
            self.current = model
        self.metrics.model.info(
            {
                "version": model.version,
                "ref": self.ref,
                "scoring_engine": model.scoring_engine,
            }
        )
        self.metrics.model_loaded.set(time.time())
        trained = model.metadata.get("trained_at")
        if trained:
            self.metrics.model_trained.set(datetime.fromisoformat(trained).timestamp())
        log.info(
            "model loaded", extra={"model_version": model.version, "previous_version": previous}
        )
        return True

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise HTTPException(503, "no model loaded yet")
        return model

    def start_watching(self, every_seconds: float) -> None:
        if every_seconds <= 0 or self.ref.isdigit():
            return  # a pinned version never changes

        def watch() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    self.refresh()
                except ModelNotFoundError:
                    if self.current is not None:  # the alias vanished under a serving model
                        self.metrics.reload_failures.inc()
                        log.warning("model reload failed; still serving the previous model")
                    # else: still waiting for the first model, as configured; nothing is wrong
                except Exception:  # keep serving the old model; say why
                    self.metrics.reload_failures.inc()
                    log.warning(
                        "model reload failed; still serving the previous model", exc_info=True
                    )

        self._watcher = threading.Thread(target=watch, name="model-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


# -- request plumbing ----------------------------------------------------------------------------
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

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
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


# -- the app -------------------------------------------------------------------------------------
def create_app(settings: Settings, model_ref: str = "champion") -> FastAPI:
    metrics = Metrics()
    holder = ModelHolder(settings, model_ref, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        try:
            holder.refresh()  # fail at start-up, loudly, rather than serve 503s forever
        except ModelNotFoundError as exc:
            if not settings.serve_wait_for_model:
                raise
            log.warning("no model to serve yet; waiting for one", extra={"reason": str(exc)})
        holder.start_watching(settings.serve_reload_seconds)
        yield
        holder.stop()

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
    app.state.holder = holder
    app.state.metrics = metrics
    templates = Jinja2Templates(directory=str(TEMPLATES))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        n_bad = len({tuple(e["loc"][:3]) for e in errors if e["loc"][:2] == ("body", "records")})
        metrics.rejected.labels("api").inc(max(n_bad, 1))
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        return JSONResponse({"detail": detail}, status_code=422)

    # -- API ------------------------------------------------------------------------------------
    # async: the work is ~1.5 ms of CPU, cheaper on the event loop than a hop to a thread.
    @app.post("/v1/predict", response_model=PredictResponse, tags=["api"])
    async def predict(body: PredictRequest) -> PredictResponse:
        """Score 1 to 1000 SKU snapshots; every prediction carries its top reasons."""
        model = holder.require()
        rows = records_frame(body.records)
        scores = score_with_reasons(model, rows, settings)
        metrics.observe_scores(scores.probability, scores.will_backorder)
        skus = rows[SKU].tolist()
        return PredictResponse(
            model_version=model.version,
            threshold=scores.threshold,
            predictions=[
                PredictionOut(
                    sku=None if pd.isna(sku) else str(sku),
                    backorder_probability=float(p),
                    will_backorder=bool(flag),
                    risk_band=str(band),  # type: ignore[arg-type]
                    reasons=[ReasonOut(**vars(r)) for r in reasons],
                )
                for sku, p, flag, band, reasons in zip(
                    skus,
                    scores.probability,
                    scores.will_backorder,
                    scores.risk_band,
                    scores.reasons,
                    strict=True,
                )
            ],
        )

    @app.get("/v1/model", response_model=ModelInfo, tags=["api"])
    def model_info() -> ModelInfo:
        """The serving model: version, training time, metrics, threshold and features."""
        model = holder.require()
        return ModelInfo(
            name=settings.model_name,
            version=model.version,
            aliases=model.aliases,
            trained_at=model.metadata.get("trained_at"),
            threshold=model.threshold,
            training_base_rate=model.classifier.training_base_rate_,
            scoring_base_rate=settings.scoring_base_rate,
            features=model.feature_names,
            scoring_engine=model.scoring_engine,
            validation=model.metadata.get("validation"),
            holdout=model.metadata.get("holdout"),
        )

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """200 once a model is loaded."""
        model = holder.current
        if model is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": model.version})

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """200 when requests can be answered: a model is loaded and answers a probe."""
        model = holder.current
        if model is None:
            return JSONResponse({"status": "not ready", "reason": "no model"}, status_code=503)
        probe = score_with_reasons(model, records_frame([SkuRecord(**FORM_DEFAULTS)]), settings)
        if not np.isfinite(probe.probability).all():
            return JSONResponse({"status": "not ready", "reason": "bad probe"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": model.version})

    @app.get("/metrics", tags=["ops"])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- the page ---------------------------------------------------------------------------------
    def render(request: Request, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        model = holder.current
        base = {
            "fields": _form_fields(context.get("values") or FORM_DEFAULTS),
            "model_version": model.version if model else None,
            "threshold": model.threshold if model else None,
            "upload_limit_mb": UPLOAD_LIMIT >> 20,
        }
        return templates.TemplateResponse(request, "index.html", base | context, status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        return render(request, {})

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_predict(request: Request) -> HTMLResponse:
        form = await request.form()
        values = {name: str(form.get(name, "")).strip() for name in [SKU, *FEATURE_COLUMNS]}
        try:
            record = SkuRecord(**{k: (v if v != "" else None) for k, v in values.items()})
        except ValidationError as exc:
            metrics.rejected.labels("form").inc()
            errors = {str(e["loc"][0]): e["msg"] for e in exc.errors()}
            return render(request, {"values": values, "errors": errors}, status=422)
        model = holder.require()
        scores = score_with_reasons(model, records_frame([record]), settings)
        metrics.observe_scores(scores.probability, scores.will_backorder)
        result = _result_view(scores, model.version)
        previous = _previous(form, values)
        return render(request, {"values": values, "result": result, "previous": previous})

    @app.post("/upload", include_in_schema=False)
    def upload(request: Request, file: Annotated[UploadFile, File()]) -> Response:
        model = holder.require()
        name = Path(file.filename or "batch.csv").name
        with tempfile.TemporaryDirectory(prefix="backorder-upload-") as tmp:
            source = Path(tmp) / name
            source.write_bytes(file.file.read())
            out = Path(tmp) / "predictions.csv"
            try:
                summary = predict_file(source, out, model, settings, Path(tmp) / "rejects.csv")
            except BackorderError as exc:
                metrics.rejected.labels("upload").inc()
                message = str(exc).replace(str(source), name)  # not the server's temp path
                return render(request, {"upload_error": message}, status=422)
            metrics.rejected.labels("upload").inc(summary.rejected)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.write(out, "predictions.csv")
                archive.write(Path(tmp) / "rejects.csv", "rejects.csv")
                archive.writestr("summary.txt", summary.line() + "\n")
        stem = html.escape(Path(name).stem.split(".")[0] or "batch")
        return Response(
            buffer.getvalue(),
            media_type="application/zip",
            headers={
                "content-disposition": f'attachment; filename="{stem}-scored.zip"',
                "x-rows-read": str(summary.read),
                "x-rows-scored": str(summary.scored),
                "x-rows-rejected": str(summary.rejected),
            },
        )

    return app


def _form_fields(values: dict[str, Any]) -> list[dict[str, Any]]:
    fields = []
    for spec in COLUMNS:
        if spec.name not in FEATURE_COLUMNS and spec.name != SKU:
            continue
        fields.append(
            {
                "name": spec.name,
                "label": PLANNER_LABELS.get(spec.name, spec.name),
                "kind": spec.kind,
                "help": spec.meaning
                + (f" ({spec.unit})" if spec.unit else "")
                + (f". {spec.note}" if spec.note else ""),
                "value": "" if values.get(spec.name) is None else values.get(spec.name),
                "optional": spec.may_be_empty,
            }
        )
    return fields


def _result_view(scores: Any, version: str) -> dict[str, Any]:
    reasons = scores.reasons[0]
    largest = max((abs(r.contribution) for r in reasons), default=1.0) or 1.0
    return {
        "probability": float(scores.probability[0]),
        "will_backorder": bool(scores.will_backorder[0]),
        "risk_band": str(scores.risk_band[0]),
        "threshold": scores.threshold,
        "model_version": version,
        "reasons": [
            {
                "text": r.text,
                "feature": r.feature,
                "contribution": r.contribution,
                "width": round(100 * abs(r.contribution) / largest),
                "raises": r.contribution > 0,
            }
            for r in reasons
        ],
    }


def _previous(form: Any, values: dict[str, str]) -> dict[str, Any] | None:
    """The what-if: the last result and which fields changed since, carried in hidden fields."""
    try:
        probability = float(str(form.get("previous_probability", "")))
        before = json.loads(str(form.get("previous_values", "")))
    except ValueError:
        return None
    changed = [
        {"label": PLANNER_LABELS.get(k, k), "before": before.get(k), "after": v}
        for k, v in values.items()
        if k != SKU and str(before.get(k, "")) != v
    ]
    return {"probability": probability, "changed": changed}


def serve(settings: Settings, host: str, port: int, model_ref: str) -> None:
    import uvicorn

    configure_json()
    if not settings.serve_wait_for_model:
        # A missing model is a one-line error here, not a traceback from the server's start-up.
        Registry(settings).resolve(model_ref)
    app = create_app(settings, model_ref)
    uvicorn.run(app, host=host, port=port, log_config=json_log_config(), access_log=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `backorder serve`")
