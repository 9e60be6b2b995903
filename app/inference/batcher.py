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
* Where a call runs (``process``): 'off', always in the worker thread; 'auto', a call of several requests
  and at most ``process_max_atoms`` atoms goes to the model's child process
  (:mod:`app.inference.procworker`, started at the first such call; until it is ready, and whenever it
  fails, the worker thread computes), so the model and the event loop do not share a GIL; 'on', the child
  is started with the batcher and takes every call within ``process_max_atoms``. Only models on the CPU
  provider get a child. A lone request (an MD code stepping) and large frames stay in the worker thread.

Overload and deadlines:

* The queue is bounded (``max_queue_requests`` requests and ``max_queue_atoms`` atoms waiting; the call
  running now does not count). A request beyond either bound is shed at once with 503 and a Retry-After
  (seconds) estimated from the queued atoms and the last calls' throughput -- it never waits, so neither
  memory nor waiting time piles up. An empty queue admits any request (the request limits bound it).
* A request whose caller gives up (a deadline, a closed connection: the awaiting task is cancelled) leaves
  the queue at once; if its frames are in the running call already, their results are dropped.
* :meth:`Batcher.stop` refuses new requests (503), lets the queued and running ones finish (bounded by a
  timeout), then stops the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.core.errors import ServiceError
from app.core.metrics import Metrics
from app.inference.model import DeepPotModel, Frame
from app.inference.packing import predict_frames
from app.inference.procworker import ModelProcess, ModelProcessGone

__all__ = ["Batcher"]

log = logging.getLogger(__name__)
_PROCESS_DEPTH = 3  # calls in flight to a model's child process


@dataclass
class _Job:
    frames: list[Frame]
    atomic_energies: bool
    future: asyncio.Future
    atoms: int


