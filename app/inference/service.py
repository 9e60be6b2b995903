"""The prediction service: body -> validated frames -> cross-request batch -> encoded response.

Decoding and encoding of large bodies run in a worker thread (a 100k-atom JSON body takes a noticeable
fraction of a second to parse); small ones run inline, where a thread hop would cost more than the work.

Each request runs under a deadline (``request_timeout_s``, from the end of the body upload): beyond it the
request is answered 504 and its frames leave the batch queue if their model call has not started (a call
that has started cannot be interrupted; its results for that request are dropped).

Reload (:meth:`PredictionService.reload`, from ``POST /admin/reload`` or SIGHUP) builds a new registry off
the event loop and swaps it in at once, as a new *generation* (registry + one batcher per model). Models
that did not change keep their batcher, so their traffic does not even pause. A request uses the
generation that was current when it arrived from start to end; the batchers of replaced or removed models
are stopped once no request of an older generation uses them, so in-flight requests finish on the model
they started with and none fails because of a reload.

Before its body is read, a request is admitted against the server-wide pending bounds (:meth:`admit`):
``max_pending_requests`` requests and ``max_pending_body_bytes`` body bytes (the declared Content-Length,
or the bytes received so far when there is none) from arrival to response. Beyond them it is shed at once
with 503, so many concurrent large uploads cannot hold unbounded memory before the per-model queue bounds
(which see a request only once its body is parsed) come into play. A lone request is always admitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.codec import decode_body, encode
from app.core.config import Settings
from app.core.errors import InputError, ServiceError
from app.core.metrics import Metrics
from app.core.units import stress_voigt
from app.inference.batcher import Batcher
from app.inference.ensemble import Ensemble, combine, member_frames
from app.inference.model import DeepPotModel, Frame
from app.inference.registry import ModelRegistry
from app.inference.validation import check_sizes, to_frames
from app.schemas import PROPERTIES, PredictRequest, describe_errors

__all__ = ["PredictionService", "Pending"]

log = logging.getLogger(__name__)
INLINE_BODY_BYTES = 64 * 1024  # decode smaller bodies on the event loop
INLINE_ATOMS = 2048  # encode responses for fewer atoms on the event loop


@dataclass(eq=False)
class _Generation:
    """A registry and the batchers of its models; ``users`` counts the requests running on it."""

    registry: ModelRegistry
    batchers: dict[tuple[str, str], Batcher] = field(default_factory=dict)
    users: int = 0


class Pending:
    """One /predict request's hold on the pending bounds, from :meth:`PredictionService.admit`."""

    __slots__ = ("service", "bytes")

    def __init__(self, service: PredictionService):
        self.service = service
        self.bytes = 0  # body bytes this request holds in service.pending_bytes

    def hold(self, nbytes: int) -> None:
        """Hold ``nbytes`` body bytes in all (called with the declared length, then with the bytes received so
        far); 503 if that takes the server beyond max_pending_body_bytes while other requests are pending."""
        extra = nbytes - self.bytes
        if extra <= 0:
            return
        s = self.service
        limit = s.settings.max_pending_body_bytes
        if s.pending > 1 and s.pending_bytes + extra > limit:
            raise s.shed_pending("pending_bytes", f"{s.pending_bytes} body bytes pending + {extra} > "
                                 f"max_pending_body_bytes = {limit} (DPSERVE_MAX_PENDING_BODY_BYTES)")
        s.pending_bytes += extra
        self.bytes = nbytes


