"""Overload and deadlines: a full queue sheds at once with 503 + Retry-After (counted in /metrics) while
/health and /ready keep answering; a request past request_timeout_s gets 504 and its frames leave the queue."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import SE, WATER_MOLECULE, make_settings, message, post, water_box


class Gate:
    """Wraps a model's predict: each call waits until the gate opens (or sleeps ``delay``), counting calls."""

    def __init__(self, model, delay: float | None = None):
        self.original, self.delay = model.predict, delay
        self.open, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, frames, **kw):
        self.calls += 1
        self.entered.set()
        if self.delay is not None:
            time.sleep(self.delay)
        else:
            assert self.open.wait(30), "gate never opened"
        return self.original(frames, **kw)


def _in_thread(client, body, out: list):
    t = threading.Thread(target=lambda: out.append(post(client, body)))
    t.start()
    return t


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("limit", ["requests", "atoms"])
def test_full_queue_sheds_at_once_with_retry_after(tiny_store, monkeypatch, limit):
    kw = {"max_queue_requests": 2} if limit == "requests" else {"max_queue_atoms": 300}
    frames = [WATER_MOLECULE] if limit == "requests" else [water_box()]  # 3 or 192 atoms per request
    with TestClient(create_app(make_settings(tiny_store, batch_wait_ms=0, **kw))) as client:
        service = client.app.state.service
        gate = Gate(service.registry.find(SE))
        monkeypatch.setattr(service.registry.find(SE), "predict", gate)
        batcher = service.batchers[(SE, "1")]
        answers: list = []
        threads = [_in_thread(client, {"model": SE, "frames": frames}, answers)]
        assert gate.entered.wait(10)  # the first request is in the model call: it does not count
        queued = 2 if limit == "requests" else 1
        for _ in range(queued):
            threads.append(_in_thread(client, {"model": SE, "frames": frames}, answers))
        _wait_for(lambda: len(batcher._jobs) == queued)

        t0 = time.perf_counter()
        r = post(client, {"model": SE, "frames": frames})
        assert time.perf_counter() - t0 < 1.0  # shed at once, not queued
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert "overloaded" in message(r) and f"max_queue_{limit}" in message(r)
        for path in ("/health", "/ready"):  # operations endpoints keep answering
            t0 = time.perf_counter()
            assert client.get(path).status_code == 200
            assert time.perf_counter() - t0 < 0.5

        gate.open.set()
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200] * (1 + queued)
        assert post(client, {"model": SE, "frames": frames}).status_code == 200  # the queue has room again
        metrics = client.get("/metrics").text
        assert 'dpserve_shed_total{model="water-se-tiny/1",reason="queue_full"} 1.0' in metrics
        assert 'dpserve_requests_total{method="POST",route="/predict",status="503"} 1.0' in metrics


def test_request_past_its_deadline_gets_504_and_leaves_the_queue(tiny_store, monkeypatch):
    with TestClient(create_app(make_settings(tiny_store, request_timeout_s=0.4, batch_wait_ms=0))) as client:
        service = client.app.state.service
        model = service.registry.find(SE)
        gate = Gate(model, delay=1.5)
        monkeypatch.setattr(model, "predict", gate)
        batcher = service.batchers[(SE, "1")]
        answers: list = []
        first = _in_thread(client, {"model": SE, "frames": [WATER_MOLECULE]}, answers)
        assert gate.entered.wait(10)
        t0 = time.perf_counter()
        second = post(client, {"model": SE, "frames": [water_box()]})  # queued behind the slow call
        assert second.status_code == 504 and "request_timeout_s = 0.4 s" in message(second)
        assert time.perf_counter() - t0 < 1.2  # answered at its deadline, not when the slow call ends
        assert len(batcher._jobs) == 0  # its frames left the queue
        first.join(30)
        assert answers[0].status_code == 504  # the running call could not be interrupted; its result is dropped
        time.sleep(1.5)  # the slow call has ended
        assert gate.calls == 1  # the queued request was never evaluated
        monkeypatch.undo()
        assert post(client, {"model": SE, "frames": [WATER_MOLECULE]}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'dpserve_timeouts_total{model="water-se-tiny/1"} 2.0' in metrics
        assert 'dpserve_queue_depth{model="water-se-tiny/1"} 0.0' in metrics


def test_a_running_call_stops_computing_a_frame_past_its_deadline(tiny_store, monkeypatch):
    """A large frame runs in chunks; once its request got 504, the rest of its chunks are skipped."""
    with TestClient(create_app(make_settings(tiny_store, request_timeout_s=0.5, batch_wait_ms=0, chunk_atoms=16))) as client:
        model = client.app.state.service.registry.find(SE)
        flushes = []
        original = model._flush

        def slow_flush(*a, **kw):
            flushes.append(time.perf_counter())
            time.sleep(0.1)
            return original(*a, **kw)

        monkeypatch.setattr(model, "_flush", slow_flush)
        r = post(client, {"model": SE, "frames": [water_box()]})  # 192 atoms: 12 chunks of 16, >= 1.2 s
        assert r.status_code == 504
        time.sleep(0.5)  # let the worker notice
        done = len(flushes)
        time.sleep(0.5)
        assert len(flushes) == done  # it has stopped ...
        assert done < 12  # ... before the end of the frame
        monkeypatch.undo()
        assert post(client, {"model": SE, "frames": [water_box()]}).status_code == 200
