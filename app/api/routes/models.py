"""GET /models and GET /models/{name}: what the service can evaluate."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import RegistryDep
from app.core.errors import ServiceError
from app.inference.model import DeepPotModel
from app.inference.registry import ModelRegistry
from app.schemas import EnsembleInfo, ErrorResponse, ModelInfo, ModelsResponse, RefusedModel

router = APIRouter(tags=["models"])


def _info(registry: ModelRegistry, model: DeepPotModel) -> ModelInfo:
    return ModelInfo(**model.info(), default=registry.is_default(model), versions=registry.versions(model.name),
                     providers=list(model.providers))


@router.get("/models", response_model=ModelsResponse, summary="Loaded models, ensembles (and refused ones)")
async def list_models(registry: RegistryDep) -> ModelsResponse:
    default = registry.default
    return ModelsResponse(
        models=[_info(registry, m) for m in registry.all()],
        default_model=f"{default.name}/{default.version}" if default else None,
        ensembles=[EnsembleInfo(**e.info()) for _, e in sorted(registry.ensembles.items())],
        refused=[RefusedModel(path=r.path, reason=r.reason) for r in registry.refused],
    )


@router.get("/models/{name}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}},
            summary="One model (its highest version)")
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    return _model(registry, name)


@router.get("/models/{name}/{version}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}},
            summary="One model version")
async def get_model_version(name: str, version: str, registry: RegistryDep) -> ModelInfo:
    return _model(registry, f"{name}/{version}")


def _model(registry: ModelRegistry, spec: str) -> ModelInfo:
    model = registry.find(spec)
    if model is None:
        raise ServiceError(404, f"unknown model {spec!r}; available: {', '.join(registry.names()) or 'none'}")
    return _info(registry, model)
