"""The page's sign-in (``/signin``: a key starts a session cookie) and sign-out (``/signout``).

The session cookie is HttpOnly and SameSite=Strict, Secure whenever the request came over TLS,
and lives ``session_hours``. The sign-in form has its own CSRF token (a cookie and a form field
that must match), so another site cannot sign a browser in with the attacker's key.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from backorder.web.auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Directory,
    Principal,
    came_over_tls,
    new_csrf_token,
    principal_of,
    require,
    set_csrf_cookie,
)
from backorder.web.deps import SettingsDep
from backorder.web.page import TEMPLATES

templates = Jinja2Templates(directory=str(TEMPLATES))
router = APIRouter(include_in_schema=False)


def _directory(request: Request) -> Directory | None:
    directory: Directory | None = request.app.state.directory
    return directory


def _tls(request: Request) -> bool:
    return came_over_tls(request.scope, request.app.state.trusted_proxies)


def _signin_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    token = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
    response = templates.TemplateResponse(
        request, "signin.html", {"csrf_token": token, "error": error}, status_code=status
    )
    set_csrf_cookie(response, token, tls=_tls(request))
    return response


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request, settings: SettingsDep) -> Response:
    if settings.auth != "keys" or principal_of(request) is not None:
        return RedirectResponse("/", status_code=303)
    return _signin_page(request)


@router.post("/signin")
def signin(
    request: Request,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    directory = _directory(request)
    if settings.auth != "keys" or directory is None:
        return RedirectResponse("/", status_code=303)
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf_token.encode()):
        return _signin_page(request, "The form expired: please sign in again.", 403)
    started = directory.sign_in(key.strip(), settings.session_hours)
    if started is None:
        return _signin_page(request, "Unknown or revoked key.", 401)
    token, _ = started
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.session_hours * 3600),
        httponly=True,
        samesite="strict",
        secure=_tls(request),
        path="/",
    )
    return response


@router.post("/signout")
def signout(
    request: Request, principal: Annotated[Principal, Depends(require("viewer"))]
) -> Response:
    """Ends this browser's session (``require`` has checked the form's CSRF token)."""
    directory = _directory(request)
    token = request.cookies.get(SESSION_COOKIE)
    if principal.via == "session" and directory is not None and token:
        directory.sign_out(token)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
