"""The planner's page: one SKU with reasons (``/``), the what-if form (``POST /``, each result
compared with the previous one) and small batch uploads (``/upload``, a zip of scored rows)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.background import BackgroundTask

from backorder.api_schema import SkuRecord, records_frame
from backorder.contract import COLUMNS, FEATURE_COLUMNS, SKU
from backorder.explain import PLANNER_LABELS
from backorder.predict import score_with_reasons
from backorder.web.auth import (
    allows,
    came_over_tls,
    new_csrf_token,
    principal_of,
    require,
    set_csrf_cookie,
)
from backorder.web.deps import HolderDep, MetricsDep, SettingsDep
from backorder.web.holder import FORM_DEFAULTS, ModelHolder
from backorder.web.middleware import UPLOAD_LIMIT
from backorder.web.uploads import Refusal, download_disposition, receive_and_score
from backorder.web.workers import WorkersDep

TEMPLATES = Path(__file__).parent.parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES))
router = APIRouter()


def render(
    request: Request, holder: ModelHolder, context: dict[str, Any], status: int = 200
) -> HTMLResponse:
    model = holder.current
    principal = principal_of(request)
    # Cookie-authenticated forms need a CSRF token: the session's, or (auth proxy) a
    # double-submit cookie set here the first time.
    csrf = principal.csrf_token if principal else None
    fresh_csrf = principal is not None and principal.via == "proxy" and not csrf
    if fresh_csrf:
        csrf = new_csrf_token()
    base = {
        "fields": _form_fields(context.get("values") or FORM_DEFAULTS),
        "model_version": model.version if model else None,
        "threshold": model.threshold if model else None,
        "upload_limit_mb": UPLOAD_LIMIT >> 20,
        "principal": principal,
        "csrf_token": csrf,
        "can_upload": principal is not None and allows(principal.role, "planner"),
        "can_sign_out": principal is not None and principal.via == "session",
    }
    response = templates.TemplateResponse(request, "index.html", base | context, status_code=status)
    if fresh_csrf and csrf:
        set_csrf_cookie(
            response, csrf, tls=came_over_tls(request.scope, request.app.state.trusted_proxies)
        )
    return response


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page(request: Request, holder: HolderDep) -> HTMLResponse:
    return render(request, holder, {})


@router.post("/", response_class=HTMLResponse, include_in_schema=False)
async def page_predict(
    request: Request, holder: HolderDep, settings: SettingsDep, metrics: MetricsDep
) -> HTMLResponse:
    form = await request.form()
    values = {name: str(form.get(name, "")).strip() for name in [SKU, *FEATURE_COLUMNS]}
    try:
        record = SkuRecord(**{k: (v if v != "" else None) for k, v in values.items()})
    except ValidationError as exc:
        metrics.rejected.labels("form").inc()
        errors = {str(e["loc"][0]): e["msg"] for e in exc.errors()}
        return render(request, holder, {"values": values, "errors": errors}, status=422)
    model = holder.require()
    scores = score_with_reasons(model, records_frame([record]), settings)
    metrics.observe_scores(scores.probability, scores.will_backorder)
    result = _result_view(scores, model.version)
    previous = _previous(form, values)
    return render(request, holder, {"values": values, "result": result, "previous": previous})


@router.post("/upload", include_in_schema=False, dependencies=[Depends(require("planner"))])
async def upload(
    request: Request,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    workers: WorkersDep,
) -> Response:
    """Score an uploaded file into a zip, streamed from disk; a refusal (limits, format, busy,
    time) renders the page with its one-line reason. The form is read by ``uploads``, after an
    upload worker is free: a busy server answers without reading the body."""
    model = holder.require()
    outcome = await receive_and_score(request, workers, settings, model.version)
    if isinstance(outcome, Refusal):
        if outcome.bad_input:
            metrics.rejected.labels("upload").inc()
        page = render(request, holder, {"upload_error": outcome.message}, status=outcome.status)
        page.headers.update(outcome.headers)
        return page
    metrics.rejected.labels("upload").inc(outcome.counts.rejected)
    return FileResponse(
        outcome.archive,
        media_type="application/zip",
        headers={
            "content-disposition": download_disposition(outcome.name),
            "x-rows-read": str(outcome.counts.read),
            "x-rows-scored": str(outcome.counts.scored),
            "x-rows-rejected": str(outcome.counts.rejected),
        },
        background=BackgroundTask(shutil.rmtree, outcome.folder, ignore_errors=True),
    )


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
    """The what-if: the last result and which fields changed since, carried in hidden fields.
    Hidden fields can be edited: anything but a probability and an object of values is ignored."""
    try:
        probability = float(str(form.get("previous_probability", "")))
        before = json.loads(str(form.get("previous_values", "")))
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
        return None
    if not isinstance(before, dict) or not 0.0 <= probability <= 1.0:  # also refuses nan
        return None
    changed = [
        {"label": PLANNER_LABELS.get(k, k), "before": before.get(k), "after": v}
        for k, v in values.items()
        if k != SKU and str(before.get(k, "")) != v
    ]
    return {"probability": probability, "changed": changed}
