"""Dependencies of the route handlers, as ``Annotated`` aliases (the app's state is set in the lifespan)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.config import Settings, get_settings
from app.core.metrics import Metrics
from app.inference.registry import ModelRegistry
from app.inference.service import PredictionService

__all__ = ["SettingsDep", "RegistryDep", "ServiceDep", "MetricsDep"]


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_service(request: Request) -> PredictionService:
    return request.app.state.service


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ServiceDep = Annotated[PredictionService, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
