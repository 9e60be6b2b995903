"""Cross-request batching: frames of concurrent requests for one model go into one model call.

One :class:`Batcher` per loaded model owns a queue and a single worker thread (``DeepPotModel.predict``
is synchronous and CPU/GPU-bound; it never runs on the event loop, so /health stays responsive).

Policy, per model:

* When the worker is free and a request is queued, the batcher takes queued requests in arrival order
  up to ``max_batch_atoms`` atoms (a larger request goes alone) and makes one ``predict`` call with all
  their frames (small isolated frames packed side by side, :mod:`app.inference.packing`); inside it,
  predict packs frames into onnxruntime runs of about ``chunk_atoms`` centre atoms and splits huge frames
  into such chunks (exact: the model is local).
* Before taking, it waits for partners -- but only while other requests are still being decoded and
  validated (``incoming() > 0``), and at most ``wait_s``. A lone client (an MD code stepping) never waits;
  under load, requests that arrive while the worker is busy are batched anyway.
* Results do not depend on batch partners: each frame's energy, forces and virial are computed from its own
  atoms only, summed in the same order (the network's rows are independent; only float round-off of a
  matrix kernel may differ, far below 1e-9 relative in float64).
* If a batched call fails, each request of it is retried alone, so a failure stays with the request that
  caused it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.core.errors import ServiceError
from app.core.metrics import Metrics
from app.inference.model import DeepPotModel, Frame
from app.inference.packing import predict_frames

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    frames: list[Frame]
    atomic_energies: bool
    future: asyncio.Future
    atoms: int


class Batcher:
    def __init__(self, model: DeepPotModel, *, wait_s: float = 0.002, max_batch_atoms: int = 65536,
                 chunk_atoms: int = 8192, metrics: Metrics | None = None, incoming: Callable[[], int] = lambda: 0):
        self.model = model
        self.label = f"{model.name}/{model.version}"
        self.wait_s = wait_s
        self.max_batch_atoms = max_batch_atoms
        self.chunk_atoms = chunk_atoms
        self.metrics = metrics
        self.incoming = incoming
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dpserve-{model.name}")
        self._task: asyncio.Task | None = None

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.label}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(ServiceError(503, "the server is shutting down; retry"))
        self._executor.shutdown(wait=True)

    # -- requests ---------------------------------------------------------------------------------------
    async def submit(self, frames: list[Frame], atomic_energies: bool = False) -> list[dict]:
        """Queue frames for the next model call; returns predict()'s result dicts for them, in order."""
        fut = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(frames, atomic_energies, fut, sum(len(f.types) for f in frames)))
        self._gauge()
        self._wake.set()
        return await fut

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.label).set(len(self._jobs))

    def _queued_atoms(self) -> int:
        return sum(j.atoms for j in self._jobs)

    def _take(self) -> list[_Job]:
        batch, atoms = [], 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # the client went away
                self._jobs.popleft()
                continue
            if batch and atoms + job.atoms > self.max_batch_atoms:
                break
            batch.append(self._jobs.popleft())
            atoms += job.atoms
        self._gauge()
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._jobs:
                self._wake.clear()
                continue
            deadline = loop.time() + self.wait_s
            while self.incoming() > 0 and self._queued_atoms() < self.max_batch_atoms and loop.time() < deadline:
                await asyncio.sleep(min(2e-4, max(deadline - loop.time(), 0.0)))
            batch = self._take()
            if not self._jobs:
                self._wake.clear()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        frames = [f for job in batch for f in job.frames]
        want_ae = any(job.atomic_energies for job in batch)
        try:
            results = await loop.run_in_executor(self._executor, self._predict, frames, want_ae, len(batch))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if len(batch) > 1:
                log.warning("batched call of %s failed (%s); retrying its %d requests one by one",
                            self.label, e, len(batch))
                for job in batch:
                    await self._run([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        offset = 0
        for job in batch:
            part = results[offset : offset + len(job.frames)]
            offset += len(job.frames)
            if not job.atomic_energies:
                for r in part:
                    r.pop("atomic_energies", None)
            if not job.future.done():
                job.future.set_result(part)

    def _predict(self, frames: list[Frame], atomic_energies: bool, n_requests: int) -> list[dict]:
        """Runs in the worker thread."""
        t0 = time.perf_counter()
        results = predict_frames(self.model, frames, atomic_energies=atomic_energies, chunk_atoms=self.chunk_atoms)
        dt = time.perf_counter() - t0
        if self.metrics is not None:
            atoms = sum(len(f.types) for f in frames)
            m, lab = self.metrics, self.label
            m.batch_frames.labels(lab).observe(len(frames))
            m.batch_atoms.labels(lab).observe(atoms)
            m.batch_requests.labels(lab).observe(n_requests)
            m.model_seconds.labels(lab).observe(dt)
            m.atoms.labels(lab).inc(atoms)
            m.atoms_per_second.labels(lab).set(atoms / dt if dt > 0 else 0.0)
            dropped = sum(r["n_dropped"] for r in results)
            if dropped:
                m.dropped.labels(lab).inc(dropped)
        return results
