"""POST /predict: energies, forces, virials (and stress, per-atom energies) of posted frames."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import ServiceDep, SettingsDep, require_api_key
from app.codec import MSGPACK, is_msgpack
from app.core.config import Settings
from app.core.errors import ServiceError
from app.inference.service import Pending, PredictionService
from app.schemas import ErrorResponse, PredictResponse, predict_examples

router = APIRouter(tags=["predict"])

_REQUEST_BODY = {
    "required": True,
    "description": "JSON, or msgpack (Content-Type: application/msgpack) with the same fields, where numeric "
    "arrays may be raw little-endian arrays {dtype, shape, data}; see docs/api.md",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}, "examples": None},
        MSGPACK: {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
    },
}


def _request_body() -> dict:
    body = {**_REQUEST_BODY, "content": {k: dict(v) for k, v in _REQUEST_BODY["content"].items()}}
    body["content"]["application/json"]["examples"] = predict_examples()
    return body


_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed JSON or msgpack body"},
    401: {"model": ErrorResponse, "description": "API keys are on (DPSERVE_API_KEYS) and the request has none"},
    403: {"model": ErrorResponse, "description": "wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model (the message lists the available ones)"},
    413: {"model": ErrorResponse, "description": "body, frame or atom count beyond the configured limits"},
    415: {"model": ErrorResponse, "description": "Content-Type neither JSON nor msgpack"},
    422: {"model": ErrorResponse, "description": "invalid content; each message names the field and the allowed values"},
    503: {"model": ErrorResponse, "description": "overloaded: too many requests or body bytes pending on the server "
          "(max_pending_requests, max_pending_body_bytes; checked before the body is read) or the model's queue "
          "is full (the Retry-After header says when to retry); shutting down; or no model loaded"},
    504: {"model": ErrorResponse, "description": "not finished within request_timeout_s"},
}


def _too_big(limit: int) -> ServiceError:
    return ServiceError(413, f"request body larger than max_body_bytes = {limit} (DPSERVE_MAX_BODY_BYTES); "
                        "split the request, or use msgpack with raw arrays")


def declared_length(value: str | None, limit: int) -> int | None:
    """A Content-Length header's value (None if absent or malformed), refused with 413 beyond ``limit``."""
    if value is None or not value.isdigit():
        return None
    if int(value) > limit:
        raise _too_big(limit)
    return int(value)


async def read_body(chunks: AsyncIterator[bytes], limit: int, pending: Pending | None = None) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes. With ``pending``, the bytes
    received are held in the server's pending bytes as they arrive (503 beyond max_pending_body_bytes)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        if pending is not None:
            pending.hold(size)
        parts.append(chunk)
    return b"".join(parts)


async def handle_predict(service: PredictionService, settings: Settings, headers: Mapping[str, str],
                         chunks: AsyncIterator[bytes]) -> tuple[bytes, str]:
    """One /predict request from its headers (lower-case names) and body chunks: (response body, media type).
    Shared by the route below and the ASGI fast path (:mod:`app.api.fastpath`) that serves it in production."""
    # admitted against the server-wide pending bounds before the body is read, held until the answer
    with service.admit(declared_length(headers.get("content-length"), settings.max_body_bytes) or 0) as pending:
        body = await read_body(chunks, settings.max_body_bytes, pending)
        return await service.predict(body, headers.get("content-type"), is_msgpack(headers.get("accept")))


@router.post(
    "/predict",
    summary="Energy, forces and virial of atomic configurations",
    response_model=None,
    responses={200: {"model": PredictResponse, "content": {MSGPACK: {}},
                     "description": "one result per frame; msgpack when the Accept header asks for it"}, **_ERRORS},
    openapi_extra={"requestBody": _request_body()},
    dependencies=[Depends(require_api_key)],
)
async def predict(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """Evaluate frames with a model: energy (eV), forces (N, 3) eV/A, virial (3, 3) eV by default; stress
    (6,) eV/A^3 for periodic 3D cells and atomic_energies (N,) eV on request. Concurrent requests are
    batched into one model call; results do not depend on it. ``model`` may name an ensemble: then the
    members' mean and their model deviation (DP-GEN's) come back."""
    content, media_type = await handle_predict(service, settings, request.headers, request.stream())
    return Response(content, media_type=media_type)
