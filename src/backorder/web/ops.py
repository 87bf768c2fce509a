"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backorder.api_schema import SkuRecord, records_frame
from backorder.predict import score_with_reasons
from backorder.web.auth import require
from backorder.web.deps import HolderDep, MetricsDep, SettingsDep
from backorder.web.holder import FORM_DEFAULTS

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(holder: HolderDep) -> JSONResponse:
    """200 once a model is loaded."""
    model = holder.current
    if model is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ok", "model_version": model.version})


@router.get("/readyz")
def readyz(holder: HolderDep, settings: SettingsDep) -> JSONResponse:
    """200 when requests can be answered: a model is loaded and answers a probe."""
    model = holder.current
    if model is None:
        return JSONResponse({"status": "not ready", "reason": "no model"}, status_code=503)
    probe = score_with_reasons(model, records_frame([SkuRecord(**FORM_DEFAULTS)]), settings)
    if not np.isfinite(probe.probability).all():
        return JSONResponse({"status": "not ready", "reason": "bad probe"}, status_code=503)
    return JSONResponse({"status": "ready", "model_version": model.version})


# Prometheus scrapes with a key of role `metrics` (or admin), sent from a credentials file.
@router.get("/metrics", dependencies=[Depends(require("metrics"))])
def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
