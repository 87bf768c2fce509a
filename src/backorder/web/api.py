"""The HTTP API: ``POST /v1/predict`` (scores with reasons) and ``GET /v1/model``.

A light request (a few records: ~1-2 ms of work) is answered on the event loop, where that is
cheapest; a heavy one, judged by its body's size and the reason method, is parsed, validated,
scored and serialised in a worker process (``backorder.web.workers``), so that it never delays
another client. Both go through ``answer_records``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from backorder.api_schema import (
    InvalidRequest,
    ModelInfo,
    PredictionOut,
    PredictRequest,
    PredictResponse,
    Problem,
    ReasonOut,
    records_frame,
)
from backorder.config import Settings
from backorder.contract import SKU
from backorder.model import LoadedModel
from backorder.predict import score_with_reasons
from backorder.web.deps import HolderDep, MetricsDep, SettingsDep
from backorder.web.workers import PoolBusy, WorkerFailed, Workers, WorkersDep, WorkerState

router = APIRouter(tags=["api"])

# Bodies up to this size are answered on the event loop. The size bounds the records (a valid
# record is at least ~300 bytes of JSON). Measured: one record with path reasons costs ~1 ms, each
# further one ~0.07 ms (parsing and validation included), so 4 KiB (at most ~13 records) stays
# near 2 ms; a TreeSHAP record costs up to ~0.6 ms more, so with shap only 1 to 3 records stay.
LIGHT_BODY_BYTES = {"path": 4 << 10, "shap": 1 << 10}
BUSY_RETRY_AFTER_SECONDS = 1
OBSERVED_PER_SLICE = 100  # probabilities put into the metrics between two turns of the loop


@dataclass
class Answer:
    """A predict request answered: the response's JSON, or the validation errors (422)."""

    content: bytes = b""
    probability: np.ndarray = field(default_factory=lambda: np.empty(0))
    will_backorder: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    errors: list[dict[str, Any]] = field(default_factory=list)


def answer_records(model: LoadedModel, body: bytes, settings: Settings) -> Answer:
    """Validate a ``PredictRequest`` body and score it with reasons; on the event loop or in a
    worker (the JSON is made where the work is, so the loop only passes bytes on)."""
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        # As FastAPI words them, so that one handler answers both paths.
        errors = [
            {"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False)
        ]
        return Answer(errors=errors)
    rows = records_frame(request.records)
    scores = score_with_reasons(model, rows, settings)
    response = PredictResponse(
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
                rows[SKU].tolist(),
                scores.probability,
                scores.will_backorder,
                scores.risk_band,
                scores.reasons,
                strict=True,
            )
        ],
    )
    return Answer(response.model_dump_json().encode(), scores.probability, scores.will_backorder)


def answer_in_worker(state: WorkerState, version: str, body: bytes) -> Answer:
    """The worker's job: ``answer_records`` with the model version the request took."""
    return answer_records(state.model(version), body, state.settings)


def _inline_refs(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with its ``$defs`` references replaced by the definitions themselves."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(definitions[schema["$ref"].rsplit("/", 1)[1]], definitions)
        return {k: _inline_refs(v, definitions) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, definitions) for v in schema]
    return schema


_REQUEST_SCHEMA = PredictRequest.model_json_schema()
# The body is read by the route (it decides where to parse it), so its schema is declared here.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _inline_refs(_REQUEST_SCHEMA, _REQUEST_SCHEMA.get("$defs", {}))
            }
        },
    }
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    openapi_extra=PREDICT_BODY,
    responses={
        413: {"model": Problem, "description": "Body over 1 MB"},
        422: {"model": InvalidRequest, "description": "Invalid records, field by field"},
        503: {"model": Problem, "description": "No model loaded yet, or busy (Retry-After)"},
    },
)
async def predict(
    request: Request,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    workers: WorkersDep,
) -> Response:
    """Score 1 to 1000 SKU snapshots (body: `PredictRequest`); every prediction carries its
    top reasons."""
    model = holder.require()  # read once: the whole request is answered by this version
    body = await request.body()
    if workers is None or len(body) <= LIGHT_BODY_BYTES[settings.reason_method]:
        answer = answer_records(model, body, settings)
        if not answer.errors:
            metrics.observe_scores(answer.probability, answer.will_backorder)
    else:
        answer = await _answer_heavy(workers, model.version, body)
        # ~2 ms for 1,000 records: in slices, so that other requests go in between.
        for start in range(0, len(answer.probability), OBSERVED_PER_SLICE):
            part = slice(start, start + OBSERVED_PER_SLICE)
            metrics.observe_scores(answer.probability[part], answer.will_backorder[part])
            await asyncio.sleep(0)
    if answer.errors:
        raise RequestValidationError(answer.errors)
    return Response(answer.content, media_type="application/json")


async def _answer_heavy(workers: Workers, version: str, body: bytes) -> Answer:
    try:
        return await workers.predict.call(answer_in_worker, version, body, version=version)
    except PoolBusy:
        raise HTTPException(
            503,
            "busy scoring other large requests; retry shortly",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
        ) from None
    except WorkerFailed:
        raise HTTPException(503, "scoring failed on the server (it is logged); retry") from None


@router.get("/v1/model", response_model=ModelInfo)
def model_info(holder: HolderDep, settings: SettingsDep) -> ModelInfo:
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
