"""The web app: the HTTP API, the operations endpoints and the planner's page.

- ``app``: ``create_app`` (lifespan, middleware, routers) and ``serve`` (uvicorn).
- ``api``, ``ops``, ``page``: one ``APIRouter`` each (``/v1/...``; health, readiness,
  metrics; the page, its what-if form and uploads).
- ``deps``: what a route gets from the app (settings, metrics, the model holder).
- ``holder``: the serving model, hot-swapped when the registry's alias moves.
- ``metrics``: the app's Prometheus metrics. ``middleware``: body limits, request logs.
- ``headers``: security headers on every answer, trusted Host names. ``apidocs``: ``/docs``.

Every module logs as ``backorder.serve``: the logger name operators already filter on.
"""

from backorder.web.app import create_app, serve
from backorder.web.holder import FORM_DEFAULTS

__all__ = ["FORM_DEFAULTS", "create_app", "serve"]
