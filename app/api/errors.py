"""Exception handlers: every error leaves as ``{"detail": ...}`` (FastAPI's shape, see app.core.errors)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.core.errors import ServiceError, field_path

__all__ = ["install_error_handlers", "service_error_response", "internal_error_response"]

log = logging.getLogger(__name__)


def service_error_response(exc: ServiceError) -> JSONResponse:
    """The answer to a refused request (also sent by the /predict fast path, app.api.fastpath)."""
    return JSONResponse({"detail": exc.detail()}, status_code=exc.status_code, headers=exc.headers)


def internal_error_response(exc: Exception) -> JSONResponse:
    """The answer to an unexpected error (logged by the caller), naming only its type."""
    return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); see the server log"}, status_code=500)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return service_error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e["loc"]), "msg": f"{field_path(e['loc'])}: {e['msg']}", "type": e["type"]}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