class Batcher:
    def __init__(self, model: DeepPotModel, *, wait_s: float = 0.002, max_batch_atoms: int = 65536,
                 chunk_atoms: int = 8192, metrics: Metrics | None = None, incoming: Callable[[], int] = lambda: 0,
                 max_queue_requests: int | None = None, max_queue_atoms: int | None = None,
                 process: str = "off", process_threads: int = 1, process_max_atoms: int = 1024,
                 max_processes: int | None = None):
        if process not in ("off", "auto", "on"):
            raise ValueError(f"process must be one of 'off', 'auto', 'on', got {process!r}")
        self.model = model
        self.label = f"{model.name}/{model.version}"
        self.wait_s = wait_s
        self.max_batch_atoms = max_batch_atoms
        self.chunk_atoms = chunk_atoms
        self.metrics = metrics
        self._depth = metrics.queue_depth.labels(self.label) if metrics is not None else None  # labels() once
        self.incoming = incoming
        self.max_queue_requests = max_queue_requests
        self.max_queue_atoms = max_queue_atoms
        self.closing = False
        self._current: list[_Job] = []  # the jobs of the model calls running now
        self._in_flight: set[asyncio.Task] = set()  # calls in the child process
        self._atoms_per_s = 0.0  # throughput of recent calls (for Retry-After)
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dpserve-{model.name}")
        self._task: asyncio.Task | None = None
        self.process_mode = process
        self.process_max_atoms = process_max_atoms
        on_cpu = list(getattr(model, "providers", [])) == ["CPUExecutionProvider"]
        self.process = (ModelProcess(model, threads=process_threads, max_processes=max_processes)
                        if process != "off" and on_cpu else None)

    @property
    def running(self) -> bool:
        """Whether a model call is in progress."""
        return bool(self._current) or bool(self._in_flight)

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.label}")
        if self.process is not None and self.process_mode == "on":
            self.process.ensure_started()

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued and running ones (at most ``timeout`` seconds), then stop
        the worker thread. Requests still queued after the timeout get 503."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while (self._jobs or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._jobs or self.running:
            log.warning("%s: %d requests still queued after %g s of draining; refusing them", self.label,
                        len(self._jobs), timeout)
        current = list(self._current)
        for task in [self._task, *self._in_flight]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # a call that failed unexpectedly must not keep the rest from stopping
                    log.exception("%s: a model call failed while stopping", self.label)
        if self.process is not None:
            await self.process.aclose()
        for job in [*current, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(ServiceError(503, "the server is shutting down; retry",
                                                      headers={"Retry-After": "1"}))
        self._jobs.clear()
        self._gauge()
        self._executor.shutdown(wait=False, cancel_futures=True)
        # join the worker thread off the event loop (it is idle unless the drain timed out)
        joined = asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        try:
            await asyncio.wait_for(joined, timeout=max(deadline - time.monotonic(), 0) + 5)
        except TimeoutError:
            log.warning("%s: the worker thread is still in a model call; not waiting for it", self.label)

    # -- requests ---------------------------------------------------------------------------------------
    def admission(self, atoms: int) -> ServiceError | None:
        """The 503 that a request of ``atoms`` atoms would get now, or None if the queue takes it."""
        if self.closing:
            return self._shed("shutting_down", f"model {self.label} is shutting down or being replaced; retry")
        if not self._jobs:
            return None
        queued = self._queued_atoms()
        if len(self._jobs) >= (self.max_queue_requests or math.inf):
            why = f"{len(self._jobs)} requests queued, max_queue_requests = {self.max_queue_requests}"
        elif queued + atoms > (self.max_queue_atoms or math.inf):
            why = f"{queued} atoms queued + {atoms} > max_queue_atoms = {self.max_queue_atoms}"
        else:
            return None
        return self._shed("queue_full", f"model {self.label} is overloaded ({why}); retry after the "
                          "Retry-After seconds", queued + atoms)

    def _shed(self, reason: str, message: str, atoms: int = 0) -> ServiceError:
        if self.metrics is not None:
            self.metrics.shed.labels(self.label, reason).inc()
        wait = atoms / self._atoms_per_s if self._atoms_per_s > 0 else 1.0
        retry_after = min(max(math.ceil(wait), 1), 60)
        return ServiceError(503, message, headers={"Retry-After": str(retry_after)})

    async def submit(self, frames: list[Frame], atomic_energies: bool = False, admitted: bool = False) -> list[dict]:
        """Queue frames for the next model call; returns predict()'s result dicts for them, in order.
        Raises ServiceError 503 when the queue is full (unless ``admitted``: the caller checked
        :meth:`admission` just before, on the event loop, so nothing can have changed). If the awaiting task
        is cancelled (deadline, client gone) the job leaves the queue."""
        atoms = sum(len(f.types) for f in frames)
        if not admitted or self.closing:
            refusal = self.admission(atoms)
            if refusal is not None:
                raise refusal
        fut = asyncio.get_running_loop().create_future()
        job = _Job(frames, atomic_energies, fut, atoms)
        self._jobs.append(job)
        self._gauge()
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass  # already taken into a model call: its result will be dropped
            self._gauge()
            raise

    def _gauge(self) -> None:
        if self._depth is not None:
            self._depth.set(len(self._jobs))

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
        queued_while_busy = False
        while True:
            await self._wake.wait()
            if not self._jobs:
                self._wake.clear()
                queued_while_busy = False
                continue
            # requests that queued up during the last call have waited long enough: they go now, so the model
            # is not left idle while the event loop answers that call (the partner wait is for an idle model)
            busy = queued_while_busy or bool(self._in_flight)
            deadline = loop.time() + (0.0 if busy else self.wait_s)
            while self.incoming() > 0 and self._queued_atoms() < self.max_batch_atoms and loop.time() < deadline:
                await asyncio.sleep(min(2e-4, max(deadline - loop.time(), 0.0)))
            batch = self._take()
            if not self._jobs:
                self._wake.clear()
            if not batch:
                continue
            if self._to_process(batch):
                # a second call may wait in the child while the first runs: the child does not idle while this
                # loop answers the first call's requests
                self._current.extend(batch)  # now: stop() fails these jobs even if the task never starts
                task = loop.create_task(self._run_process(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                if len(self._in_flight) >= _PROCESS_DEPTH:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            else:
                await self._run(batch)
            queued_while_busy = bool(self._jobs)

    def _to_process(self, batch: list[_Job]) -> bool:
        """Whether this call goes to the child process (see the module docstring); starts the child when
        the first call that should go there finds none."""
        proc = self.process
        if proc is None or sum(j.atoms for j in batch) > self.process_max_atoms:
            return False
        concurrent = len(batch) > 1 or bool(self._jobs) or bool(self._in_flight) or self.incoming() > 0
        if self.process_mode == "auto" and not concurrent:
            return False  # a lone client: the worker thread answers without the round trip
        if not proc.ready:
            proc.ensure_started()  # the first time, or again after a failure (rate-limited)
            return False
        return True

    async def _run_process(self, batch: list[_Job]) -> None:
        """One call in the child process (its jobs are in ``_current`` already); on ModelProcessGone the
        worker thread computes it instead."""
        try:
            frames = [f for job in batch for f in job.frames]
            want_ae = any(job.atomic_energies for job in batch)
            t0 = time.perf_counter()
            try:
                results = await self.process.call(frames, want_ae, self.chunk_atoms)
            except ModelProcessGone:
                results = None  # logged by the process
            except Exception as e:
                await self._failed(batch, e)
                return
            if results is None:
                await self._run(batch, adopt=False)
                return
            self._record(frames, results, time.perf_counter() - t0, len(batch), "process")
            self._deliver(batch, results)
        finally:
            self._release(batch)

    async def _run(self, batch: list[_Job], adopt: bool = True) -> None:
        """One call in the worker thread."""
        if adopt:
            self._current.extend(batch)
        try:
            loop = asyncio.get_running_loop()
            frames = [f for job in batch for f in job.frames]
            owner = [job for job in batch for _ in job.frames]
            want_ae = any(job.atomic_energies for job in batch)
            # a frame whose request is already answered (deadline passed, client gone) is not computed further:
            # the worker thread only reads the future's done flag
            cancelled = lambda k: owner[k].future.done()  # noqa: E731
            try:
                results = await loop.run_in_executor(self._executor, self._predict, frames, want_ae, len(batch),
                                                     cancelled)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self._failed(batch, e)
                return
            self._deliver(batch, results)
        finally:
            if adopt:
                self._release(batch)

    def _release(self, batch: list[_Job]) -> None:
        """The jobs of a finished call are no longer running."""
        for job in batch:
            with contextlib.suppress(ValueError):
                self._current.remove(job)

    async def _failed(self, batch: list[_Job], e: Exception) -> None:
        """A call failed: retry each request of it alone (in the worker thread), so a failure stays with the
        request that caused it."""
        if len(batch) > 1:
            log.warning("batched call of %s failed (%s); retrying its %d requests one by one",
                        self.label, e, len(batch))
            for job in batch:
                await self._run([job], adopt=False)
            return
        if not batch[0].future.done():
            batch[0].future.set_exception(e)

    @staticmethod
    def _deliver(batch: list[_Job], results: list[dict]) -> None:
        offset = 0
        for job in batch:
            part = results[offset : offset + len(job.frames)]
            offset += len(job.frames)
            if not job.atomic_energies:
                for r in part:
                    r.pop("atomic_energies", None)
            if not job.future.done():
                job.future.set_result(part)

    def _predict(self, frames: list[Frame], atomic_energies: bool, n_requests: int, cancelled=None) -> list[dict]:
        """Runs in the worker thread."""
        t0 = time.perf_counter()
        results = predict_frames(self.model, frames, atomic_energies=atomic_energies, chunk_atoms=self.chunk_atoms,
                                 cancelled=cancelled)
        dt = time.perf_counter() - t0
        # a call cut short by cancellation says nothing about throughput (Retry-After)
        cut_short = cancelled is not None and any(cancelled(k) for k in range(len(frames)))
        self._record(frames, results, dt, n_requests, "thread", rate=not cut_short)
        return results

    def _record(self, frames, results, dt: float, n_requests: int, where: str, rate: bool = True) -> None:
        atoms = sum(len(f.types) for f in frames)
        if rate and dt > 0:
            r = atoms / dt
            self._atoms_per_s = r if self._atoms_per_s == 0 else 0.8 * self._atoms_per_s + 0.2 * r
        if self.metrics is not None:
            m, lab = self.metrics, self.label
            m.batch_frames.labels(lab).observe(len(frames))
            m.batch_atoms.labels(lab).observe(atoms)
            m.batch_requests.labels(lab).observe(n_requests)
            m.model_seconds.labels(lab).observe(dt)
            m.model_calls.labels(lab, where).inc()
            m.atoms.labels(lab).inc(atoms)
            m.atoms_per_second.labels(lab).set(atoms / dt if dt > 0 else 0.0)
            dropped = sum(r["n_dropped"] for r in results)
            if dropped:
                m.dropped.labels(lab).inc(dropped)
