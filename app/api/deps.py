"""Dependencies of the route handlers, as ``Annotated`` aliases (the app's state is set in the lifespan), and
the access checks.

Access control: ``require_admin`` guards the admin endpoints with the ``admin_token`` bearer token (absent:
the admin endpoints are disabled, 403); ``require_api_key`` guards /predict when ``api_keys`` is set
(``Authorization: Bearer KEY`` or ``X-API-Key: KEY``). Missing credentials: 401 with ``WWW-Authenticate``;
wrong ones: 403. Secrets are compared in constant time (``hmac.compare_digest``, against every key) and
never logged: refusals log the client address and the reason only.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr

from app.core.config import Settings
from app.core.errors import ServiceError
from app.core.metrics import Metrics
from app.inference.registry import ModelRegistry
from app.inference.service import PredictionService

__all__ = ["SettingsDep", "RegistryDep", "ServiceDep", "MetricsDep", "require_admin", "require_api_key",
           "check_api_key", "bearer_token"]

log = logging.getLogger(__name__)


# the dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread
# hand-off per dependency per request (py-spy showed it under many small requests)


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.service.registry


async def get_service(request: Request) -> PredictionService:
    return request.app.state.service


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (app.main.create_app)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ServiceDep = Annotated[PredictionService, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

_bearer = HTTPBearer(auto_error=False, description="admin endpoints: the admin token (DPSERVE_ADMIN_TOKEN); "
                     "/predict: an API key, when DPSERVE_API_KEYS is set")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="/predict: an API key, when "
                        "DPSERVE_API_KEYS is set (alternative to Authorization: Bearer)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
ApiKeyDep = Annotated[str | None, Depends(_api_key)]


def _matches(given: str, secrets: list[SecretStr]) -> bool:
    """Constant-time comparison against every secret (no early exit that would tell which one matched)."""
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(given.encode(), secret.get_secret_value().encode())
    return ok


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def require_admin(request: Request, settings: SettingsDep, bearer: BearerDep) -> None:
    if settings.admin_token is None:
        raise ServiceError(403, "admin endpoints are disabled: set DPSERVE_ADMIN_TOKEN (admin_token) to enable them")
    if bearer is None:
        log.warning("admin request from %s without a bearer token refused", _client(request))
        raise ServiceError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _matches(bearer.credentials, [settings.admin_token]):
        log.warning("admin request from %s with a wrong token refused", _client(request))
        raise ServiceError(403, "invalid admin token")


def check_api_key(settings: Settings, given: str | None, client: str) -> None:
    """Raise the 401/403 of /predict for a missing or wrong API key (nothing when api_keys is unset)."""
    if not settings.api_keys:
        return
    if given is None:
        raise ServiceError(401, "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _matches(given, settings.api_keys):
        log.warning("/predict request from %s with an invalid API key refused", client)
        raise ServiceError(403, "invalid API key")


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an 'Authorization: Bearer <token>' header (None otherwise), parsed by the helper
    FastAPI's HTTPBearer uses, so the ASGI fast path reads the header exactly as the route does."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


async def require_api_key(request: Request, settings: SettingsDep, bearer: BearerDep, key: ApiKeyDep) -> None:
    given = key if key is not None else (bearer.credentials if bearer is not None else None)
    check_api_key(settings, given, _client(request))