class PredictionService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.incoming = 0  # requests being decoded/validated now: the batcher waits for them
        self.pending = 0  # /predict requests admitted and not yet answered (see admit)
        self.pending_bytes = 0  # body bytes those requests hold
        self.on_swap: Callable[[ModelRegistry], None] | None = None  # called after a reload swapped registries
        self._gen = _Generation(registry)
        self._old: list[_Generation] = []  # replaced generations that requests still use
        self._live: set[Batcher] = set()  # started and not yet told to stop
        self._stopping: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()

    @property
    def registry(self) -> ModelRegistry:
        return self._gen.registry

    @property
    def batchers(self) -> dict[tuple[str, str], Batcher]:
        return self._gen.batchers

    # -- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._gen.batchers = self._batchers_for(self._gen.registry, {})

    async def stop(self) -> None:
        """Refuse new requests, let queued and running ones finish (bounded), stop the worker threads."""
        batchers = list(self._live)
        self._live.clear()
        await asyncio.gather(*(b.stop(timeout=self.settings.request_timeout_s) for b in batchers), *self._stopping)
        self._gen.batchers = {}

    def _batchers_for(self, registry: ModelRegistry, current: dict[tuple[str, str], Batcher]) -> dict:
        out = {}
        for model in registry.all():
            key = (model.name, model.version)
            b = current.get(key)
            if b is None or b.model is not model:
                s = self.settings
                b = Batcher(model, wait_s=s.batch_wait_ms / 1000, max_batch_atoms=s.max_batch_atoms,
                            chunk_atoms=s.chunk_atoms, metrics=self.metrics, incoming=lambda: self.incoming,
                            max_queue_requests=s.max_queue_requests, max_queue_atoms=s.max_queue_atoms,
                            process=s.model_process, process_threads=s.model_process_threads,
                            process_max_atoms=s.model_process_max_atoms, max_processes=s.model_process_max)
                b.start()
                self._live.add(b)
            out[key] = b
        return out

    async def reload(self) -> dict:
        """Rescan the store and swap the new registry in (see the module docstring); returns a summary."""
        async with self._reload_lock:
            old = self._gen
            s = self.settings
            try:
                registry = await run_in_threadpool(
                    ModelRegistry.from_store, s.model_store, device=s.device, intra_op_threads=s.intra_op_threads,
                    cpu_arena=s.cpu_arena,
                    default_model=s.default_model, ensembles=s.ensembles, previous=old.registry,
                    **s.table_options())
            except Exception:
                if self.metrics is not None:
                    self.metrics.reloads.labels("error").inc()
                raise
            new = _Generation(registry, self._batchers_for(registry, old.batchers))
            self._gen = new
            self._old.append(old)
            self._reap()
            if self.metrics is not None:
                self.metrics.reloads.labels("ok").inc()
                self.metrics.models_loaded.set(len(registry.all()))
                self.metrics.models_refused.set(len(registry.refused))
            if self.on_swap is not None:
                self.on_swap(registry)
        before = {f"{m.name}/{m.version}": m for m in old.registry.all()}
        after = {f"{m.name}/{m.version}": m for m in registry.all()}
        summary = {
            "models": list(after),
            "added": [k for k in after if k not in before],
            "removed": [k for k in before if k not in after],
            "replaced": [k for k in after if k in before and after[k] is not before[k]],
            "ensembles": sorted(registry.ensembles),
            "refused": [{"path": r.path, "reason": r.reason} for r in registry.refused],
        }
        log.warning("reloaded the model store: %d models (added %s, removed %s, replaced %s), %d refused",
                    len(after), summary["added"] or "none", summary["removed"] or "none",
                    summary["replaced"] or "none", len(registry.refused))
        return summary

    def _reap(self) -> None:
        """Stop the batchers that neither the current generation nor a busy older one uses."""
        self._old = [g for g in self._old if g.users > 0]
        in_use = {b for g in (self._gen, *self._old) for b in g.batchers.values()}
        for b in list(self._live - in_use):
            self._live.discard(b)
            task = asyncio.get_running_loop().create_task(b.stop(timeout=self.settings.request_timeout_s))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    # -- one request ------------------------------------------------------------------------------------
    @contextmanager
    def admit(self, declared_bytes: int = 0) -> Iterator[Pending]:
        """Admit a /predict request before its body is read, holding ``declared_bytes`` (its Content-Length,
        0 if unknown; :meth:`Pending.hold` adds bytes as they arrive) until the ``with`` block ends, however
        it ends. Raises the 503 of :meth:`shed_pending` when other requests are pending and this one would
        take the server beyond max_pending_requests or max_pending_body_bytes."""
        self.pending += 1
        pending = Pending(self)
        try:
            limit = self.settings.max_pending_requests
            if self.pending > limit:  # limit >= 1: other requests are pending
                raise self.shed_pending("pending_requests", f"{self.pending - 1} requests pending, "
                                        f"max_pending_requests = {limit} (DPSERVE_MAX_PENDING_REQUESTS)")
            pending.hold(declared_bytes)
            yield pending
        finally:
            self.pending -= 1
            self.pending_bytes -= pending.bytes

    def shed_pending(self, reason: str, why: str) -> ServiceError:
        """The 503 of a request beyond a pending bound (dpserve_shed_total{model="none", reason})."""
        if self.metrics is not None:
            self.metrics.shed.labels("none", reason).inc()
        return ServiceError(503, f"the server is overloaded ({why}); retry after the Retry-After seconds",
                            headers={"Retry-After": "1"})

    def prepare(self, body: bytes, content_type: str | None, registry: ModelRegistry | None = None,
                ) -> tuple[DeepPotModel | Ensemble, list[Frame], list[str]]:
        """Decode and validate a body (raises ServiceError 4xx naming the field)."""
        registry = registry or self.registry
        raw = decode_body(body, content_type)
        if not isinstance(raw, dict):
            raise ServiceError(422, "the body must be an object {\"frames\": [...], \"model\": ..., \"properties\": [...]}, "
                               f"got {type(raw).__name__}", loc=())
        check_sizes(raw, self.settings)
        try:
            req = PredictRequest.model_validate(raw)
        except ValidationError as e:
            raise ServiceError(422, "invalid request", errors=describe_errors(e)) from None
        model = registry.get(req.model)
        if "model_deviation" in req.properties and not isinstance(model, Ensemble):
            ensembles = ", ".join(sorted(registry.ensembles)) or "none is configured (DPSERVE_ENSEMBLES)"
            raise InputError(("properties",), f"'model_deviation' needs an ensemble, but {model.name} is a single "
                             f"model; ensembles: {ensembles}")
        return model, to_frames(req, model, self.settings), req.properties

    async def predict(self, body: bytes, content_type: str | None, as_msgpack: bool) -> tuple[bytes, str]:
        """Returns (response body, media type)."""
        gen = self._gen
        gen.users += 1
        try:
            return await self._predict(gen, body, content_type, as_msgpack)
        finally:
            gen.users -= 1
            if gen is not self._gen and gen.users == 0:
                self._reap()

    async def _predict(self, gen: _Generation, body: bytes, content_type: str | None,
                       as_msgpack: bool) -> tuple[bytes, str]:
        label = "none"
        deadline = asyncio.timeout(self.settings.request_timeout_s)
        try:
            async with deadline:
                self.incoming += 1
                try:
                    if len(body) > INLINE_BODY_BYTES:
                        model, frames, properties = await run_in_threadpool(self.prepare, body, content_type,
                                                                            gen.registry)
                    else:
                        model, frames, properties = self.prepare(body, content_type, gen.registry)
                finally:
                    self.incoming -= 1
                label = f"{model.name}/{model.version}"
                results = await self._evaluate(gen, model, frames, properties)
        except TimeoutError:
            if not deadline.expired():
                raise
            if self.metrics is not None:
                self.metrics.timeouts.labels(label).inc()
            raise ServiceError(504, f"the request did not finish within request_timeout_s = "
                               f"{self.settings.request_timeout_s:g} s (DPSERVE_REQUEST_TIMEOUT_S); the server "
                               "is overloaded or the request is too large: retry later or split it") from None
        ref = {"name": model.name, "version": model.version}
        if isinstance(model, Ensemble):
            ref["members"] = model.member_names()
        payload = {"model": ref, "results": [self._select(r, f, properties) for r, f in zip(results, frames, strict=True)]}
        if sum(len(f.types) for f in frames) > INLINE_ATOMS:
            return await run_in_threadpool(encode, payload, as_msgpack)
        return encode(payload, as_msgpack)

    async def _evaluate(self, gen: _Generation, model, frames: list[Frame], properties: list[str]) -> list[dict]:
        want_ae = "atomic_energies" in properties
        try:
            if not isinstance(model, Ensemble):
                return await gen.batchers[(model.name, model.version)].submit(frames, atomic_energies=want_ae)
            batchers = [gen.batchers[(m.name, m.version)] for m in model.members]
            atoms = sum(len(f.types) for f in frames)
            for b in dict.fromkeys(batchers):  # admit into every member's queue or into none
                refusal = b.admission(atoms)
                if refusal is not None:
                    raise refusal
            per_member = await asyncio.gather(*(
                b.submit(member_frames(model, m, frames), atomic_energies=want_ae, admitted=True)
                for b, m in zip(batchers, model.members, strict=True)))
            return combine(per_member, want_ae, "model_deviation" in properties)
        except ServiceError:
            raise
        except Exception as e:
            log.exception("internal error while evaluating %s/%s", model.name, model.version)
            raise ServiceError(500, f"internal error while evaluating model {model.name}/{model.version}: "
                               f"{type(e).__name__}: {e}") from e

    @staticmethod
    def _select(result: dict, frame: Frame, properties: list[str]) -> dict:
        out = {}
        for p in PROPERTIES:
            if p not in properties or p == "model_deviation":
                continue
            out[p] = stress_voigt(result["virial"], frame.cell) if p == "stress" else result[p]
        out["n_dropped"] = int(result["n_dropped"])
        if "model_deviation" in result:
            out["model_deviation"] = result["model_deviation"]
        return out
