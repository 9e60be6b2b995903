"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import MetricsDep, RegistryDep
from app.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
async def health() -> HealthResponse:
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Readiness: models are loaded and the default model is available")
async def ready(registry: RegistryDep):
    default = registry.default
    body = ReadyResponse(ready=default is not None, models=registry.names(),
                         default_model=f"{default.name}/{default.version}" if default else None)
    if default is None:
        body.reason = ("no model loaded" if not registry.models
                       else f"default model {registry.default_spec!r} is not loaded")
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
