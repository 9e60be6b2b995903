"""The FastAPI application: ``uvicorn app.main:app`` (settings from DPSERVE_* environment variables)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.errors import install_error_handlers
from app.api.main import api_router
from app.core.config import Settings, get_settings
from app.core.metrics import Metrics, MetricsMiddleware
from app.inference.registry import ModelRegistry
from app.inference.service import PredictionService
from app.schemas import PredictRequest

DESCRIPTION = """Deep Potential models (DeePMD) as a web service: POST atomic configurations, get energy (eV),
forces (eV/Angstrom), virial (eV), stress (eV/Angstrom^3) and per-atom energies. Units: Angstrom, eV.
JSON or msgpack (large systems). See docs/api.md."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = ModelRegistry.from_store(settings.model_store, device=settings.device,
                                            intra_op_threads=settings.intra_op_threads,
                                            default_model=settings.default_model)
        metrics.models_loaded.set(len(registry.all()))
        metrics.models_refused.set(len(registry.refused))
        service = PredictionService(registry, settings, metrics)
        await service.start()
        app.state.registry, app.state.service = registry, service
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="dpserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(api_router)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the /predict request models (the route reads its body itself, to decode
    msgpack and to parse large bodies off the event loop, so FastAPI does not see them)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        request = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["PredictRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
