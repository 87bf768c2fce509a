"""The planner's page: one SKU with reasons (``/``), the what-if form (``POST /``, each result
compared with the previous one) and small batch uploads (``/upload``, a zip of scored rows)."""

from __future__ import annotations

import html
import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from backorder.api_schema import SkuRecord, records_frame
from backorder.contract import COLUMNS, FEATURE_COLUMNS, SKU
from backorder.errors import BackorderError
from backorder.explain import PLANNER_LABELS
from backorder.predict import predict_file, score_with_reasons
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

TEMPLATES = Path(__file__).parent.parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES))
router = APIRouter()


def render(
    request: Request, holder: ModelHolder, context: dict[str, Any], status: int = 200
) -> HTMLResponse:
    model = holder.current
    principal = principal_of(request)
    # Cookie-authenticated forms need a CSRF token: the session's, or (auth none/proxy) a
    # double-submit cookie set here the first time.
    csrf = principal.csrf_token if principal else None
    fresh_csrf = principal is not None and principal.via in ("none", "proxy") and not csrf
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
def upload(
    request: Request,
    file: Annotated[UploadFile, File()],
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    model = holder.require()
    name = Path(file.filename or "batch.csv").name
    with tempfile.TemporaryDirectory(prefix="backorder-upload-") as tmp:
        source = Path(tmp) / name
        source.write_bytes(file.file.read())
        out = Path(tmp) / "predictions.csv"
        try:
            summary = predict_file(source, out, model, settings, rejects=Path(tmp) / "rejects.csv")
        except BackorderError as exc:
            metrics.rejected.labels("upload").inc()
            message = str(exc).replace(str(source), name)  # not the server's temp path
            return render(request, holder, {"upload_error": message}, status=422)
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
