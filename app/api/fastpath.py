"""POST /predict served as plain ASGI, ahead of FastAPI's router.

Under many small requests (one 7-atom molecule each, 64 clients) py-spy put two thirds of the event loop in
FastAPI's machinery around the endpoint: routing, dependency solving, the request/response wrappers and
the exception middleware, several times the cost of decoding, validating and batching the frame itself.
This middleware answers ``POST /predict`` directly with the very same code as the route
(:func:`app.api.routes.predict.handle_predict`: API key, pending bounds, body limits, decoding, batching)
and the same error shape (``{"detail": ...}``, headers such as Retry-After); everything else, and
/predict before the app's state is set, goes on to FastAPI. The route stays registered, so /docs and the
OpenAPI schema are unchanged, and it sets ``scope["route"]`` so the metrics keep the label ``/predict``.

It is installed innermost of the app's own middleware: CORS and the request metrics still wrap it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.responses import Response

from app.api.deps import bearer_token, check_api_key
from app.api.errors import internal_error_response, service_error_response
from app.api.routes.predict import handle_predict
from app.api.routes.predict import router as predict_router
from app.core.errors import ServiceError

__all__ = ["PredictFastPath"]

log = logging.getLogger(__name__)

PATH = "/predict"
_WANTED = {b"content-length", b"content-type", b"accept", b"authorization", b"x-api-key"}


class _Disconnected(Exception):
    """The client went away before its body was complete."""


class PredictFastPath:
    def __init__(self, app) -> None:
        self.app = app
        # the route object FastAPI would have matched (the metrics label requests by its path)
        self.route = next(r for r in predict_router.routes if r.path == PATH and "POST" in r.methods)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        state = getattr(app, "state", None)
        service = getattr(state, "service", None)
        if service is None:  # lifespan not run (or no app): FastAPI answers as it would
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        settings = state.settings
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            if k in _WANTED:  # the first of repeated headers wins, as starlette's Headers.get
                headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        try:
            client = scope.get("client")
            given = headers.get("x-api-key") or bearer_token(headers.get("authorization"))
            check_api_key(settings, given, client[0] if client else "unknown")
            content, media_type = await handle_predict(service, settings, headers, _chunks(receive))
            response = Response(content, media_type=media_type)
        except _Disconnected:
            return
        except ServiceError as exc:
            response = service_error_response(exc)
        except Exception as exc:  # answered as app.api.errors' handler answers unexpected errors
            log.exception("unhandled error on POST %s", PATH)
            response = internal_error_response(exc)
        await response(scope, receive, send)


async def _chunks(receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
