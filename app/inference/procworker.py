"""Model calls in a separate process, so that the model and the event loop never wait for each other's GIL.

Under many concurrent small requests (64 clients, one 7-atom molecule each) the model worker thread and
the event loop took turns on one GIL. Each time the worker came back from onnxruntime or a numba kernel
(both release the GIL) it waited for the busy event loop to hand the GIL over, so a model call took about
1.4x its CPU time in wall time (measured in the server: ``predict_frames`` 5.6 s wall for 4.0 s of CPU over
625 calls), and the event loop was interrupted as often. A child process has its own interpreter: the
event loop's process decodes, validates and answers; the child computes.

:class:`ModelProcess` owns one child per model: a fresh interpreter running this module
(``python -m app.inference.procworker FD``; never ``fork``, as onnxruntime's and numba's thread pools do
not survive one, and never multiprocessing's spawn, which re-imports the server's ``__main__``). The child
loads the same model directory with the same options (but its own thread count, one by default: it shares
the machine with the event loop), checks that the ONNX checksum is the one the parent serves, and answers
``predict_frames`` calls in order. Results are those of :func:`app.inference.packing.predict_frames` on the
same files, so they do not depend on which process computed them (tests compare the two).

The event loop talks to the child directly over a socket pair (length-prefixed pickles, answers in call
order): no thread sits between them, and a second call can be queued in the child while the first runs, so
the child does not idle while the event loop answers the first call's requests (the batcher keeps up to
two calls in flight).

Failure is contained: a child that cannot start, or dies or breaks the socket, is logged, and its calls
raise :class:`ModelProcessGone`, which the batcher answers by computing them in its worker thread; a new
child is started at the earliest ``restart_after_s`` later. An exception raised by the model itself inside
the child is re-raised in the parent, so the batcher retries each request alone as for an in-thread failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from app.inference.packing import offsets

__all__ = ["ModelProcess", "ModelProcessGone", "portable"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 300.0  # a cold numba cache compiles every kernel in the child: about a minute on 2 cores
_HEADER = struct.Struct("!Q")
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the app package


_slots_lock = threading.Lock()
_slot_holders: set[int] = set()  # id() of the ModelProcess objects whose child is starting or ready


class ModelProcessGone(RuntimeError):
    """The child is not available (not started, failed to start, died): compute in the parent instead."""


def _pack(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _encode_frames(frames) -> dict:
    """Frames as a few flat arrays (pickling many small Frame objects cost ~4 us each on both sides)."""
    counts = np.fromiter((len(f.types) for f in frames), dtype=np.int64, count=len(frames))
    types = np.concatenate([np.asarray(f.types, dtype=np.int64) for f in frames]) if frames else np.zeros(0, np.int64)
    pos = (np.concatenate([np.asarray(f.positions, dtype=np.float64) for f in frames]) if frames
           else np.zeros((0, 3)))
    periodic = [(k, f.cell, f.pbc) for k, f in enumerate(frames) if f.cell is not None or f.pbc is not None]
    return {"counts": counts, "types": types, "positions": pos, "periodic": periodic}


def _decode_frames(d: dict) -> list:
    from app.inference.model import Frame

    bounds = offsets(d["counts"])
    types, pos = d["types"], d["positions"]
    frames = [Frame(types=types[a:b], positions=pos[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for k, cell, pbc in d["periodic"]:
        frames[k].cell, frames[k].pbc = cell, pbc
    return frames


def _encode_results(results: list[dict], counts: np.ndarray) -> dict:
    """predict_frames' result dicts as flat arrays (energies, forces, virials, dropped counts and, when
    present, atomic energies)."""
    out = {
        "counts": counts,
        "energy": np.array([r["energy"] for r in results], dtype=np.float64),
        "forces": np.concatenate([r["forces"] for r in results]) if results else np.zeros((0, 3)),
        "virial": np.array([r["virial"] for r in results], dtype=np.float64).reshape(-1, 3, 3),
        "n_dropped": np.array([r["n_dropped"] for r in results], dtype=np.int64),
    }
    if results and "atomic_energies" in results[0]:
        out["atomic_energies"] = np.concatenate([r["atomic_energies"] for r in results])
    return out


def _decode_results(d: dict) -> list[dict]:
    bounds = offsets(d["counts"])
    forces, virial, energy, dropped = d["forces"], d["virial"], d["energy"].tolist(), d["n_dropped"].tolist()
    ae = d.get("atomic_energies")
    out = []
    for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        r = {"energy": energy[k], "forces": forces[a:b], "virial": virial[k], "n_dropped": dropped[k]}
        if ae is not None:
            r["atomic_energies"] = ae[a:b]
        out.append(r)
    return out


def _recv_blocking(sock: socket.socket):
    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the other side closed the socket")
            buf += chunk
        return bytes(buf)

    (n,) = _HEADER.unpack(exactly(_HEADER.size))
    return pickle.loads(exactly(n))


class ModelProcess:
    """One child process serving one model's ``predict_frames``.

    :meth:`ensure_started` may be called from any thread; :meth:`call` and :meth:`aclose` run on the event
    loop that first called :meth:`call`."""

    def __init__(self, model, threads: int = 1, restart_after_s: float = 30.0, max_processes: int | None = None):
        self.label = f"{model.name}/{model.version}"
        self.directory = Path(model.directory)
        self.options = dict(getattr(model, "load_options", {}), intra_op_threads=int(threads))
        self.sha256 = model.manifest["onnx"]["sha256"]
        self.threads = int(threads)
        self.restart_after_s = restart_after_s
        self.max_processes = max_processes  # children starting or ready in this server, all models together
        self._refused_logged = False
        self._failed_starts = 0  # starts in a row that failed (for the backoff)
        self.state = "idle"  # idle -> starting -> ready; failed (restartable); closed
        self.reason = ""  # why the last child failed, for logs and tests
        self.pid: int | None = None
        self.calls = 0  # answered through the child
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task | None = None  # the connection being made (one per child)
        self._read_task: asyncio.Task | None = None
        self._waiters: deque[asyncio.Future] = deque()  # one per call sent, answered in order
        self._failed_at = -float("inf")
        self._lock = threading.Lock()  # guards state changes between the starter thread and the loop
        self._starter: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    def ensure_started(self) -> None:
        """Start a child in the background unless one is starting or ready (or a failure is too recent)."""
        with self._lock:
            if self.state in ("starting", "ready", "closed"):
                return
            if self.state == "failed" and time.monotonic() - self._failed_at < self._backoff():
                return
            if not self._take_slot():
                return
            self.state = "starting"
            self._starter = threading.Thread(target=self._start, name=f"dpserve-spawn-{self.label}", daemon=True)
            try:
                self._starter.start()
            except RuntimeError as e:  # no thread to be had: stay as before, without the slot
                self.state, self.reason, self._failed_at = "failed", f"cannot start a thread ({e})", time.monotonic()
                self._free_slot()

    def _backoff(self) -> float:
        """Seconds before the next start after a failure: restart_after_s, doubled for every start in a row
        that failed (a child that cannot load its model would otherwise cost ~400 MB every 30 s), at most
        an hour."""
        return min(self.restart_after_s * 2.0 ** max(self._failed_starts - 1, 0), 3600.0)

    def _take_slot(self) -> bool:
        """Count this child against ``max_processes`` (each costs ~400 MB: its own interpreter, onnxruntime,
        numba and the model); False when all are taken (logged once; calls stay in the worker thread)."""
        with _slots_lock:
            if self.max_processes is not None and id(self) not in _slot_holders \
                    and len(_slot_holders) >= self.max_processes:
                if not self._refused_logged:
                    log.info("%s: %d model processes run already (model_process_max); this model's calls stay "
                             "in the server process", self.label, len(_slot_holders))
                    self._refused_logged = True
                return False
            _slot_holders.add(id(self))
            return True

    def _free_slot(self) -> None:
        with _slots_lock:
            _slot_holders.discard(id(self))

    def wait_started(self, timeout: float | None = None) -> bool:
        """Start a child if needed and wait until it is ready or has failed; returns whether it is ready."""
        self.ensure_started()
        starter = self._starter
        if starter is not None:
            starter.join(timeout)
        return self.ready

    def _start(self) -> None:
        ours = theirs = proc = None
        try:
            ours, theirs = socket.socketpair()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
            proc = subprocess.Popen([sys.executable, "-m", "app.inference.procworker", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
            theirs.close()
            ours.settimeout(_START_TIMEOUT_S)
            ours.sendall(_pack((str(self.directory), self.options, self.threads, self.sha256)))
            kind, payload = _recv_blocking(ours)
            if kind != "ready":
                raise ModelProcessGone(str(payload))
            ours.settimeout(None)
        except Exception as e:  # whatever it was, the slot is given back and the model keeps being served
            why = str(e) if isinstance(e, ModelProcessGone) else f"{type(e).__name__}: {e}"
            for sock in (theirs, ours):
                if sock is not None:
                    sock.close()
            if proc is not None:
                _kill(proc)
            with self._lock:
                if self.state != "closed":
                    self.state, self.reason, self._failed_at = "failed", why, time.monotonic()
                    self._failed_starts += 1
                self._free_slot()
            log.error("%s: the model process did not start (%s); calls stay in the server process", self.label, why)
            return
        with self._lock:
            if self.state != "closed":
                self._proc, self._sock, self.pid, self.state = proc, ours, proc.pid, "ready"
                self._failed_starts = 0
                proc = None
            else:
                self._free_slot()  # closed while starting: the slot was kept until this child is gone
        if proc is not None:
            ours.close()
            _kill(proc)
            return
        log.info("%s: model process %d ready (%d thread%s)", self.label, self.pid, self.threads,
                 "" if self.threads == 1 else "s")

    def _mark_closed(self):
        """State 'closed' for good; returns the child and socket to end (either may be None)."""
        with self._lock:
            if self.state != "starting":  # a starting child gives its slot back when it is gone (_start)
                self._free_slot()
            self.state = "closed"
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
        return proc, sock

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the child: calls in flight get ModelProcessGone; the child exits on EOF (killed after
        ``timeout`` seconds)."""
        proc, sock = self._mark_closed()
        self._disconnect("the model process was closed", sock)
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, _reap, proc, timeout)

    def close_now(self) -> None:
        """Kill the child without an event loop (tests; a process whose batcher never ran)."""
        proc, sock = self._mark_closed()
        if sock is not None and self._writer is None:
            sock.close()
        if proc is not None:
            _kill(proc)

    # -- calls --------------------------------------------------------------------------------------------
    async def call(self, frames, atomic_energies: bool, chunk_atoms: int) -> list[dict]:
        """``predict_frames(model, frames, ...)`` computed in the child. Raises ModelProcessGone when the
        child is unavailable or dies before answering, or the model's own exception."""
        if self.state != "ready":
            raise ModelProcessGone(f"model process is {self.state}")
        if self._writer is None:
            # one connection per child, however many calls arrive while it is being made
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect(self._sock))
            await asyncio.shield(self._connecting)
            if self.state != "ready" or self._writer is None:
                raise ModelProcessGone(f"model process is {self.state}")
        data = _pack(("predict", _encode_frames(frames), atomic_energies, chunk_atoms))  # a failure here is ours
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)  # with the write, no await between: answers come back in the order of the calls
        try:
            self._writer.write(data)
            await self._writer.drain()
        except asyncio.CancelledError:
            fut.cancel()  # its answer will still come, and be skipped
            raise
        except Exception as e:  # the socket broke: every call in flight goes back to the batcher
            self._failed(f"{type(e).__name__}: {e}")
        kind, payload = await fut
        if kind == "ok":
            self.calls += 1
            return _decode_results(payload)
        raise payload  # the model's exception, re-raised here

    async def _connect(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        except Exception as e:
            self._failed(f"cannot connect to the model process ({type(e).__name__}: {e})")
            return
        if self.state != "ready" or self._sock is not sock:  # failed or closed meanwhile
            writer.close()
            return
        self._writer = writer
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(reader),
                                                                 name=f"model process {self.label}")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                msg = pickle.loads(await reader.readexactly(n))
                fut = self._waiters.popleft()
                if not fut.done():  # its caller may have been cancelled
                    fut.set_result(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EOF, a broken socket, an answer that does not unpickle: replace the child
            code = self._proc.poll() if self._proc is not None else None
            self._failed(f"{type(e).__name__}: {e}" + (f" (exit code {code})" if code is not None else ""))

    def _failed(self, why: str) -> None:
        with self._lock:
            if self.state != "ready":
                return
            self.state, self.reason, self._failed_at = "failed", why, time.monotonic()
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
            self._free_slot()
        log.error("%s: the model process %s failed (%s); computing in the server process", self.label, self.pid, why)
        self._disconnect(why, sock)
        if proc is not None:
            proc.kill()  # reaped off the event loop
            asyncio.get_running_loop().run_in_executor(None, _reap, proc, 5.0)

    def _disconnect(self, why: str, sock: socket.socket | None) -> None:
        """Fail the calls in flight and drop the connection (on the event loop)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ModelProcessGone(why))
        if self._writer is not None:
            self._writer.close()
        elif sock is not None:
            sock.close()
        self._writer = None
        self._connecting = None
        task, self._read_task = self._read_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _reap(proc: subprocess.Popen, timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    _kill(proc)


# -- the child ------------------------------------------------------------------------------------------


def portable(e: Exception) -> Exception:
    """``e`` if it survives pickling both ways, else a RuntimeError with its type and message (an exception
    class whose ``__init__`` takes other arguments pickles but does not unpickle)."""
    try:
        pickle.loads(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(sock: socket.socket) -> None:
    """Load the model and answer calls in order until the parent closes the socket (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent shuts us down
    try:
        directory, options, threads, sha256 = _recv_blocking(sock)
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        from app.inference.model import DeepPotModel
        from app.inference.packing import predict_frames

        model = DeepPotModel.load(directory, **options)
        if model.manifest["onnx"]["sha256"] != sha256:
            raise RuntimeError(f"{directory} changed on disk since the server loaded it (ONNX sha256 "
                               f"{model.manifest['onnx']['sha256'][:12]}... != {sha256[:12]}...)")
        sock.sendall(_pack(("ready", os.getpid())))
    except BaseException as e:  # reported to the parent, which logs it
        with contextlib.suppress(Exception):
            sock.sendall(_pack(("error", f"{type(e).__name__}: {e}")))
        return
    while True:
        try:
            msg = _recv_blocking(sock)
        except (EOFError, OSError):
            return  # the parent closed the socket or is gone
        if msg[0] != "predict":
            return
        _, encoded, atomic_energies, chunk_atoms = msg
        try:
            frames = _decode_frames(encoded)
            results = predict_frames(model, frames, atomic_energies=atomic_energies, chunk_atoms=chunk_atoms)
            out = ("ok", _encode_results(results, encoded["counts"]))
        except Exception as e:  # the model's failure: the parent re-raises it
            out = ("exc", portable(e))
        try:
            data = _pack(out)
        except Exception as e:  # a result that does not pickle
            data = _pack(("exc", RuntimeError(f"the model process could not send its result ({e})")))
        try:
            sock.sendall(data)
        except OSError:
            return


if __name__ == "__main__":
    _child_main(socket.socket(fileno=int(sys.argv[1])))
