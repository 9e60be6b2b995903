"""POST /predict: energies, forces, virials (and stress, per-atom energies) of posted frames."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import ServiceDep, SettingsDep, require_api_key
from app.codec import MSGPACK, is_msgpack
from app.core.errors import ServiceError
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
    503: {"model": ErrorResponse, "description": "overloaded: the model's queue is full (the Retry-After header "
          "says when to retry); shutting down; or no model loaded"},
    504: {"model": ErrorResponse, "description": "not finished within request_timeout_s"},
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_big = ServiceError(413, f"request body larger than max_body_bytes = {limit} (DPSERVE_MAX_BODY_BYTES); "
                           "split the request, or use msgpack with raw arrays")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


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
    body = await read_body(request, settings.max_body_bytes)
    content, media_type = await service.predict(body, request.headers.get("content-type"),
                                                is_msgpack(request.headers.get("accept")))
    return Response(content, media_type=media_type)
