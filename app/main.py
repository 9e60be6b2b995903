"""The FastAPI application: ``uvicorn app.main:app`` (settings from DPSERVE_* environment variables)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from app.api.errors import install_error_handlers
from app.api.fastpath import PredictFastPath
from app.api.main import api_router
from app.core.config import Settings, get_settings
from app.core.metrics import Metrics, MetricsMiddleware
from app.inference.registry import ModelRegistry
from app.inference.service import PredictionService
from app.schemas import PredictRequest

DESCRIPTION = """Deep Potential models (DeePMD) as a web service: POST atomic configurations, get energy (eV),
forces (eV/Angstrom), virial (eV), stress (eV/Angstrom^3) and per-atom energies. Units: Angstrom, eV.
JSON or msgpack (large systems). See docs/api.md."""

log = logging.getLogger(__name__)


def limit_malloc_arenas(n: int) -> bool:
    """glibc's mallopt(M_ARENA_MAX, n) for the arenas created from now on (the worker threads start in the
    lifespan, after this); False where there is no glibc (musl, macOS) or n == 0."""
    if n <= 0:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX = -8 in malloc.h
    except (OSError, AttributeError):
        return False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    limit_malloc_arenas(settings.malloc_arena_max)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = ModelRegistry.from_store(settings.model_store, device=settings.device,
                                            intra_op_threads=settings.intra_op_threads, cpu_arena=settings.cpu_arena,
                                            default_model=settings.default_model, ensembles=settings.ensembles,
                                            **settings.table_options())
        metrics.models_loaded.set(len(registry.all()))
        metrics.models_refused.set(len(registry.refused))
        service = PredictionService(registry, settings, metrics)
        service.on_swap = lambda reg: setattr(app.state, "registry", reg)
        await service.start()
        app.state.registry, app.state.service = registry, service
        sighup = _install_sighup(service)
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.stop()

    app = FastAPI(title="dpserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, metrics
    # routes read the settings from app.state (app.api.deps.get_app_settings); no dependency_overrides, which
    # FastAPI re-analyses on every request (py-spy: 14% of the event loop under many small requests)
    app.include_router(api_router)
    install_error_handlers(app)
    app.add_middleware(PredictFastPath)  # added first: innermost, inside CORS and the metrics
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Accept"],
                           expose_headers=["Retry-After"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)
    return app


def _install_sighup(service: PredictionService) -> bool:
    """SIGHUP reloads the model store (as POST /admin/reload does). Only possible when the event loop runs in
    the main thread (uvicorn; not TestClient, whose loop runs in a helper thread): returns whether installed."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False

    tasks: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reload after SIGHUP failed: %r", task.exception())

    def on_sighup() -> None:
        log.warning("SIGHUP: reloading the model store")
        task = asyncio.ensure_future(service.reload())
        tasks.add(task)
        task.add_done_callback(done)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError, ValueError) as e:  # no signals on this loop or platform
        log.info("SIGHUP reload not available here (%s); use POST /admin/reload", e)
        return False
    return True


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
