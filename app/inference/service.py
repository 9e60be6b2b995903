"""The prediction service: body -> validated frames -> cross-request batch -> encoded response.

Decoding and encoding of large bodies run in a worker thread (a 100k-atom JSON body takes a noticeable
fraction of a second to parse); small ones run inline, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.codec import decode_body, encode
from app.core.config import Settings
from app.core.errors import ServiceError
from app.core.metrics import Metrics
from app.core.units import stress_voigt
from app.inference.batcher import Batcher
from app.inference.model import DeepPotModel, Frame
from app.inference.registry import ModelRegistry
from app.inference.validation import check_sizes, to_frames
from app.schemas import PROPERTIES, PredictRequest, describe_errors

__all__ = ["PredictionService"]

log = logging.getLogger(__name__)
INLINE_BODY_BYTES = 64 * 1024  # decode smaller bodies on the event loop
INLINE_ATOMS = 2048  # encode responses for fewer atoms on the event loop


class PredictionService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics | None = None):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.incoming = 0  # requests being decoded/validated now: the batcher waits for them
        self.batchers: dict[tuple[str, str], Batcher] = {}

    async def start(self) -> None:
        for model in self.registry.all():
            b = Batcher(model, wait_s=self.settings.batch_wait_ms / 1000, max_batch_atoms=self.settings.max_batch_atoms,
                        chunk_atoms=self.settings.chunk_atoms, metrics=self.metrics, incoming=lambda: self.incoming)
            b.start()
            self.batchers[(model.name, model.version)] = b

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.batchers.clear()

    # -- one request ------------------------------------------------------------------------------------
    def prepare(self, body: bytes, content_type: str | None) -> tuple[DeepPotModel, list[Frame], list[str]]:
        """Decode and validate a body (raises ServiceError 4xx naming the field)."""
        raw = decode_body(body, content_type)
        if not isinstance(raw, dict):
            raise ServiceError(422, "the body must be an object {\"frames\": [...], \"model\": ..., \"properties\": [...]}, "
                               f"got {type(raw).__name__}", loc=())
        check_sizes(raw, self.settings)
        try:
            req = PredictRequest.model_validate(raw)
        except ValidationError as e:
            raise ServiceError(422, "invalid request", errors=describe_errors(e)) from None
        model = self.registry.get(req.model)
        return model, to_frames(req, model, self.settings), req.properties

    async def predict(self, body: bytes, content_type: str | None, as_msgpack: bool) -> tuple[bytes, str]:
        """Returns (response body, media type)."""
        self.incoming += 1
        try:
            if len(body) > INLINE_BODY_BYTES:
                model, frames, properties = await run_in_threadpool(self.prepare, body, content_type)
            else:
                model, frames, properties = self.prepare(body, content_type)
        finally:
            self.incoming -= 1
        batcher = self.batchers[(model.name, model.version)]
        try:
            results = await batcher.submit(frames, atomic_energies="atomic_energies" in properties)
        except ServiceError:
            raise
        except Exception as e:
            log.exception("internal error while evaluating %s/%s", model.name, model.version)
            raise ServiceError(500, f"internal error while evaluating model {model.name}/{model.version}: "
                               f"{type(e).__name__}: {e}") from e
        payload = {
            "model": {"name": model.name, "version": model.version},
            "results": [self._select(r, f, properties) for r, f in zip(results, frames, strict=True)],
        }
        if sum(len(f.types) for f in frames) > INLINE_ATOMS:
            return await run_in_threadpool(encode, payload, as_msgpack)
        return encode(payload, as_msgpack)

    @staticmethod
    def _select(result: dict, frame: Frame, properties: list[str]) -> dict:
        out = {}
        for p in PROPERTIES:
            if p not in properties:
                continue
            out[p] = stress_voigt(result["virial"], frame.cell) if p == "stress" else result[p]
        out["n_dropped"] = int(result["n_dropped"])
        return out
