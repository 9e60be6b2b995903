"""Admin endpoints (bearer token ``admin_token``; disabled when it is unset): reload the model store."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import ServiceDep, require_admin
from app.schemas import ErrorResponse, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses={
    401: {"model": ErrorResponse, "description": "no bearer token"},
    403: {"model": ErrorResponse, "description": "wrong token, or admin endpoints disabled (no DPSERVE_ADMIN_TOKEN)"},
})


@router.post("/reload", response_model=ReloadResponse, summary="Rescan the model store (as SIGHUP does)")
async def reload(service: ServiceDep) -> ReloadResponse:
    """Load new model versions, drop removed ones, re-verify every model (a model whose files no longer
    check out is refused and stops serving) and re-resolve the ensembles. Requests keep flowing: unchanged
    models are not touched, and requests already running finish on the models they started with."""
    return ReloadResponse(**await service.reload())
