"""The interactive API docs at ``/docs`` (``settings.api_docs``): Swagger UI from the app's own
static files, started by an external script, so the page needs no CDN and no 'unsafe-inline'
(FastAPI's default page loads Swagger UI from a CDN and starts it with an inline script)."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API docs</title>
<link rel="stylesheet" href="{root}/static/swagger/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="{root}/static/swagger/swagger-ui-bundle.js"></script>
<script src="{root}/static/docs.js"></script>
</body>
</html>
"""


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def api_docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
    page = PAGE.format(
        title=escape(request.app.title),
        root=escape(root),
        openapi_url=escape(f"{root}{request.app.openapi_url}"),
    )
    return HTMLResponse(page)
