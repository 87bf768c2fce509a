"""What a route gets from the app, as FastAPI dependencies: settings, metrics, the model holder.

``create_app`` puts them on ``app.state``; routes ask for them by type (``SettingsDep`` ...).
The getters are ``async`` so that resolving them stays on the event loop (a sync dependency
would hop to a worker thread on every request). Dependencies that guard a whole router (a
signed-in user, a role) belong here too, added where ``create_app`` includes the router.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from backorder.config import Settings
from backorder.web.holder import ModelHolder
from backorder.web.metrics import Metrics


async def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def app_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def model_holder(request: Request) -> ModelHolder:
    holder: ModelHolder = request.app.state.holder
    return holder


SettingsDep = Annotated[Settings, Depends(app_settings)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
HolderDep = Annotated[ModelHolder, Depends(model_holder)]
